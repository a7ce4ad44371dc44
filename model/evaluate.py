"""mIoU and per-class IoU of a trained network on any folder split.

    python -m model.evaluate CKPT --data DIR --split NAME [--downscale N] [--json OUT]

CKPT is a checkpoint of `model.checkpoint` (what `python -m model.train` writes as
`model.pt`, and every version in the service's MODEL_DIR) or a simulator state file
(`<out>/state/<row>/cycle<k>.pt`, which holds the teacher and the student of that cycle).
DIR is a CamVid-layout folder (`DIR/NAME/*.png`, `DIR/NAMEannot/*.png`, `DIR/classes.json`);
its classes must be the checkpoint's, in the same order. The networks run in fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from model.checkpoint import CheckpointError, load_checkpoint
from model.data import load_folder, read_classes
from model.metrics import evaluate
from model.network import network_from_weights


def load_networks(path: Path, device: str = "cpu") -> tuple[dict[str, nn.Module], list | None]:
    """{name: network in eval mode} and the class names the file records (None: unknown)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(payload, dict) and "train_state" in payload:  # a simulator cycle
        state = payload["train_state"]
        weights = {"teacher": state["teacher"]["model"], "student": state["student"]}
        nets = {
            name: network_from_weights(state_dict, state["num_classes"], device)
            for name, state_dict in weights.items()
        }
        return nets, payload.get("settings", {}).get("classes")
    model, meta = load_checkpoint(path, device)
    return {meta.get("published", "model"): model}, list(meta["classes"])


def iou_table(classes: Sequence[str], columns: dict[str, dict]) -> str:
    """Per-class IoU (%) of each column's metrics ('-' where a class is absent from both
    ground truth and predictions), then mIoU and pixel accuracy."""

    def percent(value: float | None) -> str:
        return f"{'-' if value is None else f'{100 * value:.1f}':>8}"

    names = list(columns)
    rows = [(c, [columns[n]["iou"][i] for n in names]) for i, c in enumerate(classes)]
    rows.append(("mIoU", [columns[n]["miou"] for n in names]))
    rows.append(("pixel accuracy", [columns[n]["pixel_accuracy"] for n in names]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'class':<{width}} " + " ".join(f"{n:>8}" for n in names)]
    lines += [f"{name:<{width}} " + " ".join(percent(v) for v in values) for name, values in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.evaluate",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("checkpoint", type=Path, help="model.checkpoint file or simulator state")
    parser.add_argument("--data", type=Path, required=True, help="CamVid-layout dataset folder")
    parser.add_argument("--split", required=True, help="image folder under --data (e.g. val)")
    parser.add_argument(
        "--downscale", type=int, default=1, help="shrink images and masks first (default 1)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--json", type=Path, help="also write the metrics to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        nets, recorded = load_networks(args.checkpoint, args.device)
    except (FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    classes = read_classes(args.data)
    if recorded is not None and list(recorded) != classes:
        print(
            f"error: {args.checkpoint} was trained on classes {recorded}, "
            f"{args.data} has {classes}",
            file=sys.stderr,
        )
        return 2
    samples = load_folder(args.data, args.split, args.downscale)
    if not any(sample.mask is not None for sample in samples):
        print(f"error: {args.data / args.split} has no masks ({args.split}annot)", file=sys.stderr)
        return 2
    metrics = {
        name: evaluate(net, samples, len(classes), args.batch_size, args.device)
        for name, net in nets.items()
    }
    print(f"{args.checkpoint} on {args.data / args.split} ({len(samples)} images)")
    print(iou_table(classes, metrics))
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
