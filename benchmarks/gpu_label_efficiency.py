"""One seed of the key label-efficiency rows at the paper's CamVid scale, on one GPU, in a
time budget (issue 12: at most 9 minutes on one H200-class GPU).

1. Calibrate: seconds per S4AL and per supervised iteration of the protocol's crop on this
   device (`model.train.Trainer` on the real images, after a warm-up).
2. Scale the protocol's schedule (`--iterations-scale` of model.simulate) so that the
   longest process fits `--budget-s` seconds of training, with every process sharing the
   device slowed by `--contention`. The cycle lengths keep the paper's ratios (1 : 1 : 2).
3. Run the rows as parallel `python -m model.simulate` processes into one `--out`:
   `entropy-regions` and `random-regions` (they share cycle 0: the second waits for it),
   `full` and `initial-only`; then print the report (`results.md`) and the wall time.

    python -m benchmarks.gpu_label_efficiency --data DIR \
        --split benchmarks/splits/camvid/labeled_10pct_seed0.txt \
        --out benchmarks/results/camvid-gpu-seed0

The protocol is `camvid-gpu` (360x480, 10% start, 30 px blocks, AMP + channels_last); the
defaults leave about 2 minutes of the 9 to start-up, evaluation and acquisition. `--protocol
smoke --device cpu` runs the same plan in seconds on the test fixture (tests use it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from model.data import load_folder, read_classes, read_split
from model.protocols import PROTOCOLS, parse_row
from model.simulation import cycle_config
from model.train import Trainer

ROWS = ("entropy-regions", "random-regions", "full", "initial-only")
ROOT = Path(__file__).resolve().parents[1]


def seconds_per_iteration(method: str, protocol, data: Path, split: Path, device: str) -> float:
    """Mean seconds of 20 iterations after 5 of warm-up (kernels chosen, caches filled)."""
    samples = load_folder(data, "train", protocol.downscale)
    names = set(read_split(split))
    labelled = [s for s in samples if s.name in names]
    pool = [replace(s, mask=None) for s in samples if s.name not in names]
    config = replace(
        cycle_config_for(protocol, method, device), iterations=10**6, cold_start_iterations=0
    )
    trainer = Trainer(config, labelled, pool, len(read_classes(data)))
    if method == "s4al":
        trainer.step.replay.add(range(min(len(pool), protocol.replay_size)))
    for _ in range(5):
        trainer.run_step()
    synchronise(device)
    started = time.perf_counter()
    for _ in range(20):
        trainer.run_step()
    synchronise(device)
    return (time.perf_counter() - started) / 20


def cycle_config_for(protocol, method: str, device: str):
    """The TrainConfig the simulator trains cycle 1 of such a row with."""
    context = argparse.Namespace(protocol=protocol, seed=0, device=device)
    spec = parse_row("entropy-regions" if method == "s4al" else "full")
    return cycle_config(context, spec, 1)


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plan_scale(protocol, ssl_s: float, sup_s: float, budget_s: float, contention: float) -> float:
    """The largest iterations scale (at most 1) at which the slowest process trains within
    the budget: an acquisition row trains every cycle with S4AL steps (the second one waits
    for the shared cycle 0 as long as the first trains it), full and initial-only with
    supervised ones."""
    total = sum(protocol.iterations)
    longest = max(total * ssl_s, total * sup_s) * contention
    return min(1.0, budget_s / longest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="CamVid-layout folder")
    parser.add_argument("--split", type=Path, required=True, help="start set (10% split)")
    parser.add_argument("--out", type=Path, required=True, help="simulator output folder")
    parser.add_argument("--protocol", default="camvid-gpu", choices=sorted(PROTOCOLS))
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--budget-s", type=float, default=390.0, help="training seconds of the slowest process"
    )
    parser.add_argument(
        "--contention",
        type=float,
        default=1.6,
        help="slow-down of each process when all share the device (default 1.6)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    protocol = PROTOCOLS[args.protocol]
    ssl_s = seconds_per_iteration("s4al", protocol, args.data, args.split, args.device)
    sup_s = seconds_per_iteration("supervised", protocol, args.data, args.split, args.device)
    scale = plan_scale(protocol, ssl_s, sup_s, args.budget_s, args.contention)
    cycles = [max(1, round(i * scale)) for i in protocol.iterations]
    print(
        f"{args.device}: {ssl_s:.3f} s per S4AL iteration, {sup_s:.3f} s per supervised one; "
        f"schedule x{scale:.3f} of {list(protocol.iterations)} -> {cycles}",
        flush=True,
    )
    common = [
        sys.executable, "-m", "model.simulate", "--data", str(args.data),
        "--split", str(args.split), "--protocol", args.protocol, "--seed", str(args.seed),
        "--out", str(args.out), "--device", args.device, "--resume",
        "--iterations-scale", str(scale), "--threads", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    processes = [subprocess.Popen([*common, "--rows", row], cwd=ROOT, env=env) for row in ROWS]
    codes = [process.wait() for process in processes]
    print((args.out / "results.md").read_text() if (args.out / "results.md").exists() else "")
    print(f"wall time {time.monotonic() - started:.0f} s; exit codes {codes}")
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
