"""Cost of one S4AL training step against one supervised step of the same batch.

Both steps run in one process on the same labelled batch (and, for S4AL, the same unlabelled
batch): forward, backward, SGD step and EMA update. The S4AL step also pseudo-labels the
weak views and the replayed images with the teacher, mixes (ClassMix + Balanced ClassMix)
and re-reads the replayed images through the dataset, as in training. Loading the shared
batches is not timed. Target (issue 2): S4AL <= 3.5x supervised. Each AMP value in --amp
(default fp32 and bf16 autocast, channels_last for bf16) is measured the same way, and a
last table puts them side by side (issue 15).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.train_step --crop 128 --batch 4
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from model.config import TrainConfig
from model.data import load_folder, read_classes
from model.precision import cpu_native_bf16, resolve_precision
from model.train import Trainer, parse_size

ROOT = Path(__file__).resolve().parents[1]

TARGET_RATIO = 3.5


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def measure(steps: dict[str, tuple[Trainer, object]], batch, repeats: int) -> dict:
    """{name: (median seconds, peak RSS GB after its warm-up)}.

    Two untimed warm-up steps each, in order (so each peak RSS includes the steps before
    it); then the timed steps interleaved round-robin, so that load from other processes
    on a shared machine falls on every method alike and their ratio stays meaningful.
    """
    peaks = {}
    for name, (trainer, step) in steps.items():
        for _ in range(2):
            trainer.train_on(step, batch)
        peaks[name] = peak_rss_gb()
    seconds = {name: [] for name in steps}
    for _ in range(repeats):
        for name, (trainer, step) in steps.items():
            started = time.perf_counter()
            trainer.train_on(step, batch)
            seconds[name].append(time.perf_counter() - started)
    return {name: (statistics.median(seconds[name]), peaks[name]) for name in steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=parse_size, default=(128, 128), help="N or HxW")
    parser.add_argument("--batch", type=int, default=4, help="labelled = unlabelled batch")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per method")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT / "tests" / "fixtures" / "camvid",
        help="folder dataset to draw the batches from",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--amp", default="off,bf16",
                        help="AMP values measured side by side (default off,bf16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    by_precision = {}
    for amp in args.amp.split(","):
        mode = resolve_precision(amp, "cuda" if args.device.startswith("cuda") else "cpu").mode
        print(f"--- AMP={amp} ({mode})")
        by_precision[mode] = run(args, amp)
    print_side_by_side(by_precision)
    return 0


def print_side_by_side(by_precision: dict[str, dict]) -> None:
    modes = list(by_precision)
    native = "native bf16" if cpu_native_bf16() else "no native bf16 (emulated)"
    print(f"seconds per step, side by side (CPU: {native})")
    print(f"{'step':<11}" + "".join(f"{m:>9}" for m in modes)
          + (f" {modes[0]}/{modes[-1]:<5}" if len(modes) > 1 else ""))
    for name in by_precision[modes[0]]:
        values = [by_precision[m][name][0] for m in modes]
        speedup = f" {values[0] / values[-1]:9.2f}x" if len(modes) > 1 else ""
        print(f"{name:<11}" + "".join(f"{v:9.3f}" for v in values) + speedup)


def run(args, amp: str) -> dict:
    """One precision: every method's step timed; prints its table, returns the results."""
    samples = load_folder(args.data, "train")
    half = len(samples) // 2
    num_classes = len(read_classes(args.data))
    config = TrainConfig(
        method="s4al",
        iterations=10**6,  # keeps the learning rate near its initial value
        cold_start_iterations=0,
        batch_labelled=args.batch,
        batch_unlabelled=args.batch,
        crop_size=args.crop,
        device=args.device,
        backbone_weights=None,  # weights do not change the cost
        amp=amp,
        channels_last=resolve_precision(amp, args.device if args.device != "auto" else "cpu")
        .enabled,
    )

    pool = [replace(s, mask=None) for s in samples[half:]]  # no acquired pixels: PLs everywhere

    def trainer_for(method: str) -> Trainer:
        trainer = Trainer(replace(config, method=method), samples[:half], pool, num_classes)
        trainer.step.replay.add(range(len(samples) - half))  # a full buffer: replay always on
        return trainer

    s4al_trainer = trainer_for("s4al")
    batch = s4al_trainer.next_batch(with_unlabelled=True)
    steps = {
        "supervised": (s4al_trainer, s4al_trainer.cold_start_step),
        "s4al": (s4al_trainer, s4al_trainer.step),
    }
    # issue 7, same batch: the friend alone ("tsf"), then with the EMD and PLAR
    for method in ("tsf", "tsf-plar"):
        trainer = trainer_for(method)
        steps[method] = (trainer, trainer.step)
    load = os.getloadavg()[0]
    results = measure(steps, batch, args.repeats)

    height, width = args.crop
    crop_px = height * width
    print(
        f"device {s4al_trainer.device}, {torch.get_num_threads()} thread(s), batch {args.batch} "
        f"(+{args.batch} unlabelled +{args.batch} replayed for s4al), crop {height}x{width}, "
        f"median of {args.repeats} interleaved, torch {torch.__version__}, "
        f"load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'step':<11} {'seconds':>8} {'input px/s':>11} {'labelled px/s':>14} {'peak RSS':>9}")
    for name, (seconds, rss) in results.items():
        crops = args.batch if name == "supervised" else 3 * args.batch  # + unlabelled, replayed
        print(
            f"{name:<11} {seconds:8.3f} {crops * crop_px / seconds:11,.0f} "
            f"{args.batch * crop_px / seconds:14,.0f} {rss:7.2f} GB"
        )
    supervised, s4al = results["supervised"][0], results["s4al"][0]
    ratio = s4al / supervised
    verdict = "within" if ratio <= TARGET_RATIO else "OVER"
    print(f"s4al / supervised = {ratio:.2f}x ({verdict} the {TARGET_RATIO}x target)")
    full, friend = results["tsf-plar"][0], results["tsf"][0]
    print(
        f"tsf-plar - s4al = +{full - s4al:.3f} s per step ({full / s4al:.2f}x s4al); "
        f"of which friend (tsf) +{friend - s4al:.3f} s, EMD + PLAR +{full - friend:.3f} s "
        f"({100 * steps['tsf-plar'][1].last['error_share']:.0f}% of pixels in the error mask)"
    )
    return results


if __name__ == "__main__":
    sys.exit(main())
