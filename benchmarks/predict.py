"""/predict end to end against the bare model forward, in one run.

A real local HTTP server plays Label Studio's file serving (token auth) for a batch of
CamVid images; the real app (``create_app``, served by werkzeug on a loopback port) answers
``POST /predict`` for them: download, decode, forward (softmax, argmax), brush RLE, JSON.
The same images, already decoded in memory, then go through the bare ``model(x)`` with the
same batch size. Prints both, the ratio and the breakdown from ``/metrics``. The image
cache is off, so every request downloads. Target (issue 3): end to end at most 1.3x the
bare forward on CPU at 360x480.

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

TARGET_RATIO = 1.3
STAGES = ("download_s", "decode_s", "forward_s", "postprocess_s", "wall_s")


def bare_forward(model, images, batch_size: int, device: str) -> float:
    """Seconds for model(x) over all images in batches, inputs prepared beforehand."""
    batches = [normalize(np.stack(images[i : i + batch_size])).to(device)
               for i in range(0, len(images), batch_size)]
    started = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="CamVid folder with val/ (README: Data)")
    parser.add_argument("--images", type=int, default=8, help="tasks per /predict")
    parser.add_argument("--batch", type=int, default=4, help="PREDICT_BATCH_SIZE")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, the median kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    paths = sorted((args.data / "val").glob("*.png"))[: args.images]
    if len(paths) < args.images:
        raise SystemExit(f"need {args.images} images in {args.data / 'val'}")
    images = [read_rgb(p) for p in paths]
    height, width = images[0].shape[:2]

    with tempfile.TemporaryDirectory() as tmp, FileServer() as files:
        tasks = []
        for i, (path, image) in enumerate(zip(paths, images, strict=True)):
            url = files.add(f"/data/upload/1/{path.name}", png_bytes(image))
            tasks.append({"id": i + 1, "data": {"image": url}})
        settings = make_settings(Path(tmp), files, device=args.device,
                                 predict_batch_size=args.batch, image_cache_mb=0)
        model = make_model(len(CAMVID_CLASSES)).to(args.device)
        project_store(settings.model_dir, "1").save(model, CAMVID_CLASSES)
        app = create_app(settings)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_port}"
        body = {"tasks": tasks, "project": "1.1", "label_config": brush_config()}
        try:
            session = requests.Session()
            session.post(f"{base}/predict", json={**body, "tasks": tasks[:1]}).raise_for_status()
            end_to_end, breakdowns = [], []
            for _ in range(args.repeats):
                before = session.get(f"{base}/metrics").json()["predict"]
                started = time.perf_counter()
                reply = session.post(f"{base}/predict", json=body)
                end_to_end.append(time.perf_counter() - started)
                reply.raise_for_status()
                results = reply.json()["results"]
                assert len(results) == len(tasks) and all(r["result"] for r in results)
                after = session.get(f"{base}/metrics").json()["predict"]
                breakdowns.append({k: after[k] - before[k] for k in STAGES})
                response_bytes = len(reply.content)
        finally:
            server.shutdown()
        bare_model, _ = project_store(settings.model_dir, "1").load(device=args.device)
        bare_forward(bare_model, images[:1], 1, args.device)  # warm-up
        bare = [bare_forward(bare_model, images, args.batch, args.device)
                for _ in range(args.repeats)]

    e2e = statistics.median(end_to_end)
    forward = statistics.median(bare)
    ratio = e2e / forward
    median_breakdown = {k: statistics.median(b[k] for b in breakdowns) for k in STAGES}
    other = e2e - median_breakdown["forward_s"] - median_breakdown["postprocess_s"]
    n = len(tasks)
    print(f"/predict of {n} CamVid tasks {width}x{height}, batch {args.batch}, "
          f"{args.device}, {args.threads} torch thread(s), median of {args.repeats}")
    print(f"  bare model forward     {forward:7.3f} s  ({1e3 * forward / n:6.1f} ms/image)")
    print(f"  /predict end to end    {e2e:7.3f} s  ({1e3 * e2e / n:6.1f} ms/image)")
    print(f"  ratio                  {ratio:7.2f}x  (target <= {TARGET_RATIO}x: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    print("  breakdown (seconds per request; download and decode run in threads, "
          "overlapping the forward):")
    print(f"    download             {median_breakdown['download_s']:7.3f}")
    print(f"    decode               {median_breakdown['decode_s']:7.3f}")
    print(f"    forward + softmax    {median_breakdown['forward_s']:7.3f}")
    print(f"    argmax + RLE         {median_breakdown['postprocess_s']:7.3f}")
    print(f"    rest                 {other:7.3f}  (waiting on images, HTTP, JSON)")
    print(f"  response size          {response_bytes / 1024:7.1f} KiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "images": n, "width": width, "height": height, "batch": args.batch,
            "device": args.device, "threads": args.threads, "bare_forward_s": forward,
            "end_to_end_s": e2e, "ratio": ratio, "breakdown_s": median_breakdown,
            "response_bytes": response_bytes,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
