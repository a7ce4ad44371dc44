"""Mean-teacher pieces of S4AL (papers/s4al.md Sec. 3.1-3.2): the EMA teacher, pseudo-labels,
the image weight eta (Eq. 4) and the confidence-weighted cross-entropy (Eq. 5)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.data import IGNORE_INDEX


class EMATeacher:
    """Exponential moving average of a student network (Eq. 1).

    Parameters are always averaged: teacher := d * teacher + (1 - d) * student, with the
    warm-up decay d = min(1 - 1/(t+1), momentum) at update t (so the first update copies
    the student, as in the ClassMix and S4AL code).

    BatchNorm running statistics are averaged the same way by default
    (`average_buffers=True`), and the teacher always runs in eval mode. Why: the authors'
    code (and every SSL repo in PRIOR_ART.md A) averages parameters only and keeps the
    teacher in train mode, so its BatchNorm normalises each batch of 4 weak views by that
    batch's own statistics: pseudo-labels then depend on which other images share the batch,
    and 4 crops are a noisy estimate. In eval mode the teacher uses running statistics; the
    averaged ones match the averaged weights (as timm's ModelEmaV2 and torch's AveragedModel
    with use_buffers=True do). `average_buffers=False` copies the student's statistics
    instead. Integer buffers (num_batches_tracked) are always copied.
    """

    def __init__(self, student: nn.Module, momentum: float = 0.99, average_buffers: bool = True):
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self.momentum = momentum
        self.average_buffers = average_buffers
        self.updates = 0

    def decay(self) -> float:
        return min(1.0 - 1.0 / (self.updates + 1), self.momentum)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        d = self.decay()
        for mine, theirs in zip(self.model.parameters(), student.parameters(), strict=True):
            mine.lerp_(theirs.detach(), 1.0 - d)
        for mine, theirs in zip(self.model.buffers(), student.buffers(), strict=True):
            if self.average_buffers and mine.is_floating_point():
                mine.lerp_(theirs, 1.0 - d)
            else:
                mine.copy_(theirs)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


@torch.no_grad()
def pseudo_labels(
    logits: Tensor, partial_mask: Tensor | None = None, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Teacher logits N x C x H x W -> (labels N x H x W int64, confidence N x H x W).

    Confidence is the max softmax probability. Pixels that a person labelled
    (`partial_mask` != 255, e.g. acquired regions) take the human label with confidence 1.
    Pixels outside `valid` (crop padding) get label 255 and confidence 0: no loss, and they
    count in neither eta's numerator nor its denominator.
    """
    confidence, labels = logits.softmax(dim=1).max(dim=1)
    if partial_mask is not None:
        labelled = partial_mask != IGNORE_INDEX
        labels = torch.where(labelled, partial_mask, labels)
        confidence = torch.where(labelled, torch.ones_like(confidence), confidence)
    if valid is not None:
        labels = labels.masked_fill(~valid, IGNORE_INDEX)
        confidence = confidence.masked_fill(~valid, 0.0)
    return labels, confidence


def eta(confidence: Tensor, labels: Tensor, threshold: float = 0.97) -> Tensor:
    """Eq. 4's image weight: per image, the share of its pixels with confidence > threshold.

    Pixels whose label is 255 (crop padding) count in neither numerator nor denominator;
    an image with no such pixels gets 0.
    """
    valid = labels != IGNORE_INDEX
    confident = (confidence > threshold) & valid
    return confident.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)


def weighted_ce(
    logits: Tensor,
    labels: Tensor,
    pixel_weight: Tensor | None = None,
    image_weight: Tensor | None = None,
) -> Tensor:
    """sum over pixels of image_weight[n] * pixel_weight[n,h,w] * CE[n,h,w], divided by the
    number of non-ignored pixels (labels != 255).

    The divisor is the pixel count, not the sum of weights: dividing by the weights would
    cancel the down-weighting Eq. 5 asks for (a batch of unsure pixels would weigh as much
    as a batch of sure ones). With no weights this is the usual mean CE over labelled
    pixels, except that a batch with none gives 0 instead of NaN.
    """
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    if pixel_weight is not None:
        ce = ce * pixel_weight
    if image_weight is not None:
        ce = ce * image_weight[:, None, None]
    return ce.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


def confidence_weighted_ce(
    logits: Tensor, labels: Tensor, confidence: Tensor, image_weight: Tensor
) -> Tensor:
    """S4AL's unsupervised loss: Eq. 5 (per-pixel CE x teacher confidence p) times Eq. 4's
    eta per image, normalised as in `weighted_ce`."""
    return weighted_ce(logits, labels, pixel_weight=confidence, image_weight=image_weight)


def cross_pseudo_supervision_loss(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """CPS (Chen et al., 2021): each branch learns the other's hard argmax, no threshold."""
    labels_a = logits_a.detach().argmax(dim=1)
    labels_b = logits_b.detach().argmax(dim=1)
    return F.cross_entropy(logits_a, labels_b) + F.cross_entropy(logits_b, labels_a)
