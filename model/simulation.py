"""The simulator's loop (model.simulate is its CLI and describes the rows and the output
folder): per row, cycles of acquire -> reveal -> train -> evaluate, each saved so a row can
resume; cycle 0 shared by rows that train it identically; the report rebuilt after every
cycle. A lock per row (and per shared cycle 0) keeps processes that share one --out from
writing the same file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from model import acquisition as acq
from model.atomic import atomic_write, atomic_write_bytes
from model.config import TrainConfig
from model.data import IGNORE_INDEX, Sample
from model.oracle import LabelState
from model.protocols import Protocol, RowSpec

CHECKPOINT_EVERY_S = 600.0  # an unfinished cycle's state is saved this often (--resume)


class SimulationError(RuntimeError):
    """A run that cannot go on as asked (busy row, settings changed, missing method)."""


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
    extra_eval: dict[str, list[Sample]] = field(default_factory=dict)  # "DIR:SPLIT" -> samples
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
        crop_size=(p.crop, p.crop_width or p.crop),
        strong_zoom=p.strong_zoom,
        eval_every=p.eval_every,
        eval_batch_size=p.eval_batch_size,
        amp=p.amp,
        channels_last=p.channels_last,
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


def evaluate_networks(ctx: Context, nets: dict, samples: Sequence[Sample] | None = None) -> dict:
    from model.metrics import evaluate

    p = ctx.protocol
    return {
        name: evaluate(net, samples or ctx.val, ctx.num_classes, p.eval_batch_size, ctx.device)
        for name, net in nets.items()
    }


def train_and_evaluate(
    ctx: Context,
    spec: RowSpec,
    cycle: int,
    labels: LabelState,
    init_state,
    partial: Path | None = None,
    partial_extra: dict | None = None,
):
    """Train one cycle and evaluate it -> (state, networks, metrics, train_s, eval_s).

    With ``partial`` (a path), the unfinished cycle's state (and ``partial_extra``) is saved
    there about every ``CHECKPOINT_EVERY_S`` seconds and training resumes from it, so a
    stopped run loses at most that much of a cycle; the file goes once the cycle ends."""
    from model.methods import STEPS
    from model.methods.tsf import VARIANTS
    from model.refinement import plar_audit

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
    result = _fit(
        ctx, spec, cycle, config, labelled, unlabelled, init_state, partial, partial_extra
    )
    train_s = time.monotonic() - started
    nets = {"student": result.student.eval(), "teacher": result.teacher.eval()}
    metrics = {"curve": _curve(result.history)}
    started = time.monotonic()
    metrics.update(evaluate_networks(ctx, nets))
    eval_s = time.monotonic() - started
    if spec.method in VARIANTS:  # tsf-plar and its ablations: PLAR's decisions vs the truth
        truth = {s.name: s.mask for s in ctx.train}
        metrics["plar"] = plar_audit(
            result.state, unlabelled, [truth[s.name] for s in unlabelled], ctx.device, limit=64
        )
    return _slim(result.state), nets, metrics, train_s, eval_s


def _fit(ctx, spec, cycle, config, labelled, unlabelled, init_state, partial, partial_extra):
    """Trainer.fit, resumed from and saving to the ``partial`` file (train_and_evaluate)."""
    from model.train import Trainer

    unfinished = _load_partial(partial, config)
    if unfinished:
        ctx.log(f"[{spec.name} cycle {cycle}] resuming at iteration {unfinished['iteration']}")
    trainer = Trainer(config, labelled, unlabelled, ctx.num_classes, unfinished or init_state)
    log = _progress_logger(ctx, spec, cycle)
    saved = [time.monotonic()]

    def progress(info: dict) -> None:
        log(info)
        if partial and time.monotonic() - saved[0] > CHECKPOINT_EVERY_S:
            # not where a record is due: the saved history would lack it
            due = config.eval_every and trainer.iteration % config.eval_every == 0
            if info["phase"] != "evaluate" and not due and trainer.iteration < config.iterations:
                state = {"train_state": trainer.state_dict(), **(partial_extra or {})}
                atomic_torch_save(state, partial)
                saved[0] = time.monotonic()

    result = trainer.fit(ctx.val if config.eval_every else None, progress)
    if partial:
        partial.unlink(missing_ok=True)
    return result


def _load_partial(path: Path | None, config: TrainConfig) -> dict | None:
    """An unfinished cycle's trainer state saved at ``path`` for this very config, or None."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)["train_state"]
    if TrainConfig.from_dict(state["config"]) != config:  # keys added since: their defaults
        print(f"warning: {path} was saved with other settings; training the cycle afresh")
        return None
    return state


def _curve(history: list[dict]) -> list[dict]:
    """The cycle's val curve: (iteration, teacher and student mIoU, mean loss) per record."""
    keys = ("iteration", "teacher_miou", "student_miou", "loss", "elapsed_s")
    return [
        {k: entry[k] for k in keys if k in entry} for entry in history if "teacher_miou" in entry
    ]


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
        state, nets, metrics, train_s, eval_s = train_and_evaluate(
            ctx, spec, 0, labels, None, partial=path.with_suffix(".partial.pt")
        )
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
        "backbone_weights": backbone_note(ctx.protocol.backbone_weights),
        **ctx.extra,
    }


def backbone_note(value: str | None) -> str:
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
    # a field added later (None by default) was not in older states: absent == None
    kept["protocol"] = {k: v for k, v in protocol.items() if v is not None}
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
            for path in [*state_dir.glob("cycle*.pt"), *state_dir.glob("partial-cycle*.pt")]:
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
    partial = row_paths(ctx.out, spec.name)[1] / f"partial-cycle{cycle}.pt"  # not cycle*.pt
    pending = torch.load(partial, weights_only=False) if partial.exists() else None
    revealed = None
    if pending:  # stopped mid-cycle: its acquisition is done already
        labels.restore(pending["labels"])
        revealed = pending["revealed"]
    elif cycle > 0 and spec.acquisition:
        revealed = acquire(ctx, spec, cycle, labels, nets, init_state)
    shared = False
    if cycle == 0 and ctx.share_cycle0 and spec.start == "split" and spec.method != "supervised":
        state, nets, metrics, train_s, eval_s, shared = shared_cycle0(ctx, spec, labels)
    else:
        state, nets, metrics, train_s, eval_s = train_and_evaluate(
            ctx,
            spec,
            cycle,
            labels,
            init_state if ctx.protocol.warm_start else None,
            partial=partial,
            partial_extra={"labels": labels.to_dict(), "revealed": revealed},
        )
    headline = metrics[ctx.protocol.eval_with]
    extra = {name: evaluate_networks(ctx, nets, s) for name, s in ctx.extra_eval.items()}
    record = {
        "cycle": cycle,
        "iterations": ctx.protocol.iterations[cycle],
        **_label_counts(ctx, labels),
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
        "curve": metrics.get("curve", []),
        **({"extra_eval": extra} if extra else {}),
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
    document = _save_cycle(ctx, spec, cycle, settings, records, labels, state)
    ctx.log(
        f"[{spec.name} cycle {cycle}] mIoU {100 * record['miou']:.1f} "
        f"({ctx.protocol.eval_with}; student {100 * metrics['student']['miou']:.1f}) at "
        f"{100 * record['labelled_fraction']:.2f}% labelled pixels; cycle "
        f"{record['cycle_wall_s'] / 60:.1f} min, peak RSS {record['peak_rss_mb']:.0f} MB"
    )
    return {**document, "_state": state, "_nets": nets}


def _label_counts(ctx: Context, labels: LabelState) -> dict:
    total = labels.total_pixels
    n = len(ctx.train)
    return {
        "labelled_pixels": labels.labelled_pixels(),
        "labelled_fraction": labels.labelled_pixels() / total,
        "labelled_valid_fraction": labels.labelled_valid_pixels() / total,
        "full_images": int(sum(labels.is_full(i) for i in range(n))),
        "partial_images": int(
            sum(labels.labelled[i].any() and not labels.is_full(i) for i in range(n))
        ),
    }


def _save_cycle(ctx, spec, cycle, settings, records, labels, state) -> dict:
    """The cycle's state (for --resume) and the row's JSON, then the report."""
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
    update_report(ctx)
    return document


def update_report(ctx: Context) -> None:
    from model.report import write_report

    try:
        write_report(ctx.out)
    except Exception as error:  # noqa: BLE001 - a report problem never stops a long run
        print(f"warning: report not written: {error}", file=sys.stderr)
