"""Known-answer tests for the mean-teacher pieces (model/ssl.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.config import TrainConfig
from model.ssl import (
    EMATeacher,
    confidence_weighted_ce,
    cross_pseudo_supervision_loss,
    eta,
    pseudo_labels,
    weighted_ce,
)


def tiny_student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))


def set_weight(module: nn.Module, values: list[float]) -> None:
    with torch.no_grad():
        module[0].weight.copy_(torch.tensor([values]))


def test_ema_decay_warms_up_then_caps_at_momentum():
    teacher = EMATeacher(tiny_student(), momentum=0.99)
    expected = {0: 0.0, 1: 0.5, 2: 2 / 3, 98: 98 / 99, 99: 0.99, 500: 0.99}
    for updates, decay in expected.items():
        teacher.updates = updates
        assert teacher.decay() == pytest.approx(decay)


def test_ema_update_arithmetic_on_parameters():
    student = tiny_student()
    set_weight(student, [1.0, 2.0])
    teacher = EMATeacher(student, momentum=0.99)
    set_weight(student, [3.0, 4.0])
    teacher.update(student)  # t=0: decay 0, the teacher becomes the student
    assert teacher.model[0].weight.tolist() == [[3.0, 4.0]]
    set_weight(student, [5.0, 8.0])
    teacher.update(student)  # t=1: decay 0.5
    assert teacher.model[0].weight.tolist() == [[4.0, 6.0]]
    teacher.updates = 1000  # decay capped at 0.99: 0.99 * 4 + 0.01 * 104 = 5.0
    set_weight(student, [104.0, 6.0])
    teacher.update(student)
    assert teacher.model[0].weight.flatten().tolist() == pytest.approx([5.0, 6.0])


@pytest.mark.parametrize("average, expected_mean", [(True, 4.0), (False, 6.0)])
def test_ema_batchnorm_buffers_averaged_or_copied(average, expected_mean):
    student = tiny_student()
    teacher = EMATeacher(student, momentum=0.5, average_buffers=average)
    teacher.updates = 10  # decay = momentum = 0.5
    with torch.no_grad():
        teacher.model[1].running_mean.fill_(2.0)
        student[1].running_mean.fill_(6.0)
        student[1].num_batches_tracked.fill_(7)
    teacher.update(student)
    assert teacher.model[1].running_mean.item() == expected_mean
    assert teacher.model[1].num_batches_tracked.item() == 7  # integers are always copied


def test_teacher_is_frozen_in_eval_mode_and_round_trips():
    student = tiny_student()
    teacher = EMATeacher(student)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    teacher.update(student)
    other = EMATeacher(tiny_student())
    other.load_state_dict(teacher.state_dict())
    assert other.updates == 1
    assert torch.equal(other.model[0].weight, teacher.model[0].weight)


def test_pseudo_labels_argmax_confidence_and_partial_labels():
    # pixel 0: logits (0, ln 3) -> p = (1/4, 3/4); pixel 1: (ln 4, 0) -> p = (4/5, 1/5)
    logits = torch.tensor([[[[0.0, math.log(4)]], [[math.log(3), 0.0]]]])  # 1 x 2 x 1 x 2
    labels, confidence = pseudo_labels(logits)
    assert labels.tolist() == [[[1, 0]]]
    assert confidence.flatten().tolist() == pytest.approx([0.75, 0.8])
    # a person labelled pixel 1 as class 1: that label wins, with confidence 1
    labels, confidence = pseudo_labels(logits, torch.tensor([[[255, 1]]]))
    assert labels.tolist() == [[[1, 1]]]
    assert confidence.flatten().tolist() == pytest.approx([0.75, 1.0])


def test_eta_is_share_of_pixels_above_threshold_per_image():
    confidence = torch.tensor([[[0.99, 0.5], [0.98, 0.97]], [[1.0, 1.0], [0.1, 0.2]]])
    labels = torch.zeros(2, 2, 2, dtype=torch.int64)
    assert eta(confidence, labels, 0.97).tolist() == [0.5, 0.5]  # 0.97 itself is not > 0.97
    labels[1, 1, 1] = 255  # a padded pixel leaves the count: 2 of 3
    assert eta(confidence, labels, 0.97).tolist() == pytest.approx([0.5, 2 / 3])


def test_confidence_weighted_ce_equals_hand_computed_value():
    # one image, 3 pixels, 2 classes:
    #   pixel 0: logits (0, 0), label 1 -> CE = ln 2
    #   pixel 1: logits (ln 3, 0), label 0 -> p(label) = 3/4, CE = ln(4/3)
    #   pixel 2: ignored (255)
    logits = torch.tensor([[[[0.0, math.log(3), 5.0]], [[0.0, 0.0, -5.0]]]], requires_grad=True)
    labels = torch.tensor([[[1, 0, 255]]])
    confidence = torch.tensor([[[0.5, 0.8, 0.9]]])
    image_eta = torch.tensor([0.5])
    loss = confidence_weighted_ce(logits, labels, confidence, image_eta)
    expected = 0.5 * (0.5 * math.log(2) + 0.8 * math.log(4 / 3)) / 2  # / 2 non-ignored pixels
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[..., 2].abs().sum() == 0  # the ignored pixel gets no gradient


def test_weighted_ce_without_weights_is_plain_mean_ce_and_safe_when_all_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 3, 5))
    labels[0, 0] = 255
    reference = F.cross_entropy(logits, labels, ignore_index=255)
    assert weighted_ce(logits, labels).item() == pytest.approx(reference.item(), rel=1e-6)
    nothing = torch.full_like(labels, 255)
    assert weighted_ce(logits, nothing).item() == 0.0


def test_cross_pseudo_supervision_learns_each_others_argmax():
    # branch a says class 0 with p 3/4, branch b says class 1 with p 4/5 (one pixel)
    logits_a = torch.tensor([[[[math.log(3)]], [[0.0]]]])
    logits_b = torch.tensor([[[[0.0]], [[math.log(4)]]]])
    # a learns b's class 1: -ln(1/4); b learns a's class 0: -ln(1/5)
    expected = math.log(4) + math.log(5)
    assert cross_pseudo_supervision_loss(logits_a, logits_b).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("iterations", "momentum"), [(250, 1 - 1 / 12.5), (1000, 0.98), (2000, 0.99), (5000, 0.99)]
)
def test_teacher_momentum_follows_the_cycle_length_up_to_ema_momentum(iterations, momentum):
    config = TrainConfig(iterations=iterations, cold_start_iterations=0)
    assert config.teacher_momentum() == pytest.approx(momentum)
