"""What every training method is built from: the batches, the step contract, and the one
implementation of replay + ClassMix + the unsupervised loss that the semi-supervised
methods share.

A step is built as `Step(trainer)`, says whether it needs unlabelled batches
(`uses_unlabelled`), returns `losses(batch) -> {name: scalar tensor}`, may report other
per-step numbers in `metrics()`, keeps extra state in `state_dict()` (restored by
`load_state_dict()` on resume, `warm_start()` in the next cycle) and names the step that
trains during the cold start (`cold_start()`). Extra networks can join
`trainer.optimizer` with `add_param_group`.

`MixingStep.losses` is where a semi-supervised iteration happens: replayed views, the
step's pseudo-label targets (`targets`, the one method-specific part), ClassMix within the
batch, Balanced ClassMix onto replayed images, one student pass, the eta-weighted losses.
Change the mixing or the unsupervised loss here and every method follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from model import distributed
from model.config import TrainConfig
from model.ignore import IGNORE_INDEX
from model.mixing import ClassSampler, RandomHalf, ReplayBuffer, apply_mix, classmix_masks
from model.ssl import EMATeacher, eta, weighted_ce
from model.strong_zoom import warp_image, warp_map, zoom_grids


@dataclass
class UnlabelledBatch:
    weak: Tensor  # N x 3 x H x W, for the teacher
    strong: Tensor  # same crop and flip, colour-jittered, for the student
    mask: Tensor  # N x H x W partial labels (acquired regions), 255 elsewhere
    valid: Tensor  # N x H x W bool, False on crop padding (no pseudo-label there)
    index: Tensor  # dataset indices, for the replay buffer

    def to(self, device: torch.device) -> UnlabelledBatch:
        tensors = (self.weak, self.strong, self.mask, self.valid, self.index)
        return UnlabelledBatch(*(t.to(device, non_blocking=True) for t in tensors))


@dataclass
class Batch:
    images: Tensor  # labelled, N x 3 x H x W
    masks: Tensor  # N x H x W, 255 = ignore
    unlabelled: UnlabelledBatch | None = None


class Host(Protocol):
    """What a step uses of the trainer that runs it (model.train.Trainer)."""

    config: TrainConfig
    num_classes: int
    device: torch.device
    generator: torch.Generator  # mixing and replay draws
    optimizer: torch.optim.Optimizer
    class_sampler: ClassSampler
    unlabelled_data: Dataset
    teacher: EMATeacher
    student_train: nn.Module

    def pseudo_label(
        self, weak: Tensor, partial_mask: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor]: ...

    def student_forward(self, *images: Tensor) -> tuple[Tensor, ...]: ...

    def distribute(self, module: nn.Module) -> nn.Module: ...


class TrainStep:
    uses_unlabelled = False

    def __init__(self, trainer: Host):
        self.trainer = trainer

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def cold_start(self) -> TrainStep:
        """The step that trains during the cycle's cold start (supervised by default)."""
        return SupervisedStep(self.trainer)

    def metrics(self) -> dict[str, float]:
        """Numbers about the last step that are not losses, averaged into the history."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Resume an unfinished cycle from `state_dict()`."""

    def warm_start(self, state: dict) -> None:
        """Start a new cycle from a finished one's `state_dict()` (e.g. extra networks'
        weights); the student and teacher are loaded by the trainer."""


class SupervisedStep(TrainStep):
    """Cross-entropy on the labelled pixels (Eq. 2); also every method's cold start."""

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.trainer.student_train(batch.images)
        return {"supervised": weighted_ce(logits, batch.masks)}

    def cold_start(self) -> TrainStep:
        return self


@dataclass
class Targets:
    """What the student learns on unlabelled views, all `N x H x W`: `label` (255 = not
    trained on), its per-pixel `weight`, the teacher's `raw` pseudo-label (partial labels
    applied; it draws the ClassMix masks and eta) and its `confidence` (1 on labelled
    pixels). Methods may return a subclass with more fields."""

    label: Tensor
    weight: Tensor
    raw: Tensor
    confidence: Tensor


@dataclass
class Views:
    """Student images with their targets, mixed together by ClassMix."""

    image: Tensor  # N x 3 x H x W
    label: Tensor
    weight: Tensor
    raw: Tensor
    confidence: Tensor

    @classmethod
    def of(cls, image: Tensor, targets: Targets, rows: slice) -> Views:
        maps = (targets.label, targets.weight, targets.raw, targets.confidence)
        return cls(image, *(m[rows] for m in maps))

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def mixed_onto(self, mask: Tensor, other: Views) -> Views:
        """Self where `mask` (N x H x W) is set, `other` elsewhere."""
        return Views(*apply_mix(mask, self.tensors(), other.tensors()))

    def zoomed(self, grid: Tensor) -> Views:
        """The image and its targets resampled by `grid` (model.strong_zoom)."""
        return Views(
            warp_image(self.image, grid),
            warp_map(self.label, grid, IGNORE_INDEX),
            warp_map(self.weight, grid, 0.0),
            warp_map(self.raw, grid, IGNORE_INDEX),
            warp_map(self.confidence, grid, 0.0),
        )

    def rolled(self) -> Views:
        """Each image's batch neighbour i+1."""
        return Views(*(t.roll(-1, dims=0) for t in self.tensors()))


class MixingStep(TrainStep):
    """The shared semi-supervised iteration (mean teacher, S4AL, TSF): subclasses give
    `targets`, and optionally `extra_losses` for more networks; `replays` turns on the
    Balanced ClassMix replay buffer; `confidence_weighting` weights pixels (Eq. 5)."""

    uses_unlabelled = True
    confidence_weighting = False
    replays = False

    def __init__(self, trainer: Host):
        super().__init__(trainer)
        self.classmix = RandomHalf(trainer.generator)
        self.replay = None
        if self.replays:  # per rank: each rank replays its own shard (docs/DISTRIBUTED.md)
            size = distributed.split_evenly(trainer.config.replay_size)
            self.replay = ReplayBuffer(size, trainer.generator)

    def targets(self, batch: Batch, weak: Tensor, partial: Tensor, valid: Tensor) -> Targets:
        """Targets of the teacher's weak views `weak` (current, then replayed images) with
        their partial labels `partial`, none where `valid` is False (crop padding); `batch`
        for steps that also look at its labels."""
        labels, confidence = self.trainer.pseudo_label(weak, partial, valid)
        return Targets(labels, confidence, labels, confidence)

    def extra_losses(
        self, batch: Batch, inputs: list[Tensor], logits: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """More named losses from the student's `inputs` (labelled, mixed, [balanced]) and
        its `logits` on them (e.g. another network's); added before the replay loss."""
        return {}

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        u = batch.unlabelled
        n = len(u.weak)
        replayed = self.replayed_views(n)
        if self.replay is not None:
            self.replay.add(u.index.tolist())  # for later iterations, as in Sec. 3.3
        views = [u] if replayed is None else [u, replayed]
        weak, partial, valid = (
            torch.cat([getattr(v, name) for v in views]) for name in ("weak", "mask", "valid")
        )
        targets = self.targets(batch, weak, partial, valid)
        current = self.own_geometry(Views.of(u.strong, targets, slice(0, n)))
        # ClassMix: image i's sampled classes (from the raw pseudo-label, so pasted objects
        # stay whole) onto its batch neighbour i+1
        mixed = current.mixed_onto(classmix_masks(current.raw, self.classmix), current.rolled())
        inputs = [batch.images, mixed.image]
        if replayed is not None:  # Balanced ClassMix: head and tail classes of a replayed image
            replay = self.own_geometry(Views.of(replayed.strong, targets, slice(n, None)))
            balanced = replay.mixed_onto(
                classmix_masks(replay.raw, self.trainer.class_sampler), current
            )
            inputs.append(balanced.image)
        logits = self.trainer.student_forward(*inputs)
        losses = {
            "supervised": weighted_ce(logits[0], batch.masks),
            "unsupervised": self.unsupervised_loss(logits[1], mixed),
        }
        losses.update(self.extra_losses(batch, inputs, logits))
        if replayed is not None:
            losses["replay"] = self.unsupervised_loss(logits[2], balanced)
        return losses

    def own_geometry(self, views: Views) -> Views:
        """The student's views zoomed against the teacher's (`TrainConfig.strong_zoom`), or
        as they are (the default: both views share one geometry)."""
        zoom = self.trainer.config.strong_zoom
        if zoom is None:
            return views
        size = (views.image.shape[-2], views.image.shape[-1])
        grid = zoom_grids(len(views.image), size, zoom, self.trainer.generator, views.image.device)
        return views.zoomed(grid)

    def unsupervised_loss(self, logits: Tensor, views: Views) -> Tensor:
        """Eq. 4 (Eq. 5 with confidence weighting): cross-entropy on the targets, each image
        weighted by its eta, computed on the raw pseudo-label."""
        image_weight = eta(views.confidence, views.raw, self.trainer.config.confidence_threshold)
        pixel_weight = views.weight if self.confidence_weighting else None
        return weighted_ce(logits, views.label, pixel_weight, image_weight)

    def replayed_views(self, n: int) -> UnlabelledBatch | None:
        """n images from the buffer, re-read through the dataset's joint transform."""
        config = self.trainer.config
        if self.replay is None or not (config.balanced_classmix and len(self.replay)):
            return None
        dataset = self.trainer.unlabelled_data
        items = [dataset[i] for i in self.replay.sample(n)]
        return UnlabelledBatch(*default_collate(items)).to(self.trainer.device)

    def state_dict(self) -> dict:
        return {} if self.replay is None else {"replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.replay is not None:
            self.replay.load_state_dict(state["replay"])
