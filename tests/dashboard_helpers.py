"""Fixtures for the dashboard tests: a project store with a few cycles of history (more
cycles than the store keeps checkpoints), region tasks in the fake Label Studio, the
backend served over real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from werkzeug.serving import WSGIRequestHandler, make_server

from s4al_backend import history
from s4al_backend.store import project_store
from tests.fake_studio import FakeStudio
from tests.service_helpers import make_model


@dataclass(frozen=True)
class SeededCycle:
    version: str
    fraction: float
    teacher_miou: float
    iou: list[float]


def seed_history(settings, project: int, classes: list[str], cycles: int = 4,
                 spacing_s: float = 1800.0) -> list[SeededCycle]:
    """`cycles` trained versions through the real store and history code: mIoU and the
    labelled fraction grow per cycle; class 0's IoU drops in the last one (a "down"
    delta). Only settings.keep_versions checkpoints remain; the history keeps all. The
    records' times are then spread `spacing_s` apart, ending now (cycles take time)."""
    store = project_store(settings.model_dir, project, settings.keep_versions)
    seeded = []
    for k in range(cycles):
        iou = [round(0.15 + 0.1 * k + 0.02 * c, 4) for c in range(len(classes))]
        if k == cycles - 1:
            iou[0] = round(iou[0] - 0.2, 4)
        miou = sum(iou) / len(iou)
        metrics = {"teacher": {"miou": miou, "iou": iou, "pixel_accuracy": 0.5},
                   "student": {"miou": miou - 0.01, "iou": iou, "pixel_accuracy": 0.5}}
        fraction = round(0.04 + 0.03 * k, 4)
        version = store.save(make_model(len(classes), seed=k), classes, {
            "metrics": metrics, "labelled_fraction": fraction, "method": "s4al",
            "labelled_tasks": 3 + k, "holdout_tasks": 1})
        history.record_cycle(settings, project, {
            "status": "done", "trained": True, "version": version, "metrics": metrics,
            "labelled_fraction": fraction, "labelled_tasks": 3 + k, "holdout_tasks": 1,
            "timings": {"train_s": 10.0}})
        seeded.append(SeededCycle(version, fraction, miou, iou))
    records = history.read(store.root)
    now = datetime.now(timezone.utc)
    for k, record in enumerate(records):
        when = now - timedelta(seconds=spacing_s * (len(records) - 1 - k))
        record["finished_at"] = when.isoformat(timespec="seconds")
    history.history_path(store.root).write_text(json.dumps(records), encoding="utf-8")
    return seeded


def add_region_tasks(studio: FakeStudio, project: int, source_ids: list[int],
                     versions: list[str], per_cycle: int = 3) -> dict[int, dict]:
    """Region tasks as cycle.py imports them, `per_cycle` per version, the first of each
    cycle annotated (done). Returns {task id: data}."""
    made = {}
    for k, version in enumerate(versions):
        for j in range(per_cycle):
            source = source_ids[(k + j) % len(source_ids)]
            x, y = 8 + 24 * j, 16 + 8 * k
            data = {"image": studio.tasks[source]["data"]["image"], "source_task": source,
                    "x": x, "y": y, "w": 16, "h": 16,
                    "region_id": f"t{source}-x{x}-y{y}-w16-h16",
                    "uncertainty": round(0.9 - 0.05 * j - 0.01 * k, 4),
                    "cycle_version": version}
            task_id = studio.add_task(project, data)
            if j == 0:
                studio.add_annotation(task_id, [{"from_name": "tag", "to_name": "image",
                                                 "type": "brushlabels", "value": {}}])
            made[task_id] = data
    return made


class _QuietHandler(WSGIRequestHandler):
    def log(self, *args, **kwargs) -> None:  # the backend logs its own requests
        pass


@contextmanager
def serve(app) -> Iterator[str]:
    """The Flask app on a real HTTP port in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
