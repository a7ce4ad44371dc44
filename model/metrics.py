"""Confusion matrix, IoU and evaluation of a segmentation model on labelled samples."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from model.data import IGNORE_INDEX, Sample
from model.inference import predict_probabilities


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """int64 C x C, rows = target class, columns = predicted class; target 255 is skipped."""
    pred, target = torch.as_tensor(pred).flatten(), torch.as_tensor(target).flatten()
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} pixels, target {target.numel()}")
    keep = target != IGNORE_INDEX
    pred, target = pred[keep].long(), target[keep].long()
    if len(target) and (target.max() >= num_classes or pred.max() >= num_classes):
        raise ValueError(f"class index >= num_classes ({num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(cm: Tensor) -> Tensor:
    """float64 per-class IoU; NaN for a class absent from both prediction and target."""
    cm = cm.double()
    intersection = cm.diag()
    union = cm.sum(dim=0) + cm.sum(dim=1) - intersection
    return intersection / union  # 0 / 0 = NaN marks the absent classes


def mean_iou(cm: Tensor) -> float:
    """Mean over classes present in prediction or target; NaN when no pixel was counted."""
    iou = iou_per_class(cm)
    present = ~iou.isnan()
    return iou[present].mean().item() if present.any() else math.nan


def pixel_accuracy(cm: Tensor) -> float:
    total = cm.sum().item()
    return cm.diag().sum().item() / total if total else math.nan


def evaluate(
    model: nn.Module,
    samples: Sequence[Sample],
    num_classes: int,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> dict:
    """{"miou", "iou": per class (None where the class is absent), "pixel_accuracy"} over the
    samples' masks (255 ignored; samples without a mask are skipped)."""
    labelled = [s for s in samples if s.mask is not None]
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    maps = predict_probabilities(model, (s.image for s in labelled), batch_size, device)
    for sample, probabilities in zip(labelled, maps, strict=True):
        target = torch.from_numpy(sample.mask)
        cm += confusion_matrix(probabilities.argmax(dim=0), target, num_classes)
    iou = iou_per_class(cm)
    return {
        "miou": mean_iou(cm),
        "iou": [None if math.isnan(v) else v for v in iou.tolist()],
        "pixel_accuracy": pixel_accuracy(cm),
    }
