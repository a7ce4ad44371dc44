"""Throughput of DeepLabv3+ / MobileNetV2 on this machine's accelerator (or CPU).

Measures, per resolution and precision (fp32 vs AMP):
- inference: images per second (forward + softmax, eval mode, batched);
- training: optimiser steps per second of a supervised step (forward, cross-entropy,
  backward, SGD) at the paper's batch of 4;
- FLOPs per image (torch.utils.flop_counter.FlopCounterMode; one multiply-add = 2 FLOPs),
  counted on the meta device at the measured size and at the paper's size, so the
  figures can be put against the device's peak.

On CUDA the sizes are the papers' (CamVid 360x480, Cityscapes 688x688); on CPU smaller
ones (CamVid / 2, Cityscapes / 4) so a run takes about a minute; ``--quick`` shrinks
everything to seconds (used by tests/test_gpu_benchmark.py).

    python benchmarks/gpu.py                      # auto device, full sizes on GPU
    python benchmarks/gpu.py --quick --json out.json
    python benchmarks/gpu.py --channels-last --compile --json benchmarks/results/gpu.json

Prints a Markdown table; ``--json PATH`` writes every figure with the device name.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402, N812
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from model.network import DeepLabV3Plus  # noqa: E402
from model.precision import (  # noqa: E402
    Precision,
    configure_backends,
    maybe_compile,
    optimizer_step,
    resolve_precision,
    to_channels_last,
)

SCHEMA = "s4al-gpu-benchmark/1"

# name -> (paper height, width, classes). CamVid 11 classes, Cityscapes 19 (papers/s4al.md).
PAPER_SIZES = {"camvid": (360, 480, 11), "cityscapes": (688, 688, 19)}
CPU_SCALE = {"camvid": 2, "cityscapes": 4}  # CPU runs at paper size / this
QUICK_SIZES = {"camvid": (48, 64), "cityscapes": (64, 64)}

# Dense 16-bit tensor-core peaks (TFLOP/s) from the vendors' datasheets, matched by
# substring of torch.cuda.get_device_name(), first match wins. --peak-tflops overrides.
PEAK_16BIT_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16 only
    ("T4", 65.0),  # fp16 only
)


def device_info(device: torch.device, peak_override: float | None) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        peak = peak_override
        if peak is None:
            peak = next((p for key, p in PEAK_16BIT_TFLOPS if key in name), None)
        extra = {
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        name = _cpu_name()
        peak = peak_override
        extra = {"cuda": None}
    return {
        "type": device.type,
        "name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_tflops_16bit": peak,
        "host": platform.node(),
        **extra,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _conv_flops(x_shape, w_shape, out_shape, transposed: bool) -> int:
    """2 x multiply-adds of a (grouped) convolution; ``w_shape`` holds C_in / groups."""
    spatial = (x_shape if transposed else out_shape)[2:]
    return 2 * x_shape[0] * math.prod(spatial) * math.prod(w_shape)


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **_kwargs,
) -> int:
    """torch's formula counts grad_weight as if groups were 1, which overcounts
    MobileNetV2's depthwise convolutions ~4x; each gradient costs one forward's FLOPs."""
    flops = 0
    if output_mask[0]:  # grad_input: the transposed convolution of grad_out
        flops += _conv_flops(grad_out_shape, w_shape, x_shape, not transposed)
    if output_mask[1]:  # grad_weight: one multiply-add per forward multiply-add
        flops += _conv_flops(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def count_flops(num_classes: int, height: int, width: int) -> dict[str, float]:
    """GFLOPs per image of one forward (eval) and one training step (forward + backward),
    counted on the meta device: nothing is computed, so paper sizes are free on CPU."""
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    n = 2  # train-mode BatchNorm after image pooling needs more than one value per channel
    with torch.device("meta"):
        model = DeepLabV3Plus(num_classes)
        x = torch.empty(n, 3, height, width)
        y = torch.zeros(n, height, width, dtype=torch.long)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    inference = counter.get_total_flops() / n
    model.train()
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        F.cross_entropy(model(x), y, ignore_index=255).backward()
    return {"inference": inference / 1e9, "train_step": counter.get_total_flops() / n / 1e9}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> tuple:
    """(seconds of the first warm-up call, seconds for `iters` calls after warm-up)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return first, time.perf_counter() - t0


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return None  # per-run peaks are not separable on CPU; see device.peak_rss_mb


def bench_inference(
    model: torch.nn.Module,
    prec: Precision,
    device: torch.device,
    size: tuple[int, int],
    batch: int,
    warmup: int,
    iters: int,
    channels_last: bool,
) -> dict[str, Any]:
    model.eval()
    x = torch.randn(batch, 3, *size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def step() -> None:
        with prec.autocast():
            logits = model(x)
        logits.float().softmax(dim=1)

    first, seconds = _timed(step, device, warmup, iters)
    images = batch * iters
    return {
        "task": "inference",
        "precision": prec.mode,
        "batch": batch,
        "iters": iters,
        "first_call_s": round(first, 4),
        "seconds": round(seconds, 4),
        "images_per_s": images / seconds,
        "ms_per_image": 1000 * seconds / images,
        "peak_memory_mb": _peak_mb(device),
    }


def bench_train(
    model: torch.nn.Module,
    prec: Precision,
    device: torch.device,
    size: tuple[int, int],
    batch: int,
    num_classes: int,
    warmup: int,
    iters: int,
    channels_last: bool,
) -> dict[str, Any]:
    model.train()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, *size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch, *size), generator=g).to(device)
    y[:, : size[0] // 8] = 255  # some ignored pixels, as in partial labels
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = prec.grad_scaler()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with prec.autocast():
            loss = F.cross_entropy(model(x), y, ignore_index=255)
        optimizer_step(loss, opt, scaler)

    first, seconds = _timed(step, device, warmup, iters)
    return {
        "task": "train",
        "precision": prec.mode,
        "batch": batch,
        "iters": iters,
        "first_call_s": round(first, 4),
        "seconds": round(seconds, 4),
        "steps_per_s": iters / seconds,
        "images_per_s": batch * iters / seconds,
        "ms_per_step": 1000 * seconds / iters,
        "peak_memory_mb": _peak_mb(device),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    configure_backends(device)
    on_gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (5 if on_gpu else 2))
    iters = args.iters if args.iters is not None else (1 if args.quick else (20 if on_gpu else 5))
    infer_batch = args.infer_batch or (2 if args.quick else (8 if on_gpu else 1))
    train_batch = args.train_batch or (2 if args.quick else 4)
    amp = args.amp if args.amp != "auto" or on_gpu else "bf16"  # CPU: measure bf16 autocast
    precisions = [resolve_precision("off", device)]
    amp_prec = resolve_precision(amp, device)
    if amp_prec.enabled and not args.fp32_only:
        precisions.append(amp_prec)

    info = device_info(device, args.peak_tflops)
    results = []
    for name in args.sizes:
        paper_h, paper_w, classes = PAPER_SIZES[name]
        if args.quick:
            h, w = QUICK_SIZES[name]
        elif on_gpu:
            h, w = paper_h, paper_w
        else:
            h, w = paper_h // CPU_SCALE[name], paper_w // CPU_SCALE[name]
        flops = count_flops(classes, h, w)
        flops_paper = count_flops(classes, paper_h, paper_w)
        torch.manual_seed(0)
        runs = []
        for prec in precisions:
            model = DeepLabV3Plus(classes).to(device)
            to_channels_last(model, args.channels_last)
            model = maybe_compile(model, args.compile)
            r_inf = bench_inference(
                model, prec, device, (h, w), infer_batch, warmup, iters, args.channels_last
            )
            r_train = bench_train(
                model, prec, device, (h, w), train_batch, classes, warmup, iters, args.channels_last
            )
            for r in (r_inf, r_train):
                per_image = flops["inference" if r["task"] == "inference" else "train_step"]
                r["achieved_tflops"] = per_image * r["images_per_s"] / 1e3
                peak = info["peak_tflops_16bit"]
                r["utilisation_16bit_peak"] = r["achieved_tflops"] / peak if peak else None
            runs.extend([r_inf, r_train])
            del model
            if on_gpu:
                torch.cuda.empty_cache()
        results.append(
            {
                "name": name,
                "height": h,
                "width": w,
                "paper_size": [paper_h, paper_w],
                "num_classes": classes,
                "gflops_per_image": flops,
                "gflops_per_image_paper_size": flops_paper,
                "runs": runs,
            }
        )
    info["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    params = sum(p.numel() for p in DeepLabV3Plus(PAPER_SIZES[args.sizes[0]][2]).parameters())
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": info,
        "model": {"name": "DeepLabV3+ MobileNetV2 OS16", "parameters": params},
        "settings": {
            "quick": args.quick,
            "warmup": warmup,
            "iters": iters,
            "amp": amp,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "cudnn_benchmark": on_gpu and torch.backends.cudnn.benchmark,
            "tf32": on_gpu and torch.backends.cudnn.allow_tf32,  # fp32 convolutions on TF32
        },
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    s = report["settings"]
    lines = [
        f"device: {dev['name']} ({dev['type']}, torch {dev['torch']}, "
        f"{dev['threads']} threads); channels_last={s['channels_last']} "
        f"compile={s['compile']} warmup={s['warmup']} iters={s['iters']}",
        "",
        "| size | task | precision | batch | images/s | steps/s | ms | GFLOP/img | TFLOP/s "
        "| peak MB | x fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in report["results"]:
        size = f"{res['name']} {res['height']}x{res['width']}"
        base = {r["task"]: r["images_per_s"] for r in res["runs"] if r["precision"] == "fp32"}
        for r in res["runs"]:
            gflop = res["gflops_per_image"][
                "inference" if r["task"] == "inference" else "train_step"
            ]
            ms = r.get("ms_per_image", r.get("ms_per_step"))
            steps = f"{r['steps_per_s']:.2f}" if "steps_per_s" in r else ""
            lines.append(
                f"| {size} | {r['task']} | {r['precision']} | {r['batch']} "
                f"| {r['images_per_s']:.2f} | {steps} | {ms:.1f} | {gflop:.2f} "
                f"| {r['achieved_tflops']:.3f} | {r['peak_memory_mb'] or ''} "
                f"| {r['images_per_s'] / base[r['task']]:.2f} |"
            )
    lines.append("")
    for res in report["results"]:
        f = res["gflops_per_image_paper_size"]
        lines.append(
            f"{res['name']} at the paper's {res['paper_size'][0]}x{res['paper_size'][1]}: "
            f"{f['inference']:.1f} GFLOP/image inference, {f['train_step']:.1f} per training image"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:i]")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one iteration (CI)")
    p.add_argument(
        "--sizes",
        nargs="+",
        default=list(PAPER_SIZES),
        choices=list(PAPER_SIZES),
        help="resolutions to run (default: both)",
    )
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "fp16"],
        help="AMP dtype to compare with fp32 (auto: bf16 where native, else fp16; bf16 on CPU)",
    )
    p.add_argument("--fp32-only", action="store_true", help="skip the AMP runs")
    p.add_argument("--infer-batch", type=int, default=None, help="default 8 GPU, 1 CPU")
    p.add_argument("--train-batch", type=int, default=None, help="default 4 (the paper's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default 5 GPU, 2 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 20 GPU, 5 CPU)")
    p.add_argument("--channels-last", action="store_true", help="NHWC model and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device 16-bit peak")
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
