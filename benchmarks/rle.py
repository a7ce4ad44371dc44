"""Brush RLE: ours (s4al_backend.rle) against label_studio_sdk.converter.brush, in one run.

Encodes and decodes every class mask of real CamVid label images and noisy 512x512 masks
(the worst case: a run every pixel or two) with both, checks the outputs are identical and
prints the time per mask and the speed-up. Target (issue 3): encode at least 20x faster on
the noisy masks, identical output. Exit status 1 if any output differs.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.rle --data PATH/TO/camvid
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from label_studio_sdk.converter import brush

from s4al_backend import rle

TARGET_ENCODE_SPEEDUP = 20.0


def timed(fn, *args, repeats: int = 1):
    """The output and the best of `repeats` wall times (the least disturbed by other
    processes on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - started)
    return out, best


def camvid_masks(data: Path, count: int) -> list[np.ndarray]:
    folder = data / "trainannot"
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise SystemExit(f"no masks in {folder}")
    step = max(1, len(paths) // count)
    masks = []
    for path in paths[::step][:count]:
        labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        masks.extend(labels == value for value in np.unique(labels))
    return masks


def noisy_masks(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((size, size)) < 0.5 for _ in range(count)]


def compare(masks: list[np.ndarray], sdk_decode_limit: int, repeats: int) -> dict:
    """Per-mask seconds for both encoders and decoders (best of `repeats`; the SDK's
    decoder once); identical outputs checked."""
    ours_enc, sdk_enc, ours_dec, sdk_dec = [], [], [], []
    mismatches = 0
    rle_bytes = 0
    for i, mask in enumerate(masks):
        height, width = mask.shape
        ours, t = timed(rle.encode, mask, repeats=repeats)
        ours_enc.append(t)
        theirs, t = timed(brush.mask2rle, mask.astype(np.uint8) * 255, repeats=repeats)
        sdk_enc.append(t)
        mismatches += ours != theirs
        rle_bytes += len(ours)
        decoded, t = timed(rle.decode, theirs, height, width, repeats=repeats)
        ours_dec.append(t)
        mismatches += not np.array_equal(decoded, mask)
        if i < sdk_decode_limit:
            values, t = timed(brush.decode_rle, bytes(theirs))
            sdk_dec.append(t)
            mismatches += not np.array_equal(values.reshape(height, width, 4)[:, :, 3] > 0, mask)
    # the SDK's decoder may run on a subset (it is slow); compare like with like
    n_dec = len(sdk_dec)
    return {
        "masks": len(masks),
        "mean_rle_bytes": rle_bytes / len(masks),
        "encode_ms": {"ours": 1e3 * statistics.mean(ours_enc),
                      "sdk": 1e3 * statistics.mean(sdk_enc)},
        "encode_speedup": sum(sdk_enc) / sum(ours_enc),
        "decode_ms": {"ours": 1e3 * statistics.mean(ours_dec[:n_dec] or ours_dec),
                      "sdk": 1e3 * statistics.mean(sdk_dec) if sdk_dec else None,
                      "sdk_masks": n_dec},
        "decode_speedup": (sum(sdk_dec) / sum(ours_dec[:n_dec])) if sdk_dec else None,
        "identical": mismatches == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="CamVid folder with trainannot/ (README: Data)")
    parser.add_argument("--images", type=int, default=10, help="CamVid label images to use")
    parser.add_argument("--noisy", type=int, default=5, help="noisy masks")
    parser.add_argument("--size", type=int, default=512, help="noisy mask side")
    parser.add_argument("--sdk-decodes", type=int, default=3,
                        help="noisy masks the SDK's (slow) decoder also runs on")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per mask, the best kept (shared machines are noisy)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    for warm in (np.zeros((8, 8), bool), np.eye(8, dtype=bool)):
        rle.decode(rle.encode(warm), 8, 8)
    camvid = camvid_masks(args.data, args.images)
    results = {
        "camvid": compare(camvid, len(camvid), args.repeats),
        f"noisy_{args.size}": compare(noisy_masks(args.noisy, args.size), args.sdk_decodes,
                                      args.repeats),
    }
    shape = camvid[0].shape
    print(f"brush RLE, ours vs {brush.__name__} (mean per mask of the best of "
          f"{args.repeats} runs; the SDK decoder once)")
    print(f"{'masks':<22}{'n':>5}{'enc ours':>11}{'enc SDK':>11}{'x':>7}"
          f"{'dec ours':>11}{'dec SDK':>11}{'x':>7}  identical")
    labels = {"camvid": f"CamVid {shape[1]}x{shape[0]} class", f"noisy_{args.size}":
              f"noisy {args.size}x{args.size}"}
    for key, r in results.items():
        enc, dec = r["encode_ms"], r["decode_ms"]
        dec_sdk = f"{dec['sdk']:9.2f}ms" if dec["sdk"] is not None else f"{'-':>11}"
        dec_x = f"{r['decode_speedup']:6.1f}x" if r["decode_speedup"] else f"{'-':>7}"
        print(f"{labels[key]:<22}{r['masks']:>5}{enc['ours']:>9.2f}ms{enc['sdk']:>9.2f}ms"
              f"{r['encode_speedup']:>6.1f}x{dec['ours']:>9.2f}ms{dec_sdk}{dec_x}"
              f"  {'yes' if r['identical'] else 'NO'}")
    noisy = results[f"noisy_{args.size}"]
    met = noisy["encode_speedup"] >= TARGET_ENCODE_SPEEDUP and noisy["identical"]
    print(f"target: encode >= {TARGET_ENCODE_SPEEDUP:.0f}x faster on noisy masks, identical: "
          f"{noisy['encode_speedup']:.1f}x -> {'met' if met else 'NOT met'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["identical"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
