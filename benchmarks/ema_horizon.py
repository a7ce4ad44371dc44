"""Teacher against student at the end of short and warm-started cycles, EMA horizon fixed
(decay 0.99, the paper's) or relative to the cycle (TrainConfig.ema_horizon).

Cycle 0 trains on a start split; cycle 1 warm-starts from it (learning rate restarted, as
every later active-learning cycle does) on the same labels. Both cycles run once per EMA
rule from the same weights and seed; the val mIoU of teacher and student after each is
printed side by side, with the gap the service would publish (it serves the teacher).
Supervised steps keep it cheap: the EMA rule does not depend on the loss.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.ema_horizon --data DIR --split FILE
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from model.config import TrainConfig
from model.data import load_folder, read_classes, read_split
from model.metrics import evaluate
from model.train import train_cycle


def run(config: TrainConfig, labelled, val, num_classes, iterations, init=None):
    cycle = replace(config, iterations=iterations, cold_start_iterations=0)
    result = train_cycle(cycle, labelled, [], num_classes, init_state=init)
    scores = {
        name: 100 * evaluate(net.eval(), val, num_classes, 8, cycle.device)["miou"]
        for name, net in (("teacher", result.teacher), ("student", result.student))
    }
    return result.state, scores, cycle.teacher_momentum()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="CamVid-layout folder")
    parser.add_argument("--split", type=Path, required=True, help="start set, one name a line")
    parser.add_argument("--cycles", default="500,250", help="iterations of cycle 0 and 1")
    parser.add_argument("--downscale", type=int, default=2)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--amp", default="bf16", help="off or bf16 (default, as camvid-lab)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    names = set(read_split(args.split))
    labelled = [s for s in load_folder(args.data, "train", args.downscale) if s.name in names]
    val = load_folder(args.data, "val", args.downscale)
    num_classes = len(read_classes(args.data))
    first, second = (int(x) for x in args.cycles.split(","))
    print(
        f"{len(labelled)} labelled images, cycles {first} + {second} (warm start), "
        f"crop {args.crop}, amp {args.amp}; val mIoU % of {len(val)} images"
    )
    print(
        f"{'seed':>4} {'EMA':<9} {'cycle':>5} {'decay':>6} {'teacher':>8} {'student':>8} "
        f"{'T - S':>6}"
    )
    for seed in (int(s) for s in args.seeds.split(",")):
        # a horizon longer than any cycle leaves the decay at ema_momentum: the fixed rule
        for rule, horizon in (("fixed", 1e9), ("relative", TrainConfig().ema_horizon)):
            config = TrainConfig(
                method="supervised",
                crop_size=(args.crop, args.crop),
                amp=args.amp,
                channels_last=args.amp != "off",
                seed=seed,
                device="cpu",
                ema_horizon=horizon,
            )
            state = None
            for cycle, iterations in enumerate((first, second)):
                state, scores, decay = run(config, labelled, val, num_classes, iterations, state)
                gap = scores["teacher"] - scores["student"]
                print(
                    f"{seed:>4} {rule:<9} {cycle:>5} {decay:6.3f} {scores['teacher']:8.1f} "
                    f"{scores['student']:8.1f} {gap:+6.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
