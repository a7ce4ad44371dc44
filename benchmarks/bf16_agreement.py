"""Is bf16 safe here? fp32 against bf16 autocast on CamVid val, in one run.

Two networks train the same supervised schedule from the same seed and ImageNet backbone,
one in fp32 and one with bf16 autocast + channels_last (TrainConfig.amp). Then each
predicts every val image twice, fp32 and bf16 (model.inference, as /predict and pool
scoring do): prints the share of pixels whose argmax agrees (target >= 99%), val mIoU of
every network x precision, and the training seconds of each. On a CPU without native bf16
units the bf16 side is emulated (slow) but the agreement figures still hold.

    .venv/bin/python -m benchmarks.bf16_agreement --data PATH/TO/camvid --iterations 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from model.config import TrainConfig
from model.data import load_folder, read_classes
from model.inference import predict_probabilities
from model.metrics import confusion_matrix, mean_iou
from model.precision import cpu_native_bf16
from model.train import Trainer

TARGET_AGREEMENT = 0.99
PRECISIONS = ("off", "bf16")


def train(amp: str, train_samples, num_classes: int, args) -> tuple[torch.nn.Module, float]:
    config = TrainConfig(
        method="supervised", iterations=args.iterations, cold_start_iterations=0,
        crop_size=(args.crop, args.crop), batch_labelled=args.batch, eval_every=0,
        seed=args.seed, device="cpu", amp=amp, channels_last=amp != "off",
    )
    trainer = Trainer(config, train_samples, [], num_classes)
    started = time.monotonic()
    result = trainer.fit()
    return result.teacher, time.monotonic() - started


def compare(model: torch.nn.Module, val, num_classes: int, batch: int) -> dict:
    """Argmax agreement fp32 vs bf16 and mIoU of each, over the val images."""
    images = [s.image for s in val]
    streams = [predict_probabilities(model, images, batch, amp=amp) for amp in PRECISIONS]
    same = total = 0
    cms = [torch.zeros(num_classes, num_classes, dtype=torch.int64) for _ in PRECISIONS]
    for sample, fp32, bf16 in zip(val, *streams, strict=True):
        labels = [fp32.argmax(0), bf16.argmax(0)]
        same += int((labels[0] == labels[1]).sum())
        total += labels[0].numel()
        target = torch.from_numpy(sample.mask)
        for cm, label in zip(cms, labels, strict=True):
            cm += confusion_matrix(label, target, num_classes)
    return {"agreement": same / total, "pixels": total,
            "miou": {amp: mean_iou(cm) for amp, cm in zip(PRECISIONS, cms, strict=True)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="CamVid folder with train/, val/ and their annot/ (README: Data)")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--downscale", type=int, default=2, help="image downscale (2: 180x240)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    num_classes = len(read_classes(args.data))
    train_samples = load_folder(args.data, "train", downscale=args.downscale)
    val = load_folder(args.data, "val", downscale=args.downscale)
    load = os.getloadavg()[0]
    rows = {}
    for amp in PRECISIONS:
        model, seconds = train(amp, train_samples, num_classes, args)
        rows[amp] = {"train_s": seconds, **compare(model, val, num_classes, args.batch)}
    print_report(rows, len(val), val[0].image.shape[:2], load, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": vars(args) | {"data": str(args.data),
                                         "json": str(args.json)}, "rows": rows},
                                        indent=2) + "\n")
    return 0


def print_report(rows: dict, n_val: int, shape, load: float, args) -> None:
    native = "native bf16" if cpu_native_bf16() else "NO native bf16 (emulated)"
    print(f"CamVid val: {n_val} images {shape[1]}x{shape[0]}; {args.iterations} supervised "
          f"iterations, crop {args.crop}, batch {args.batch}, seed {args.seed}; CPU {native}, "
          f"{torch.get_num_threads()} thread(s), load average {load:.1f}")
    print(f"{'trained in':<12}{'train s':>9}{'mIoU fp32':>11}{'mIoU bf16':>11}"
          f"{'argmax agreement':>18}")
    for amp, row in rows.items():
        verdict = "ok" if row["agreement"] >= TARGET_AGREEMENT else "BELOW target"
        print(f"{'fp32' if amp == 'off' else amp:<12}{row['train_s']:9.1f}"
              f"{100 * row['miou']['off']:10.1f}%{100 * row['miou']['bf16']:10.1f}%"
              f"{100 * row['agreement']:16.2f}% {verdict} (>= {100 * TARGET_AGREEMENT:.0f}%)")


if __name__ == "__main__":
    sys.exit(main())
