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
import shlex
import socket
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from model import acquisition as acq
from model.data import load_folder, read_classes, read_split
from model.precision import AMP_CHOICES
from model.protocols import PROTOCOLS, Protocol, parse_row
from model.report import ROW_ORDER
from model.simulation import Context, SimulationError, backbone_note, run_row, update_report
from model.train import parse_range


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
    over.add_argument("--amp", choices=AMP_CHOICES, help="mixed precision (model.precision)")
    over.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, help="NHWC model and batches"
    )
    over.add_argument(
        "--strong-zoom",
        type=parse_range,
        help="LOW,HIGH: the strong view's own zoom against the weak one (model.strong_zoom)",
    )
    over.add_argument(
        "--eval-every", type=int, help="val mIoU every N iterations of a cycle (0: at its end)"
    )
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
    run.add_argument(
        "--extra-eval",
        action="append",
        default=[],
        metavar="DIR:SPLIT",
        help="also evaluate every cycle on DIR/SPLIT (a CamVid-layout folder with the same "
        "classes, e.g. data kept out of the repository); repeatable",
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
        "amp": args.amp,
        "channels_last": args.channels_last,
        "eval_every": args.eval_every,
        "strong_zoom": args.strong_zoom,
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
    extra_eval = {}
    for spec in args.extra_eval:
        root, _, split = spec.rpartition(":")
        if not root or read_classes(root) != classes:
            raise SystemExit(f"--extra-eval {spec}: need DIR:SPLIT with the classes of {args.data}")
        extra_eval[spec] = load_folder(root, split, protocol.downscale)
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
        extra_eval=extra_eval,
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
        f"{backbone_note(protocol.backbone_weights)}"
    )
    try:
        for spec in specs:
            run_row(ctx, spec, args.resume, args.overwrite)
    except SimulationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    update_report(ctx)
    ctx.log(f"report: {ctx.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
