"""One cycle per project size: Label Studio traffic, peak memory and time (issue 17).

For each N a fake Label Studio (tests/fake_studio.py, its own process) holds N tasks of a
tiny image each, a few annotated ones and every task carrying predictions of a few past
versions; one cycle (`s4al_backend.cycle.run_cycle`, a short schedule) runs in a fresh
process, so its peak RSS is its own. Prints per N: bytes the backend read from and wrote to
Label Studio (API and images apart), the cycle process's peak RSS, seconds per phase, and
the growth from one N to the next. Not a test (20,000 tasks take minutes).

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.cycle_scale \\
        --tasks 1000,5000,20000 --json benchmarks/results/cycle-scale.json

`--workers 1,2` runs each cycle in worker mode instead: that many
`python -m s4al_backend.worker` processes on a Redis (`--redis-url`), one of which takes
the cycle while the others help with its pool chunks (`s4al_backend.chunk_jobs`); the
row adds the chunks each helper ran and every worker's peak RSS.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

SIZE = (32, 48)  # height, width of every task image (--image-size)
CLASSES = ["Sky", "Road", "Car"]
SCHEDULE = {  # short: the cycle's I/O, not its training, is measured
    "TRAIN_ITERATIONS": "6", "COLD_START_ITERATIONS": "3", "TRAIN_CROP": "32",
    "TRAIN_BATCH_SIZE": "2", "PREDICT_BATCH_SIZE": "32", "HOLDOUT_FRACTION": "0",
    "REGION_SIZE": "8", "REGIONS_PER_IMAGE": "1", "REGIONS_PER_CYCLE": "20",
    "ACQUIRE_WITH": "teacher",  # one network pass per image
    "DEVICE": "cpu", "BACKBONE_WEIGHTS": "none", "TORCH_THREADS": "1", "AMP": "off",
    "FIRST_VERSION": "false", "CYCLE_BUDGET": "0", "COLD_START_BUDGET": "0",
}


# --------------------------------------------------------------------------- the studio
def png(seed: int, size: tuple[int, int] = SIZE) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def build_project(studio, tasks: int, annotated: int, versions: int,
                  size: tuple[int, int] = SIZE) -> int:
    """N tasks (8 distinct images under N URLs: the cache is keyed by URL), `annotated`
    of them with a brush annotation, each with a prediction of `versions` past versions."""
    from s4al_backend.labels import LabelMap, mask_to_results
    from tests.fake_studio import camvid_label_config

    config = camvid_label_config(CLASSES)
    label_map = LabelMap.from_config(config)
    project = studio.add_project(config, title=f"scale {tasks}")
    images = [png(seed, size) for seed in range(8)]
    rng = np.random.default_rng(0)
    mask = rng.integers(0, len(CLASSES), size)
    annotation = mask_to_results(mask, label_map)
    old = [{"result": mask_to_results(rng.integers(0, len(CLASSES), size),
                                      label_map, np.full(size, 0.5)),
            "score": 0.5, "model_version": f"v{seq:04d}-20260101-00000{seq}"}
           for seq in range(1, versions + 1)]
    for index in range(tasks):
        url = studio.add_file(project, f"t{index}.png", images[index % len(images)])
        tid = studio.add_task(project, {"image": url},
                              annotations=[annotation] if index < annotated else [])
        for prediction in old:
            studio.add_prediction(tid, prediction)
    return project


def serve(args) -> None:
    """The fake Label Studio's process: prints `url project` once ready, then answers
    `bytes` on stdin with its byte counts (JSON) until stdin closes."""
    from tests.fake_studio import FakeStudio

    studio = FakeStudio(page_size_max=100)
    project = build_project(studio, args.tasks, args.annotated, args.versions,
                            parse_size(args.image_size))
    studio.start()
    print(studio.url, project, flush=True)
    for line in sys.stdin:
        if line.strip() == "bytes":
            print(json.dumps(traffic(studio.requests)), flush=True)


def traffic(requests) -> dict:
    images = [r for r in requests if r.path.startswith("/data/")]
    api = [r for r in requests if not r.path.startswith("/data/")]
    return {
        "api_read": sum(r.received for r in api), "api_written": sum(r.sent for r in api),
        "image_read": sum(r.received for r in images), "requests": len(requests),
        "task_pages": sum(1 for r in api if r.path == "/api/tasks/"),
        "tasks_read": sum(r.received for r in api if r.path == "/api/tasks/"),
        "predictions_written": sum(r.sent for r in api if r.path.endswith("/import/predictions")),
        "version_deletes": sum(1 for r in api if r.method == "DELETE"),
    }


# --------------------------------------------------------------------------- the cycle
def cycle(args) -> None:
    """One cycle in this (fresh) process; prints its result, peak RSS and phase times."""
    from s4al_backend.cycle import run_cycle
    from s4al_backend.jobs_base import ProgressReporter
    from s4al_backend.settings import Settings

    env = {**SCHEDULE, "LABEL_STUDIO_URL": args.url, "LABEL_STUDIO_API_KEY": args.key,
           "MODEL_DIR": args.model_dir, "IMAGE_CACHE_MB": "4096"}
    settings = Settings.from_env(env)
    reporter = ProgressReporter(args.project)
    started = time.monotonic()
    result = run_cycle(settings, args.project, reason="benchmark", progress=reporter)
    print(json.dumps({
        "seconds": round(time.monotonic() - started, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "timings": result["timings"], "phases": reporter.finish(),
        "predictions_pushed": result.get("predictions_pushed"),
        "regions_created": result.get("regions_created"),
        "deleted": result.get("prediction_versions_deleted"),
        "steps": reporter.latest.get("steps"),
    }))


# --------------------------------------------------------------------------- driver
def measure(tasks: int, annotated: int, versions: int, workers: int = 0,
            redis_url: str = "", chunk: int = 200, size: str = "32x48") -> dict:
    me = [sys.executable, "-m", "benchmarks.cycle_scale"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCORE_CHUNK": str(chunk)}
    server = subprocess.Popen([*me, "serve", "--tasks", str(tasks), "--annotated",
                               str(annotated), "--versions", str(versions),
                               "--image-size", size],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        url, project = server.stdout.readline().split()
        from tests.fake_studio import FakeStudio

        with tempfile.TemporaryDirectory() as model_dir:
            if workers:
                result = worker_cycle(url, int(project), model_dir, workers, redis_url, env)
            else:
                done = subprocess.run([*me, "cycle", "--url", url, "--project", project,
                                       "--key", FakeStudio.api_key, "--model-dir", model_dir],
                                      capture_output=True, text=True, env=env, check=False)
                if done.returncode:
                    raise SystemExit(f"cycle failed for N={tasks}:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
        server.stdin.write("bytes\n")
        server.stdin.flush()
        result["traffic"] = json.loads(server.stdout.readline())
    finally:
        server.stdin.close()
        server.terminate()
        server.wait(30)
    return {"tasks": tasks, "annotated": annotated, "past_versions": versions,
            "workers": workers, "score_chunk": chunk, "image_size": size, **result}


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width)


def worker_cycle(url: str, project: int, model_dir: str, workers: int, redis_url: str,
                 env: dict) -> dict:
    """One cycle through the Redis queue with `workers` worker processes."""
    import redis
    from rq import Queue
    from rq.job import Job

    from s4al_backend.redis_jobs import RedisJobs
    from s4al_backend.settings import Settings
    from tests.fake_studio import FakeStudio

    queue = f"scale-{uuid.uuid4().hex[:8]}"
    cycle_env = {**env, **SCHEDULE, "LABEL_STUDIO_URL": url,
                 "LABEL_STUDIO_API_KEY": FakeStudio.api_key, "MODEL_DIR": model_dir,
                 "IMAGE_CACHE_MB": "4096", "REDIS_URL": redis_url, "QUEUE_NAME": queue,
                 "LOG_LEVEL": "WARNING"}
    logs = [tempfile.TemporaryFile("w+") for _ in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-m", "s4al_backend.worker", "--name",
                               f"{queue}-w{i}"], env=cycle_env, stdout=log,
                              stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    connection = redis.Redis.from_url(redis_url)
    try:
        _wait(lambda: len(connection.smembers(f"rq:workers:{queue}")) == workers, 120)
        jobs = RedisJobs(Settings.from_env(cycle_env), retry_intervals=())
        started = time.monotonic()
        job_id = jobs.request_cycle(project, "benchmark")["job_id"]
        job = Job.fetch(job_id, connection=connection)
        _wait(lambda: job.get_status(refresh=True).value in ("finished", "failed"), 7200)
        seconds = time.monotonic() - started
        if job.get_status().value != "finished":
            logs[0].seek(0)
            raise SystemExit(f"cycle failed: {jobs.status(project)['last']}\n"
                             f"{logs[0].read()[-3000:]}")
        result = job.return_value()
        helpers = Queue(f"{queue}-chunks", connection=connection)
        helped = [Job.fetch(i, connection=connection).return_value()["chunks"]
                  for i in helpers.finished_job_registry.get_job_ids()]
        peaks = [_peak_rss_mb(p.pid) for p in procs]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    return {"seconds": round(seconds, 2), "peak_rss_mb": max(peaks),
            "worker_peak_rss_mb": peaks, "helper_chunks": helped,
            "timings": result["timings"], "predictions_pushed": result["predictions_pushed"],
            "regions_created": result.get("regions_created"),
            "deleted": result.get("prediction_versions_deleted")}


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.5)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def report(rows: list[dict]) -> str:
    lines = ["| N | past versions | workers | API read | tasks read | API written | "
             "images read | peak RSS MB | s total | read | images | train | acquire | push |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t, s = row["traffic"], row["timings"]
        lines.append(
            f"| {row['tasks']:,} | {row['past_versions']} | {_workers(row)} | "
            f"{_mb(t['api_read'])} | "
            f"{_mb(t['tasks_read'])} | {_mb(t['api_written'])} | {_mb(t['image_read'])} | "
            f"{row['peak_rss_mb']} | {row['seconds']} | {s.get('read_s')} | "
            f"{s.get('images_s')} | {s.get('train_s')} | {s.get('acquire_s')} | "
            f"{s.get('push_s')} |")
    for before, after in zip(rows, rows[1:], strict=False):
        if (before["past_versions"], before.get("workers")) != (
                after["past_versions"], after.get("workers")):
            continue
        scale = after["tasks"] / before["tasks"]
        lines.append(
            f"\n{before['tasks']:,} -> {after['tasks']:,} tasks (x{scale:g}): peak RSS "
            f"x{after['peak_rss_mb'] / before['peak_rss_mb']:.3f}, seconds "
            f"x{after['seconds'] / before['seconds']:.2f}, API read "
            f"x{after['traffic']['api_read'] / before['traffic']['api_read']:.2f}, "
            f"written x{after['traffic']['api_written'] / before['traffic']['api_written']:.2f}")
    return "\n".join(lines)


def _workers(row: dict) -> str:
    if not row.get("workers"):
        return "in-process"
    helped = row.get("helper_chunks") or []
    return f"{row['workers']} (helpers ran {sum(helped)} chunks)"


def _mb(value: int) -> str:
    return f"{value / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    for name in ("serve",):
        p = sub.add_parser(name)
        p.add_argument("--tasks", type=int, required=True)
        p.add_argument("--annotated", type=int, default=5)
        p.add_argument("--versions", type=int, default=3)
        p.add_argument("--image-size", default="32x48")
    p = sub.add_parser("cycle")
    for flag in ("--url", "--key", "--model-dir"):
        p.add_argument(flag, required=True)
    p.add_argument("--project", type=int, required=True)
    parser.add_argument("--tasks", default="1000,5000,20000")
    parser.add_argument("--versions", default="3", help="past versions per run, e.g. 0,3")
    parser.add_argument("--annotated", type=int, default=5)
    parser.add_argument("--workers", default="0",
                        help="worker processes per run, e.g. 1,2 (0: the cycle in-process)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--score-chunk", type=int, default=200, help="SCORE_CHUNK")
    parser.add_argument("--image-size", default="32x48", help="HEIGHTxWIDTH of every task image")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "cycle":
        return cycle(args)
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        for versions in (int(v) for v in args.versions.split(",")):
            for tasks in (int(n) for n in args.tasks.split(",")):
                rows.append(measure(tasks, args.annotated, versions, workers,
                                    args.redis_url, args.score_chunk, args.image_size))
                print(json.dumps(rows[-1]), flush=True)
    print(report(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
