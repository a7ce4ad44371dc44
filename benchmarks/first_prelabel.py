"""Minutes to the first trained pre-label, as a new user meets them (issue 15).

A real Label Studio (`.venv-ls`), the backend as `make run` starts it (`python _wsgi.py`,
default settings: embedded queue, torch's default threads, no OMP_NUM_THREADS), a project
of CamVid images at their full 480x360 (local-files storage), the model connected, then
TRAIN_AFTER_ANNOTATIONS (5) ground-truth annotations through the API. Prints the seconds
from the fifth annotation to the first trained pre-label visible in Label Studio (a
prediction whose model_version is not `untrained`) and to the end of the cycle, with
progress samples from `/status` on the way. Not a test: it takes up to ~45 minutes.

    .venv/bin/python -m benchmarks.first_prelabel --data PATH/TO/camvid --images 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import requests

from tests.e2e.conftest import (
    LS_BIN,
    CamVidImage,
    ImageSet,
    Process,
    free_port,
    ls_env,
    start_label_studio,
    wait_http,
)
from tests.e2e.studio import create_project

REPO = Path(__file__).resolve().parents[1]
TRIGGER = 5  # TRAIN_AFTER_ANNOTATIONS' default


def load_images(data: Path, count: int, root: Path) -> ImageSet:
    """`count` CamVid train images at full size, copied under `root/all`."""
    classes = json.loads((data / "classes.json").read_text())["classes"]
    (root / "all").mkdir(parents=True)
    images = {}
    for path in sorted((data / "train").glob("*.png"))[:count]:
        shutil.copyfile(path, root / "all" / path.name)
        label = cv2.imread(str(data / "trainannot" / path.name), cv2.IMREAD_GRAYSCALE)
        mask = label.astype(np.int64)
        mask[mask >= len(classes)] = 255
        rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1].copy()
        images[path.name] = CamVidImage(path.name, rgb, mask)
    return ImageSet(root, classes, images, data)


def start_backend(ls, work: Path) -> tuple[Process, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "LANG", "TMPDIR", "TORCH_HOME")}  # no OMP_NUM_THREADS
    env.update({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.api_key,
                "MODEL_DIR": str(work / "model_dir")})
    backend = Process("backend", [str(REPO / ".venv/bin/python"), "_wsgi.py", "--port",
                                  str(port)], env, work / "backend.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", backend, timeout=180)
    return backend, url


def first_trained(project) -> tuple[str, int] | None:
    for task in project.tasks():
        for prediction in task.get("predictions") or []:
            version = prediction.get("model_version")
            if version and version != "untrained" and prediction.get("result"):
                return version, int(task["id"])
    return None


def watch(project, url: str, t5: float, timeout: float) -> dict:
    """Poll Label Studio and /status until the cycle ends; returns the figures."""
    out: dict = {"samples": []}
    last_sample = 0.0
    while time.monotonic() - t5 < timeout:
        now = time.monotonic() - t5
        if "first_prelabel_s" not in out and (found := first_trained(project)):
            out["first_prelabel_s"], out["first_version"] = round(now, 1), found[0]
            print(f"[{now:7.1f} s] first trained pre-label in Label Studio: {found}",
                  flush=True)
        training = requests.get(f"{url}/status", params={"project": project.id},
                                timeout=30).json().get("training") or {}
        last = training.get("last") or {}
        if last.get("status") in ("done", "failed") and not training.get("running"):
            out["cycle_s"], out["cycle"] = round(now, 1), last
            return out
        progress = (training.get("running") or {}).get("progress") or {}
        if now - last_sample >= 60:
            last_sample = now
            keep = {k: progress.get(k) for k in ("phase", "iteration", "total", "rate",
                                                  "eta_s", "phase_eta_s")}
            out["samples"].append({"t_s": round(now, 1), **keep})
            print(f"[{now:7.1f} s] {keep} load {os.getloadavg()[0]:.1f}", flush=True)
        time.sleep(5)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="CamVid folder (README: Data)")
    parser.add_argument("--images", type=int, default=20, help="tasks in the project")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not LS_BIN.exists():
        raise SystemExit(f"{LS_BIN} missing: `make setup-ls`")
    with tempfile.TemporaryDirectory(prefix="s4al-first-prelabel-") as tmp:
        work = Path(tmp)
        images = load_images(args.data, args.images, work / "docroot")
        template = work / "ls-template"
        template.mkdir()
        subprocess.run([str(LS_BIN), "init", "-q"], cwd=work, env=ls_env(template, images.root),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                       timeout=1200)
        ls = start_label_studio(template, images, work)
        backend = None
        try:
            backend, url = start_backend(ls, work)
            result = run(ls, images, url, args)
        finally:
            for process in (backend, ls.process):
                if process is not None:
                    process.stop()
        print((work / "backend.log").read_text()[-4000:])
    print(json.dumps({k: v for k, v in result.items() if k != "cycle"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0 if "first_prelabel_s" in result else 1


def run(ls, images: ImageSet, url: str, args) -> dict:
    project = create_project(ls, "first pre-label", sorted(images.images))
    project.connect(type("Backend", (), {"url": url})())
    tasks = project.image_tasks()
    names = sorted(tasks)[:TRIGGER]
    load = os.getloadavg()
    for name in names:
        project.annotate(tasks[name]["id"], images.images[name].mask)
    t5 = time.monotonic()
    print(f"{TRIGGER} annotations submitted at {time.strftime('%H:%M:%S')}; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs", flush=True)
    result = watch(project, url, t5, args.timeout)
    result.update({"images": len(images.images), "load_at_start": load,
                   "load_at_end": os.getloadavg(), "cpus": os.cpu_count()})
    cycle = result.get("cycle") or {}
    print(f"first trained pre-label {result.get('first_prelabel_s')} s after the 5th "
          f"annotation; cycle {cycle.get('status')} at {result.get('cycle_s')} s "
          f"(cycle {cycle.get('seconds')} s, timings {cycle.get('timings')})")
    return result


if __name__ == "__main__":
    sys.exit(main())
