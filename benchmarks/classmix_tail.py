"""How many tail-class pixels each ClassMix variant puts in front of the student.

Balanced ClassMix (papers/s4al.md Sec. 3.3) exists so that the student sees *more* tail
pixels than plain ClassMix shows it. This measures it on real label maps: pairs of CamVid
ground-truth crops (the replayed source and the current target, through the training
geometry), mixed the way `S4ALStep` mixes them, and the share of the mixed label map's
valid pixels that belong to tail classes (head / tail split as training makes it, from the
labelled set's pixel counts). Ground truth stands in for the teacher's pseudo-labels, so the
figure is about the sampler, not the teacher. Target (issue 12): the default sampler
(`ClassSampler.from_masks` with TrainConfig's defaults) above plain ClassMix, and above no
mix. Exit status 1 when it is not.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.classmix_tail --data DIR [--split FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from model.config import TrainConfig
from model.data import (
    IGNORE_INDEX,
    SegmentationDataset,
    load_folder,
    read_classes,
    read_split,
    weak_transform,
)
from model.mixing import ClassSampler, RandomHalf, apply_mix, classmix_masks

# the S4AL authors' hard-coded CamVid lists (PRIOR_ART.md B.5): 3 of these, 2 of those
AUTHORS_HEAD, AUTHORS_TAIL = (0, 1, 3, 4, 5), (2, 6, 7, 8, 9, 10)


def crops(data: Path, downscale: int, crop: int, count: int, seed: int) -> torch.Tensor:
    """`count` label crops N x H x W drawn through the training geometry."""
    torch.manual_seed(seed)
    samples = load_folder(data, "train", downscale)
    dataset = SegmentationDataset(samples, weak_transform(crop))
    picks = torch.randint(len(dataset), (count,)).tolist()
    return torch.stack([dataset[i][1] for i in picks])


def tail_share(labels: torch.Tensor, tail: torch.Tensor) -> float:
    valid = labels != IGNORE_INDEX
    return float((torch.isin(labels, tail) & valid).sum() / valid.sum().clamp(min=1))


def mixed_share(source: torch.Tensor, target: torch.Tensor, sampler, tail: torch.Tensor) -> float:
    """Tail share of the target crops after pasting the sampler's classes of the source."""
    if sampler is None:
        return tail_share(target, tail)
    (mixed,) = apply_mix(classmix_masks(source, sampler), [source], [target])
    return tail_share(mixed, tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="CamVid-layout folder")
    parser.add_argument(
        "--split", type=Path, help="labelled set that splits head from tail (default: all train)"
    )
    parser.add_argument("--downscale", type=int, default=2, help="default 2 (camvid-lab)")
    parser.add_argument("--crop", type=int, default=128, help="default 128 (camvid-lab)")
    parser.add_argument("--pairs", type=int, default=2000, help="source/target pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = TrainConfig()
    samples = load_folder(args.data, "train", args.downscale)
    if args.split:
        names = set(read_split(args.split))
        samples = [s for s in samples if s.name in names]
    num_classes = len(read_classes(args.data))
    generator = torch.Generator().manual_seed(args.seed)
    default = ClassSampler.from_masks(
        (s.mask for s in samples),
        num_classes,
        config.head_pixel_share,
        config.head_classes,
        config.tail_classes,
        generator,
    )
    tail = default.tail
    pairs = crops(args.data, args.downscale, args.crop, 2 * args.pairs, args.seed)
    source, target = pairs[: args.pairs], pairs[args.pairs :]
    samplers = {
        "no mix": None,
        "ClassMix (random half)": RandomHalf(generator),
        "3 head + 2 tail drawn (before the fix)": ClassSampler(
            default.head, default.tail, 3, 2, generator=generator
        ),
        "authors' fixed lists (3 + 2)": ClassSampler(
            AUTHORS_HEAD, AUTHORS_TAIL, 3, 2, generator=generator
        ),
        f"default ({config.head_classes} head + {config.tail_classes or 'all'} tail)": default,
    }
    names = [read_classes(args.data)[c] for c in tail.tolist()]
    print(
        f"{args.pairs} pairs of {args.crop}x{args.crop} ground-truth crops at downscale "
        f"{args.downscale}; tail = {', '.join(names)} "
        f"({'split ' + args.split.name if args.split else 'all train images'})"
    )
    print(f"{'sampler':<42} {'tail share of the mixed labels':>31}")
    shares = {}
    for name, sampler in samplers.items():
        shares[name] = mixed_share(source, target, sampler, tail)
        print(f"{name:<42} {100 * shares[name]:30.1f}%")
    ours = list(shares.values())[-1]
    ok = ours > shares["ClassMix (random half)"] and ours > shares["no mix"]
    print(
        f"default vs ClassMix: {100 * ours:.1f}% vs {100 * shares['ClassMix (random half)']:.1f}%"
        f" ({'above' if ok else 'NOT above'} ClassMix and no mix)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
