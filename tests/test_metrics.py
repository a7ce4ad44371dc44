import math

import numpy as np
import pytest
import torch
from torch import nn

from model.data import IGNORE_INDEX, load_folder
from model.metrics import confusion_matrix, evaluate, iou_per_class, mean_iou, pixel_accuracy
from model.network import DeepLabV3Plus

PRED = torch.tensor([[0, 0, 1], [1, 2, 2]])
TARGET = torch.tensor([[0, 1, 1], [IGNORE_INDEX, 2, 0]])
# Counted (target, pred) pairs: (0,0) (1,0) (1,1) (2,2) (0,2); the ignored pixel predicts 1.
EXPECTED_CM = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_confusion_matrix_by_hand():
    assert torch.equal(confusion_matrix(PRED, TARGET, 4), EXPECTED_CM)


def test_confusion_matrix_accepts_numpy():
    assert torch.equal(confusion_matrix(PRED.numpy(), TARGET.numpy(), 4), EXPECTED_CM)


def test_iou_by_hand():
    iou = iou_per_class(EXPECTED_CM)
    # class 0: 1 / (2 + 2 - 1); class 1: 1 / (1 + 2 - 1); class 2: 1 / (2 + 1 - 1); class 3 absent.
    assert iou[:3].tolist() == pytest.approx([1 / 3, 1 / 2, 1 / 2])
    assert math.isnan(iou[3])
    assert mean_iou(EXPECTED_CM) == pytest.approx(4 / 9)
    assert pixel_accuracy(EXPECTED_CM) == pytest.approx(3 / 5)


def test_predicted_but_absent_class_counts_as_zero():
    cm = confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 0]), 4)
    assert iou_per_class(cm)[3] == 0
    assert mean_iou(cm) == pytest.approx((1 / 2 + 0) / 2)


def test_all_ignored_is_nan_not_an_error():
    cm = confusion_matrix(torch.tensor([1, 2]), torch.full((2,), IGNORE_INDEX), 3)
    assert cm.sum() == 0
    assert math.isnan(mean_iou(cm)) and math.isnan(pixel_accuracy(cm))


def test_mismatched_sizes_and_bad_classes_are_errors():
    with pytest.raises(ValueError, match="pixels"):
        confusion_matrix(torch.zeros(3), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 2)


class ConstantClass(nn.Module):
    """Predicts one class everywhere: its metrics follow from the masks alone."""

    def __init__(self, num_classes: int, label: int):
        super().__init__()
        self.num_classes, self.label = num_classes, label

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        logits[:, self.label] = 1.0
        return logits


def test_evaluate_known_answer_on_fixture(camvid_root):
    samples = load_folder(camvid_root, "val")
    samples += load_folder(camvid_root, "val", downscale=2)  # mixed sizes in one call
    masks = np.concatenate([s.mask.ravel() for s in samples])
    labelled = masks[masks != IGNORE_INDEX]
    road = 3
    result = evaluate(ConstantClass(11, road), samples, num_classes=11, batch_size=3)
    road_iou = (labelled == road).sum() / labelled.size
    assert result["pixel_accuracy"] == pytest.approx(road_iou)
    assert result["iou"][road] == pytest.approx(road_iou)
    present = set(np.unique(labelled).tolist()) | {road}
    for c in range(11):
        assert (result["iou"][c] is None) == (c not in present)
        if c in present and c != road:
            assert result["iou"][c] == 0
    assert result["miou"] == pytest.approx(road_iou / len(present))


def test_evaluate_a_real_model_and_restore_its_mode(camvid_root):
    model = DeepLabV3Plus(11).train()
    result = evaluate(model, load_folder(camvid_root, "val"), num_classes=11)
    assert model.training
    assert 0 <= result["miou"] <= 1 and 0 <= result["pixel_accuracy"] <= 1
    assert len(result["iou"]) == 11
