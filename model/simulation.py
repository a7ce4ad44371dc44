"""Offline active learning with an oracle: how much of full supervision for how few pixels.

Every row of a comparison starts from the same split file (fully labelled images) and runs
the same cycles: cycle 0 trains on the start set; each later cycle first acquires (scores
the pool with the previous cycle's network, selects blocks or images, reveals the ground
truth inside them: partial masks, 255 elsewhere), then trains again, warm-started from the
previous cycle's student and teacher. After every cycle the teacher and the student are
evaluated on val.

Rows (``--rows``, comma-separated):
  full               supervised on every train image, fully labelled (the reference)
  initial-only       supervised on the split's images only
  <method>           a training method of model.train without acquisition
                     (supervised, mean-teacher, s4al, tsf-plar)
  <h>-regions        S4AL training, blocks acquired with heuristic h
                     (entropy, margin, least-confidence, random)
  image-<h>          S4AL training, whole images acquired with h, same pixel budget
  <row>@<method>     any acquisition row with another training method,
                     e.g. entropy-regions@tsf-plar

Output in ``--out``: ``rows/<row>.json`` (one file per row: settings and one record per
cycle), ``state/<row>/cycle<k>.pt`` (training state and acquired labels after cycle k, for
``--resume``), ``shared/`` (cycle 0 shared by rows that train it identically) and the report
``results.json``, ``results.md``, ``results.png`` (model.report), rebuilt from whatever rows
exist after every cycle. Processes running different rows into one ``--out`` never write
the same file (a lock per row; the report is replaced atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import resource
import shlex
import socket
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from model import acquisition as acq
from model.atomic import atomic_write, atomic_write_bytes
from model.config import METHODS, TrainConfig
from model.data import IGNORE_INDEX, Sample, load_folder, read_classes, read_split
from model.report import ROW_ORDER

ACQUISITION_METHOD = "s4al"


class SimulationError(RuntimeError):
    """A run that cannot go on as asked (busy row, settings changed, missing method)."""


# --------------------------------------------------------------------------- protocols
@dataclass
class Protocol:
    """Everything that must be equal across the rows of one comparison."""

    name: str
    description: str
    downscale: int  # images and masks shrink by this factor (area / nearest)
    crop: int  # square training crop
    iterations: tuple[int, ...]  # one entry per cycle; cycle 0 = the start set
    cold_start_fraction: float = 0.1  # supervised-only share of each SSL cycle (paper: 10%)
    regions_per_image: int = 4
    block: int | None = None  # None: region_size_for(training height), 30 px per 360
    selection: str = "per-image"  # per-image top-k, or "global": the same budget, best blocks
    batch_size: int = 4  # labelled, and as many unlabelled
    eval_batch_size: int = 8
    score_batch_size: int = 8
    score_with: str = "student"  # network that scores the pool
    eval_with: str = "teacher"  # network whose mIoU is the row's headline figure
    replay_size: int = 50
    lr: float = 1e-2
    backbone_weights: str | None = "auto"
    warm_start: bool = True
    ignore_aware_cost: bool = False
    rows: tuple[str, ...] = ROW_ORDER

    @property
    def cycles(self) -> int:
        return len(self.iterations)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    "camvid-cpu": Protocol(
        name="camvid-cpu",
        description="CamVid at 180x240 (downscale 2), crop 128, 15 px blocks, 4 per image, "
        "cold start + 2 acquisitions; one seed of the 6 rows in about 60-70 min as 2 "
        "processes on 2 idle cores (docs/BENCHMARKS.md)",
        downscale=2,
        crop=128,
        iterations=(250, 250, 500),
    ),
    "smoke": Protocol(
        name="smoke",
        description="seconds-long mechanics check on tests/fixtures/camvid (120x160)",
        downscale=1,
        crop=64,
        iterations=(3, 3),
        regions_per_image=2,
        batch_size=2,
        eval_batch_size=4,
        score_batch_size=4,
        replay_size=4,
        backbone_weights=None,
    ),
}


# --------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class RowSpec:
    name: str
    method: str
    start: str  # "all": every train image labelled; "split": the split file's images
    acquisition: str | None = None  # None, "regions" or "images"
    heuristic: str | None = None


def parse_row(name: str) -> RowSpec:
    """A row name -> what it trains and acquires (see the module docstring)."""
    base, _, method = name.partition("@")
    if method and method not in METHODS:
        raise ValueError(f"row {name!r}: unknown method {method!r}; choose from {METHODS}")
    if base == "full":
        return RowSpec(name, method or "supervised", "all")
    if base == "initial-only":
        return RowSpec(name, method or "supervised", "split")
    if base in METHODS and not method:
        return RowSpec(name, base, "split")
    for kind, heuristic in (
        ("regions", base.removesuffix("-regions") if base.endswith("-regions") else None),
        ("images", base.removeprefix("image-") if base.startswith("image-") else None),
    ):
        if heuristic is not None:
            if heuristic not in acq.HEURISTICS:
                raise ValueError(
                    f"row {name!r}: unknown heuristic {heuristic!r}; "
                    f"choose from {sorted(acq.HEURISTICS)}"
                )
            return RowSpec(name, method or ACQUISITION_METHOD, "split", kind, heuristic)
    raise ValueError(
        f"unknown row {name!r}: use full, initial-only, a method ({', '.join(METHODS)}), "
        "<heuristic>-regions, image-<heuristic>, optionally @<method>"
    )


# --------------------------------------------------------------------------- the oracle
class LabelState:
    """Which pixels of each train image are labelled; the oracle's masks reveal them.

    ``history`` lists the acquisitions (``("regions", [Region...])`` or ``("images",
    [index...])``) so the state can be rebuilt from the start set by replaying it.
    """

    def __init__(self, truth: Sequence[np.ndarray], start: Sequence[int]):
        self.truth = truth
        self.start = sorted(start)
        self.labelled = [np.zeros(mask.shape, dtype=bool) for mask in truth]
        for index in self.start:
            self.labelled[index][:] = True
        self.history: list[tuple[str, list]] = []

    @property
    def total_pixels(self) -> int:
        return sum(mask.size for mask in self.truth)

    def is_full(self, index: int) -> bool:
        return bool(self.labelled[index].all())

    def pool(self) -> list[int]:
        """Train images with unlabelled pixels (partially labelled ones included)."""
        return [i for i in range(len(self.truth)) if not self.is_full(i)]

    def labelled_pixels(self) -> int:
        return int(sum(mask.sum() for mask in self.labelled))

    def labelled_valid_pixels(self) -> int:
        """Labelled pixels whose label is a class (not void)."""
        return int(
            sum(
                (m & (t != IGNORE_INDEX)).sum()
                for m, t in zip(self.labelled, self.truth, strict=True)
            )
        )

    def reveal_regions(self, regions: Sequence[acq.Region]) -> dict:
        new = void = 0
        for region in regions:
            open_ = ~self.labelled[region.image_index][region.slices]
            if not open_.any():
                raise ValueError(f"{region} is already labelled")
            new += int(open_.sum())
            void += int(
                (self.truth[region.image_index][region.slices][open_] == IGNORE_INDEX).sum()
            )
            self.labelled[region.image_index][region.slices] = True
        self.history.append(("regions", list(regions)))
        return {"pixels": new, "void_pixels": void, "regions": len(regions), "images": 0}

    def reveal_images(self, indices: Sequence[int]) -> dict:
        new = void = 0
        for index in indices:
            open_ = ~self.labelled[index]
            new += int(open_.sum())
            void += int((self.truth[index][open_] == IGNORE_INDEX).sum())
            self.labelled[index][:] = True
        self.history.append(("images", [int(i) for i in indices]))
        return {"pixels": new, "void_pixels": void, "regions": 0, "images": len(indices)}

    def mask(self, index: int) -> np.ndarray | None:
        """The label the trainer sees: ground truth where labelled, 255 elsewhere."""
        if self.is_full(index):
            return self.truth[index]
        if not self.labelled[index].any():
            return None
        return np.where(self.labelled[index], self.truth[index], IGNORE_INDEX)

    def training_sets(self, train: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
        """(labelled: every image with a labelled pixel, full or partial; unlabelled: every
        image not fully labelled, carrying its partial mask or None)."""
        labelled, unlabelled = [], []
        for index, sample in enumerate(train):
            mask = self.mask(index)
            if mask is not None:
                labelled.append(Sample(sample.name, sample.image, mask))
            if not self.is_full(index):
                unlabelled.append(Sample(sample.name, sample.image, mask))
        return labelled, unlabelled

    def to_dict(self) -> dict:
        return {
            "start": list(self.start),
            "history": [
                (kind, [r.to_dict() for r in items] if kind == "regions" else items)
                for kind, items in self.history
            ],
        }

    @classmethod
    def from_dict(cls, truth: Sequence[np.ndarray], data: dict) -> LabelState:
        state = cls(truth, data["start"])
        for kind, items in data["history"]:
            if kind == "regions":
                state.reveal_regions([acq.Region(**r) for r in items])
            else:
                state.reveal_images(items)
        return state


# --------------------------------------------------------------------------- context
@dataclass
class Context:
    protocol: Protocol
    data: Path
    split: Path
    out: Path
    seed: int
    device: str
    train: list[Sample]
    val: list[Sample]
    classes: list[str]
    start: list[int]
    block: int
    share_cycle0: bool = True
    quiet: bool = False
    command: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def cycle_budget(self) -> int:
        """Pixels one acquisition may add: regions_per_image blocks for every image outside
        the start set (the per-image rule's cost, given to every acquisition row)."""
        outside = len(self.train) - len(self.start)
        return self.protocol.regions_per_image * self.block * self.block * outside

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda file: torch.save(obj, file))


def _cpu_s() -> float:
    """CPU seconds of this process (user + system): unlike wall time, not inflated when
    other processes share the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _lock(path: Path, what: str, wait: bool = False, poll_s: float = 5.0):
    """An exclusive lock file holding host and pid; a lock left by a dead process on this
    host is taken over. ``wait``: wait for a live holder instead of failing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = path.read_text().split()
            except (OSError, ValueError):
                time.sleep(0.2)  # being written right now
                continue
            if host == socket.gethostname() and not _pid_alive(int(pid)):
                path.unlink(missing_ok=True)  # stale
                continue
            if not wait:
                raise SimulationError(
                    f"{what} is in use by process {pid} on {host} ({path})"
                ) from None
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(me)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- one cycle
def cycle_config(ctx: Context, spec: RowSpec, cycle: int) -> TrainConfig:
    p = ctx.protocol
    iterations = p.iterations[cycle]
    cold = 0 if spec.method == "supervised" else round(p.cold_start_fraction * iterations)
    return TrainConfig(
        method=spec.method,
        lr=p.lr,
        iterations=iterations,
        cold_start_iterations=min(cold, iterations),
        batch_labelled=p.batch_size,
        batch_unlabelled=p.batch_size,
        replay_size=p.replay_size,
        # Supplement S1: Balanced ClassMix starts once the first acquisition has happened
        balanced_classmix=cycle > 0,
        crop_size=(p.crop, p.crop),
        eval_every=0,
        eval_batch_size=p.eval_batch_size,
        seed=ctx.seed * 1000 + cycle,
        device=ctx.device,
        backbone_weights=p.backbone_weights,
    )


def networks_from_state(state: dict, num_classes: int, device: str) -> dict[str, torch.nn.Module]:
    from model.network import network_from_weights

    return {
        "student": network_from_weights(state["student"], num_classes, device),
        "teacher": network_from_weights(state["teacher"]["model"], num_classes, device),
    }


def _slim(state: dict) -> dict:
    """A finished cycle's state without what only an unfinished cycle needs."""
    return {k: v for k, v in state.items() if k != "optimizer"}


def evaluate_networks(ctx: Context, nets: dict) -> dict:
    from model.metrics import evaluate

    p = ctx.protocol
    return {
        name: evaluate(net, ctx.val, ctx.num_classes, p.eval_batch_size, ctx.device)
        for name, net in nets.items()
    }


def train_and_evaluate(ctx: Context, spec: RowSpec, cycle: int, labels: LabelState, init_state):
    """Train one cycle and evaluate it -> (state, networks, metrics, train_s, eval_s)."""
    from model.methods import STEPS
    from model.methods.tsf import VARIANTS
    from model.refinement import plar_audit
    from model.train import train_cycle

    if spec.method not in STEPS:
        raise SimulationError(
            f"row {spec.name!r}: method {spec.method!r} has no training step yet "
            f"(model.methods.STEPS has {sorted(STEPS)})"
        )
    config = cycle_config(ctx, spec, cycle)
    labelled, unlabelled = labels.training_sets(ctx.train)
    if not spec.acquisition and spec.method == "supervised":
        unlabelled = []  # not used; keeps the trainer from building its dataset
    ctx.log(
        f"[{spec.name} cycle {cycle}] {spec.method}: {len(labelled)} labelled "
        f"({sum(labels.is_full(i) for i in range(len(ctx.train)))} full), "
        f"{len(unlabelled)} unlabelled; {config.iterations} iterations "
        f"({config.cold_start_iterations} cold start), crop {ctx.protocol.crop}"
    )
    started = time.monotonic()
    result = train_cycle(
        config,
        labelled,
        unlabelled,
        ctx.num_classes,
        val=None,
        init_state=init_state,
        progress=_progress_logger(ctx, spec, cycle),
    )
    train_s = time.monotonic() - started
    nets = {"student": result.student.eval(), "teacher": result.teacher.eval()}
    started = time.monotonic()
    metrics = evaluate_networks(ctx, nets)
    eval_s = time.monotonic() - started
    if spec.method in VARIANTS:  # tsf-plar and its ablations: PLAR's decisions vs the truth
        truth = {s.name: s.mask for s in ctx.train}
        metrics["plar"] = plar_audit(
            result.state, unlabelled, [truth[s.name] for s in unlabelled], ctx.device, limit=64
        )
    return _slim(result.state), nets, metrics, train_s, eval_s


def _progress_logger(ctx: Context, spec: RowSpec, cycle: int):
    last = [0.0]

    def progress(info: dict) -> None:
        now = time.monotonic()
        if info["iteration"] < info["total"] and now - last[0] < 60:
            return
        last[0] = now
        ctx.log(
            f"[{spec.name} cycle {cycle}] {info['phase']} {info['iteration']}/{info['total']} "
            f"loss {info['loss']:.3f}, about {info['eta_s'] / 60:.1f} min left"
        )

    return progress


def cycle0_key(ctx: Context, spec: RowSpec) -> str:
    """Rows that train cycle 0 identically (same method, start set, settings, seed, data)
    share it: the acquisition rows differ only from cycle 1 on."""
    config = cycle_config(ctx, spec, 0).to_dict()
    blob = json.dumps(
        {
            "config": config,
            "start": [ctx.train[i].name for i in ctx.start] if spec.start == "split" else "all",
            "data": str(ctx.data.resolve()),
            "downscale": ctx.protocol.downscale,
            "warm_start": ctx.protocol.warm_start,
            "train": len(ctx.train),
            "val": [s.name for s in ctx.val],
        },
        sort_keys=True,
    )
    return f"{spec.method}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def shared_cycle0(ctx: Context, spec: RowSpec, labels: LabelState):
    """Cycle 0 from ``shared/`` when another row trained it identically, else train it and
    store it there (a lock makes a second process wait instead of training it twice)."""
    path = ctx.out / "shared" / f"cycle0-{cycle0_key(ctx, spec)}.pt"
    with _lock(path.with_suffix(".lock"), f"shared cycle 0 {path.name}", wait=True):
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            ctx.log(f"[{spec.name} cycle 0] reusing {path.name} (trained by {saved['row']})")
            nets = networks_from_state(saved["state"], ctx.num_classes, ctx.device)
            return saved["state"], nets, saved["metrics"], saved["train_s"], saved["eval_s"], True
        state, nets, metrics, train_s, eval_s = train_and_evaluate(ctx, spec, 0, labels, None)
        atomic_torch_save(
            {
                "row": spec.name,
                "state": state,
                "metrics": metrics,
                "train_s": train_s,
                "eval_s": eval_s,
            },
            path,
        )
        return state, nets, metrics, train_s, eval_s, False


def pool_queue(
    ctx: Context, labels: LabelState, pool: Sequence[int], state: dict | None
) -> list[np.ndarray] | None:
    """The pixels a finished tsf cycle queues for manual labelling in each pool image (with
    its partial labels), or None for rows that queue nothing."""
    from model.refinement import queued_maps

    samples = [Sample(ctx.train[i].name, ctx.train[i].image, labels.mask(i)) for i in pool]
    return queued_maps(state, samples, ctx.device)


def queue_coverage(queued: list[np.ndarray] | None, chosen: Sequence[acq.Region]) -> dict:
    """How many queued pixels there were and how many of them the chosen regions cover."""
    if queued is None:
        return {}
    covered = sum(int(queued[r.image_index][r.slices].sum()) for r in chosen)
    return {"queued_pixels": int(sum(q.sum() for q in queued)), "queued_acquired": covered}


def acquire(
    ctx: Context, spec: RowSpec, cycle: int, labels: LabelState, nets: dict, state: dict
) -> dict:
    """Score the pool with the previous cycle's network and reveal the selected pixels.
    A tsf row's queued pixels (PLAR's disagreements, or its error mask) are labelled first
    (`model.acquisition.prioritise`)."""
    p = ctx.protocol
    pool = labels.pool()
    heuristic = acq.get_heuristic(spec.heuristic, seed=ctx.seed * 1000 + cycle)
    samples = [ctx.train[i] for i in pool]
    cost_masks = [ctx.train[i].mask != IGNORE_INDEX for i in pool] if p.ignore_aware_cost else None
    started = time.monotonic()
    queued = pool_queue(ctx, labels, pool, state)
    scores = acq.score_pool(
        nets[p.score_with],
        samples,
        heuristic,
        ctx.block,
        [labels.labelled[i] for i in pool],
        batch_size=p.score_batch_size,
        device=ctx.device,
        cost_masks=cost_masks,
        priority_maps=queued,
        priority_weight=math.log(ctx.num_classes),  # the entropy's range: queued first
        progress=not ctx.quiet,
        log=ctx.log,
    )
    budget = ctx.cycle_budget
    if spec.acquisition == "regions":
        if p.selection == "per-image":
            chosen = acq.select_blocks(scores.grids, per_image=p.regions_per_image)
        else:
            chosen = acq.select_blocks(scores.grids, budget=budget)
        queue_report = queue_coverage(queued, chosen)
        chosen = [replace(region, image_index=pool[region.image_index]) for region in chosen]
        revealed = labels.reveal_regions(chosen)
        revealed.update(queue_report)
    else:
        open_pixels = [int((~labels.labelled[i]).sum()) for i in pool]
        count = max(1, round(budget / (sum(open_pixels) / len(open_pixels))))
        picked = acq.select_images(scores.image_scores, count=count)
        revealed = labels.reveal_images([pool[i] for i in picked])
    revealed.update(
        {
            "heuristic": spec.heuristic,
            "budget_pixels": budget,
            "pool_images": len(pool),
            "void_fraction": revealed["void_pixels"] / max(revealed["pixels"], 1),
            "scoring_images_per_s": scores.images_per_s,
            "seconds": time.monotonic() - started,
        }
    )
    ctx.log(
        f"[{spec.name} cycle {cycle}] acquired {revealed['pixels']} px "
        f"({revealed['regions']} regions, {revealed['images']} images; "
        f"{100 * revealed['void_fraction']:.1f}% void) in {revealed['seconds']:.1f} s"
    )
    return revealed


# --------------------------------------------------------------------------- one row
def row_paths(out: Path, row: str) -> tuple[Path, Path]:
    return out / "rows" / f"{row}.json", out / "state" / row


def _row_settings(ctx: Context, spec: RowSpec) -> dict:
    return {
        "row": spec.name,
        "method": spec.method,
        "start": spec.start,
        "acquisition": spec.acquisition,
        "heuristic": spec.heuristic,
        "protocol": ctx.protocol.to_dict(),
        "block": ctx.block,
        "cycle_budget_pixels": ctx.cycle_budget if spec.acquisition else 0,
        "seed": ctx.seed,
        "data": str(ctx.data),
        "split": str(ctx.split),
        "train_images": len(ctx.train),
        "val_images": len(ctx.val),
        "image_size": list(ctx.train[0].image.shape[:2]),
        "classes": ctx.classes,
        "backbone_weights": _backbone_note(ctx.protocol.backbone_weights),
        **ctx.extra,
    }


def _backbone_note(value: str | None) -> str:
    from model.network import resolve_backbone_weights

    resolved = resolve_backbone_weights(value)
    return resolved if resolved else "none (random initialisation)"


def _comparable(settings: dict, cycles_done: int) -> dict:
    """The settings a resumed row must share with its saved state: everything that shapes
    results, up to the cycles already run (a resumed run may add cycles)."""
    ignore = {"command", "torch", "threads", "host"}
    kept = {k: v for k, v in settings.items() if k not in ignore}
    protocol = dict(kept["protocol"])
    protocol["iterations"] = list(protocol["iterations"])[:cycles_done]
    protocol.pop("rows", None)
    protocol.pop("description", None)
    kept["protocol"] = protocol
    return kept


def _load_latest_state(state_dir: Path) -> dict | None:
    files = sorted(state_dir.glob("cycle*.pt"), key=lambda p: int(p.stem.removeprefix("cycle")))
    for path in reversed(files):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - a torn file: fall back to the previous
            print(f"warning: cannot read {path} ({error}); trying an earlier cycle")
    return None


def run_row(ctx: Context, spec: RowSpec, resume: bool, overwrite: bool) -> dict:
    """Run (or continue) one row; returns its JSON document."""
    row_json, state_dir = row_paths(ctx.out, spec.name)
    with _lock(state_dir / "lock", f"row {spec.name!r}"):
        settings = _row_settings(ctx, spec)
        saved = _load_latest_state(state_dir)
        if saved is not None and not (resume or overwrite):
            raise SimulationError(
                f"row {spec.name!r} already has results in {ctx.out} (cycle "
                f"{saved['cycle']}); pass --resume to continue it or --overwrite to restart"
            )
        if saved is not None and overwrite:
            for path in state_dir.glob("cycle*.pt"):
                path.unlink()
            saved = None
        truth = [sample.mask for sample in ctx.train]
        start = ctx.start if spec.start == "split" else range(len(ctx.train))
        if saved is None:
            labels, records, init_state, nets, first = LabelState(truth, start), [], None, None, 0
        else:
            done = saved["cycle"] + 1
            before, now = _comparable(saved["settings"], done), _comparable(settings, done)
            if before != now:
                diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
                raise SimulationError(
                    f"row {spec.name!r} in {ctx.out} was run with other settings ({diff}); "
                    "use the same options, or --overwrite"
                )
            labels = LabelState.from_dict(truth, saved["labels"])
            records, init_state = saved["records"], saved["train_state"]
            nets = networks_from_state(init_state, ctx.num_classes, ctx.device)
            first = saved["cycle"] + 1
            ctx.log(f"[{spec.name}] resuming after cycle {saved['cycle']}")
        document = {**settings, "cycles": records}
        for cycle in range(first, ctx.protocol.cycles):
            document = run_cycle(ctx, spec, cycle, labels, records, init_state, nets, settings)
            init_state = document.pop("_state")  # run_cycle trains from it only with warm start
            nets = document.pop("_nets")
        document["complete"] = len(records) == ctx.protocol.cycles
        atomic_write_bytes(row_json, json.dumps(document, indent=1).encode())
        return document


def run_cycle(ctx, spec, cycle, labels, records, init_state, nets, settings) -> dict:
    started, cpu_started = time.monotonic(), _cpu_s()
    revealed = None
    if cycle > 0 and spec.acquisition:
        revealed = acquire(ctx, spec, cycle, labels, nets, init_state)
    shared = False
    if cycle == 0 and ctx.share_cycle0 and spec.start == "split" and spec.method != "supervised":
        state, nets, metrics, train_s, eval_s, shared = shared_cycle0(ctx, spec, labels)
    else:
        state, nets, metrics, train_s, eval_s = train_and_evaluate(
            ctx, spec, cycle, labels, init_state if ctx.protocol.warm_start else None
        )
    headline = metrics[ctx.protocol.eval_with]
    total = labels.total_pixels
    record = {
        "cycle": cycle,
        "iterations": ctx.protocol.iterations[cycle],
        "labelled_pixels": labels.labelled_pixels(),
        "labelled_fraction": labels.labelled_pixels() / total,
        "labelled_valid_fraction": labels.labelled_valid_pixels() / total,
        "full_images": int(sum(labels.is_full(i) for i in range(len(ctx.train)))),
        "partial_images": int(
            sum(labels.labelled[i].any() and not labels.is_full(i) for i in range(len(ctx.train)))
        ),
        "acquired": revealed,
        "miou": headline["miou"],
        "iou": headline["iou"],
        "pixel_accuracy": headline["pixel_accuracy"],
        "eval_with": ctx.protocol.eval_with,
        "teacher": metrics["teacher"],
        "student": metrics["student"],
        "train_s": train_s,
        "eval_s": eval_s,
        "cycle0_shared": shared,
        **({"plar": metrics["plar"]} if "plar" in metrics else {}),  # tsf rows (model.refinement)
        "cycle_wall_s": time.monotonic() - started,
        "cycle_cpu_s": _cpu_s() - cpu_started,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if ctx.protocol.ignore_aware_cost:
        record["labelled_fraction"] = record["labelled_valid_fraction"]
    record["wall_s"] = (records[-1]["wall_s"] if records else 0.0) + record["cycle_wall_s"]
    record["cpu_s"] = (records[-1].get("cpu_s", 0.0) if records else 0.0) + record["cycle_cpu_s"]
    records.append(record)
    row_json, state_dir = row_paths(ctx.out, spec.name)
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(
        {
            "cycle": cycle,
            "settings": settings,
            "records": records,
            "labels": labels.to_dict(),
            "train_state": state,
        },
        state_dir / f"cycle{cycle}.pt",
    )
    document = {**settings, "cycles": records, "complete": len(records) == ctx.protocol.cycles}
    row_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(row_json, json.dumps(document, indent=1).encode())
    _write_report(ctx)
    ctx.log(
        f"[{spec.name} cycle {cycle}] mIoU {100 * record['miou']:.1f} "
        f"({ctx.protocol.eval_with}; student {100 * metrics['student']['miou']:.1f}) at "
        f"{100 * record['labelled_fraction']:.2f}% labelled pixels; cycle "
        f"{record['cycle_wall_s'] / 60:.1f} min, peak RSS {record['peak_rss_mb']:.0f} MB"
    )
    return {**document, "_state": state, "_nets": nets}


def _write_report(ctx: Context) -> None:
    from model.report import write_report

    try:
        write_report(ctx.out)
    except Exception as error:  # noqa: BLE001 - a report problem never stops a long run
        print(f"warning: report not written: {error}", file=sys.stderr)


# --------------------------------------------------------------------------- CLI
def _describe(protocol: Protocol) -> str:
    skip = {"name", "description", "rows"}
    values = ", ".join(
        f"{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
        for k, v in protocol.to_dict().items()
        if k not in skip
    )
    return "\n".join(
        [f"  {protocol.name}: {protocol.description}"]
        + textwrap.wrap(
            values, 88, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.simulate",
        description=__doc__.split("\n\n")[0]
        + " Runs rows x cycles of train -> acquire -> reveal on a folder dataset "
        "(root/train, root/trainannot, root/val, root/valannot, root/classes.json).",
        epilog="\n\n".join(__doc__.split("\n\n")[1:])
        + "\n\nProtocols (the overrides' defaults):\n"
        + "\n".join(_describe(p) for p in PROTOCOLS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = parser.add_argument
    arg("--data", type=Path, help="dataset root (required unless --report-only)")
    arg(
        "--split",
        type=Path,
        help="file naming the start set's train images, one a line (required unless --report-only)",
    )
    arg(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="camvid-cpu",
        help="named preset of every setting below (default: camvid-cpu)",
    )
    arg(
        "--rows",
        help="comma-separated rows to run in this process, in order "
        f"(default: the protocol's, {','.join(ROW_ORDER)})",
    )
    arg(
        "--out",
        type=Path,
        required=True,
        help="output folder, shared by all processes of one comparison",
    )
    arg("--seed", type=int, default=0, help="training and random-acquisition seed (default 0)")
    arg(
        "--resume",
        action="store_true",
        help="continue rows that have state in --out (settings must match)",
    )
    arg("--overwrite", action="store_true", help="restart rows that have state in --out")
    arg(
        "--report-only",
        action="store_true",
        help="only rebuild results.json/.md/.png from the rows in --out",
    )
    over = parser.add_argument_group("protocol overrides (default: the preset's value)")
    over.add_argument(
        "--iterations",
        help="iterations per cycle, comma-separated "
        "(the number of entries is the number of cycles)",
    )
    over.add_argument(
        "--iterations-scale",
        type=float,
        default=1.0,
        help="multiply every cycle's iterations (default 1)",
    )
    over.add_argument("--cycles", type=int, help="keep only the first N cycles")
    over.add_argument("--downscale", type=int, help="image/mask downscale factor")
    over.add_argument("--crop", type=int, help="square training crop")
    over.add_argument(
        "--cold-start-fraction", type=float, help="supervised-only share of each SSL cycle"
    )
    over.add_argument(
        "--block", type=int, help="block side in px (default: 30 px per 360 px of training height)"
    )
    over.add_argument(
        "--regions-per-image",
        type=int,
        help="blocks per image and cycle; also sets every acquisition's pixel budget",
    )
    over.add_argument(
        "--selection",
        choices=["per-image", "global"],
        help="per-image top-k blocks, or the same pixel budget spent on the "
        "best blocks across images",
    )
    over.add_argument(
        "--score-with", choices=["student", "teacher"], help="network that scores the pool"
    )
    over.add_argument(
        "--eval-with",
        choices=["student", "teacher"],
        help="network whose mIoU is the headline (both are recorded)",
    )
    over.add_argument("--batch-size", type=int, help="labelled (and unlabelled) batch")
    over.add_argument("--replay-size", type=int, help="Balanced ClassMix replay buffer size")
    over.add_argument("--lr", type=float, help="initial learning rate (poly decay)")
    over.add_argument("--backbone-weights", help="'auto', 'imagenet', a file, or 'none'")
    over.add_argument(
        "--no-warm-start",
        action="store_true",
        help="restart every cycle "
        "from the backbone weights (the authors' code) instead of continuing",
    )
    over.add_argument(
        "--ignore-aware-cost",
        action="store_true",
        help="count only pixels that get a class label (not void) as labelled and in budgets",
    )
    run = parser.add_argument_group("running")
    run.add_argument(
        "--no-share-cycle0",
        action="store_true",
        help="train cycle 0 in every "
        "row instead of sharing it between rows that train it identically",
    )
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    run.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    run.add_argument(
        "--limit-train",
        type=int,
        help="use only the first N train images "
        "(start set kept); for quick trials, not for results",
    )
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    p = PROTOCOLS[args.protocol]
    changes: dict = {}
    if args.iterations:
        changes["iterations"] = tuple(int(x) for x in args.iterations.split(","))
    iterations = changes.get("iterations", p.iterations)
    if args.iterations_scale != 1.0:
        iterations = tuple(max(1, round(i * args.iterations_scale)) for i in iterations)
    if args.cycles:
        iterations = iterations[: args.cycles]
    changes["iterations"] = tuple(iterations)
    simple = {
        "downscale": args.downscale,
        "crop": args.crop,
        "cold_start_fraction": args.cold_start_fraction,
        "block": args.block,
        "regions_per_image": args.regions_per_image,
        "selection": args.selection,
        "score_with": args.score_with,
        "eval_with": args.eval_with,
        "batch_size": args.batch_size,
        "replay_size": args.replay_size,
        "lr": args.lr,
    }
    changes.update({k: v for k, v in simple.items() if v is not None})
    if args.backbone_weights is not None:
        bw = args.backbone_weights
        changes["backbone_weights"] = None if bw == "none" else bw
    if args.no_warm_start:
        changes["warm_start"] = False
    if args.ignore_aware_cost:
        changes["ignore_aware_cost"] = True
    return replace(p, **changes)


def build_context(args: argparse.Namespace, protocol: Protocol) -> Context:
    classes = read_classes(args.data)
    train = load_folder(args.data, "train", protocol.downscale)
    val = load_folder(args.data, "val", protocol.downscale)
    names = read_split(args.split)
    by_name = {sample.name: i for i, sample in enumerate(train)}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise SystemExit(
            f"{args.split}: {len(missing)} names not in {args.data / 'train'}, e.g. {missing[0]}"
        )
    if any(sample.mask is None for sample in train + val):
        raise SystemExit(f"{args.data}: the oracle needs masks for every train and val image")
    if args.limit_train:
        keep = set(by_name[n] for n in names)
        keep |= set(i for i in range(len(train)) if i not in keep and len(keep) < args.limit_train)
        train = [s for i, s in enumerate(train) if i in keep]
        by_name = {sample.name: i for i, sample in enumerate(train)}
    height = train[0].image.shape[0]
    block = protocol.block or acq.region_size_for(height)
    extra = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "limit_train": args.limit_train,
    }
    return Context(
        protocol=protocol,
        data=args.data,
        split=args.split,
        out=args.out,
        seed=args.seed,
        device=args.device,
        train=train,
        val=val,
        classes=classes,
        start=sorted(by_name[n] for n in names),
        block=block,
        share_cycle0=not args.no_share_cycle0,
        quiet=args.quiet,
        command=shlex.join(["python", "-m", "model.simulate", *sys.argv[1:]]),
        extra=extra,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report_only:
        from model.report import write_report

        paths = write_report(args.out)
        print("\n".join(str(p) for p in paths))
        return 0
    if args.data is None or args.split is None:
        parser.error("--data and --split are required (unless --report-only)")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    torch.set_num_threads(args.threads)
    protocol = protocol_from_args(args)
    rows = args.rows.split(",") if args.rows else list(protocol.rows)
    try:
        specs = [parse_row(row.strip()) for row in rows if row.strip()]
    except ValueError as error:
        parser.error(str(error))
    ctx = build_context(args, protocol)
    ctx.extra["command"] = ctx.command
    ctx.log(
        f"{protocol.name}: {len(ctx.train)} train ({len(ctx.start)} in the start set), "
        f"{len(ctx.val)} val images at {ctx.train[0].image.shape[0]}x"
        f"{ctx.train[0].image.shape[1]}; block {ctx.block} px; iterations "
        f"{list(protocol.iterations)}; rows {[s.name for s in specs]}; backbone "
        f"{_backbone_note(protocol.backbone_weights)}"
    )
    try:
        for spec in specs:
            run_row(ctx, spec, args.resume, args.overwrite)
    except SimulationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _write_report(ctx)
    ctx.log(f"report: {ctx.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
