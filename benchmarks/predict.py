"""/predict end to end against the bare model forward, in one run.

A real local HTTP server plays Label Studio's file serving (token auth) for a batch of
CamVid images; the real app (``create_app``, served by werkzeug on a loopback port) answers
``POST /predict`` for them: download, decode, forward (softmax, argmax), brush RLE, JSON.
The same images, already decoded in memory, then go through the bare ``model(x)`` with the
same batch size. Prints both, the ratio and the breakdown from ``/metrics``. The image
cache is off, so every request downloads. Target (issue 3): end to end at most 1.3x the
bare forward on CPU at 360x480. Each AMP value in --amp (default fp32 and bf16) is measured
the same way and printed side by side (issue 15).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.predict --data PATH/TO/camvid
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
from werkzeug.serving import make_server

from model.data import normalize
from model.precision import cpu_native_bf16, resolve_precision, to_channels_last, to_device
from s4al_backend.app import create_app
from s4al_backend.store import project_store
from tests.service_helpers import (
    CAMVID_CLASSES,
    FileServer,
    brush_config,
    make_model,
    make_settings,
    png_bytes,
    read_rgb,
)

STAGES = ("download_s", "decode_s", "forward_s", "postprocess_s", "wall_s")


def bare_forward(model, images, batch_size: int, device: str, amp: str) -> float:
    """Seconds for model(x) over all images in batches, inputs prepared beforehand, under
    the same precision as /predict (autocast and channels_last when 16-bit)."""
    precision = resolve_precision(amp, device)
    to_channels_last(model, precision.enabled)
    batches = [to_device(normalize(np.stack(images[i : i + batch_size])), device,
                         channels_last=precision.enabled)
               for i in range(0, len(images), batch_size)]
    started = time.perf_counter()
    with torch.no_grad(), precision.autocast():
        for batch in batches:
            model(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def serve_and_time(args, paths, images, amp: str) -> dict:
    """/predict through the real app (AMP=`amp`) and the bare forward, medians."""
    with tempfile.TemporaryDirectory() as tmp, FileServer() as files:
        tasks = []
        for i, (path, image) in enumerate(zip(paths, images, strict=True)):
            url = files.add(f"/data/upload/1/{path.name}", png_bytes(image))
            tasks.append({"id": i + 1, "data": {"image": url}})
        settings = make_settings(Path(tmp), files, device=args.device, amp=amp,
                                 predict_batch_size=args.batch, image_cache_mb=0)
        model = make_model(len(CAMVID_CLASSES)).to(args.device)
        project_store(settings.model_dir, "1").save(model, CAMVID_CLASSES)
        end_to_end, breakdowns, response_bytes = time_predict(settings, tasks, args.repeats)
        bare_model, _ = project_store(settings.model_dir, "1").load(device=args.device)
    bare_forward(bare_model, images[:1], 1, args.device, amp)  # warm-up
    bare = [bare_forward(bare_model, images, args.batch, args.device, amp)
            for _ in range(args.repeats)]
    e2e, forward = statistics.median(end_to_end), statistics.median(bare)
    return {"precision": resolve_precision(amp, args.device).mode, "bare_forward_s": forward,
            "end_to_end_s": e2e, "ratio": e2e / forward,
            "breakdown_s": {k: statistics.median(b[k] for b in breakdowns) for k in STAGES},
            "response_bytes": response_bytes}


def time_predict(settings, tasks: list[dict], repeats: int):
    app = create_app(settings)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    body = {"tasks": tasks, "project": "1.1", "label_config": brush_config()}
    end_to_end, breakdowns = [], []
    try:
        session = requests.Session()
        session.post(f"{base}/predict", json={**body, "tasks": tasks[:1]}).raise_for_status()
        for _ in range(repeats):
            before = session.get(f"{base}/metrics").json()["predict"]
            started = time.perf_counter()
            reply = session.post(f"{base}/predict", json=body)
            end_to_end.append(time.perf_counter() - started)
            reply.raise_for_status()
            results = reply.json()["results"]
            assert len(results) == len(tasks) and all(r["result"] for r in results)
            after = session.get(f"{base}/metrics").json()["predict"]
            breakdowns.append({k: after[k] - before[k] for k in STAGES})
    finally:
        server.shutdown()
    return end_to_end, breakdowns, len(reply.content)


ROWS = (("bare model forward", "bare_forward_s"), ("/predict end to end", "end_to_end_s"),
        ("  download", "download_s"), ("  decode", "decode_s"),
        ("  forward + softmax", "forward_s"), ("  argmax + RLE", "postprocess_s"))


def print_table(runs: list[dict], n: int) -> None:
    print(f"  {'seconds per request':24s}" + "".join(f"{r['precision']:>10s}" for r in runs))
    for label, key in ROWS:
        values = [r.get(key, r["breakdown_s"].get(key)) for r in runs]
        print(f"  {label:24s}" + "".join(f"{v:10.3f}" for v in values))
    print(f"  {'ms/image end to end':24s}" + "".join(
        f"{1e3 * r['end_to_end_s'] / n:10.1f}" for r in runs))
    print(f"  {'ratio (target <= 1.3x)':24s}" + "".join(f"{r['ratio']:9.2f}x" for r in runs))
    if len(runs) == 2:
        speedup = runs[0]["bare_forward_s"] / runs[1]["bare_forward_s"]
        print(f"  {runs[1]['precision']} forward speed-up over {runs[0]['precision']}: "
              f"{speedup:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="CamVid folder with val/ (README: Data)")
    parser.add_argument("--images", type=int, default=8, help="tasks per /predict")
    parser.add_argument("--batch", type=int, default=4, help="PREDICT_BATCH_SIZE")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, the median kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", default="off,bf16",
                        help="AMP values measured side by side (default off,bf16)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    paths = sorted((args.data / "val").glob("*.png"))[: args.images]
    if len(paths) < args.images:
        raise SystemExit(f"need {args.images} images in {args.data / 'val'}")
    images = [read_rgb(p) for p in paths]
    height, width = images[0].shape[:2]
    runs = [serve_and_time(args, paths, images, amp) for amp in args.amp.split(",")]
    native = "native bf16" if cpu_native_bf16() else "no native bf16"
    print(f"/predict of {len(paths)} CamVid tasks {width}x{height}, batch {args.batch}, "
          f"{args.device} ({native}), {args.threads} torch thread(s), median of "
          f"{args.repeats}")
    print_table(runs, len(paths))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "images": len(paths), "width": width, "height": height, "batch": args.batch,
            "device": args.device, "threads": args.threads, "runs": runs,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
