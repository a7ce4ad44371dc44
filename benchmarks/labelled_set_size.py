"""Does supervised training at the camvid-cpu schedule get worse with more labelled images?

The camvid-cpu rows whose labelled set holds all 367 train images (`full`, the acquisition
rows) end well below the rows that train on the 37 start images. This study trains the
supervised step from the same initial weights, with the same seed, crop, batch and one
poly schedule, on several labelled sets, and prints side by side, at quarters of the
schedule: val mIoU of the student and the EMA teacher, the mean training loss of the last
50 steps, and mIoU on the 37 start images (training images for every set).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.labelled_set_size \\
        --data PATH/TO/camvid --iterations 1000 --sets split,all

Sets: `split` (the --split file), `all` (every train image), `randomN` (N random train
images outside the split, seeded). `--report DIR` merges the `--out` files of several runs
in DIR into `results.md` and `results.png`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from model.config import TrainConfig
from model.data import Sample, load_folder, read_classes, read_split
from model.train import Trainer


def labelled_set(name: str, train: list[Sample], split: set[str], seed: int) -> list[Sample]:
    if name == "split":
        return [s for s in train if s.name in split]
    if name == "all":
        return list(train)
    if name.startswith("random") and name[6:].isdigit():
        rest = [s for s in train if s.name not in split]
        random.Random(seed).shuffle(rest)
        return rest[: int(name[6:])]
    raise ValueError(f"unknown set {name!r}: split, all or randomN")


def run_set(name: str, labelled, start, val, num_classes: int, args) -> list[dict]:
    """Train one set; a record at each quarter of the schedule."""
    config = TrainConfig(
        method="supervised",
        iterations=args.iterations,
        cold_start_iterations=0,
        crop_size=(args.crop, args.crop),
        batch_labelled=args.batch,
        eval_every=0,
        eval_batch_size=8,
        seed=args.seed,
        device="cpu",
    )
    trainer = Trainer(config, labelled, [], num_classes)
    losses, records = [], []
    checkpoints = {round(args.iterations * q / 4) for q in (1, 2, 3, 4)}
    for _ in tqdm(range(args.iterations), desc=f"{name} ({len(labelled)} images)"):
        losses.append(trainer.run_step()["loss"])
        if trainer.iteration in checkpoints:
            records.append(checkpoint(name, len(labelled), trainer, losses, start, val))
            print(json.dumps(records[-1]), flush=True)
    return records


def checkpoint(name, images, trainer: Trainer, losses, start, val) -> dict:
    def miou(net, samples) -> float:
        was_training = net.training
        result = trainer.evaluate(net.eval(), samples)["miou"]
        net.train(was_training)
        return round(100 * result, 1)

    return {
        "set": name,
        "images": images,
        "iteration": trainer.iteration,
        "train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "val_student": miou(trainer.student, val),
        "val_teacher": miou(trainer.teacher.model, val),
        "start_student": miou(trainer.student, start),
    }


def table(records: list[dict], *first: str) -> str:
    keys = (*first, "set", "images", "iteration", "train_loss", "val_student", "val_teacher",
            "start_student")  # fmt: skip
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in records]
    return "\n".join(lines)


def report(folder: Path) -> None:
    """Every run's JSON in `folder` -> `results.md` (one table) and `results.png` (val mIoU
    of the teacher against iterations, one line per set and schedule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    records = [dict(r, schedule=run["args"]["iterations"]) for run in runs for r in run["records"]]
    records.sort(key=lambda r: (r["schedule"], r["set"], r["iteration"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for schedule, name in sorted({(r["schedule"], r["set"]) for r in records}):
        mine = [r for r in records if (r["schedule"], r["set"]) == (schedule, name)]
        label = f"{name} ({mine[0]['images']} images), {schedule}-iteration schedule"
        ax.plot([r["iteration"] for r in mine], [r["val_teacher"] for r in mine], "o-", label=label)
    ax.set(xlabel="iteration", ylabel="val mIoU of the EMA teacher (%)",
           title="Supervised, same weights and seed: labelled-set size")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "results.png")
    plt.close(fig)
    command = "python -m benchmarks.labelled_set_size --report " + str(folder)
    text = ["# Labelled-set size at the camvid-cpu schedule", "", f"`{command}`", ""]
    (folder / "results.md").write_text("\n".join([*text, table(records, "schedule"), ""]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CamVid folder (README: Data)")
    parser.add_argument("--split", help="default: <data>/splits/labeled_10pct_seed0.txt")
    parser.add_argument("--sets", default="split,all")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--downscale", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the records as JSON here")
    parser.add_argument("--report", help="a folder of --out files: write its table and plot")
    args = parser.parse_args(argv)
    if args.report:
        report(Path(args.report))
        return 0
    data = Path(args.data)
    split = set(read_split(args.split or data / "splits" / "labeled_10pct_seed0.txt"))
    train = load_folder(data, "train", args.downscale)
    val = load_folder(data, "val", args.downscale)
    start = labelled_set("split", train, split, args.seed)
    num_classes = len(read_classes(data))
    print(f"torch threads {torch.get_num_threads()}; {len(train)} train, {len(val)} val")
    records = []
    for name in args.sets.split(","):
        labelled = labelled_set(name, train, split, args.seed)
        records += run_set(name, labelled, start, val, num_classes, args)
    print(table(records))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
