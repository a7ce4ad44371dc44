"""A project's learning history: one small summary per trained cycle, beside its store.

``MODEL_DIR/projects/<id>/history.json`` is a JSON list of cycle records, oldest first,
rewritten atomically (``model.atomic``) after each cycle that trained a new version. The
store keeps only KEEP_VERSIONS checkpoints; the history keeps every cycle (up to
``MAX_RECORDS``), so the dashboard's learning curve spans the project's whole life.

A record (all JSON, no tensors)::

    {"version", "previous_version", "finished_at" (ISO UTC), "method", "classes",
     "labelled_fraction", "labelled_tasks", "holdout_tasks", "image_tasks",
     "region_tasks", "regions_created", "seconds",
     "teacher": {"miou", "iou": [per class or None]} | None, "student": ... | None}

Writing the history never fails a cycle: the new version is already saved and current
when it is written, so a problem is logged and the cycle's result stands. A file that
does not parse is moved aside (``history.json.broken-<time>``), never overwritten.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from model.atomic import atomic_write_bytes

from . import store as store_module

__all__ = ["HISTORY_FILE", "HistoryError", "append", "cycle_record", "read", "record_cycle",
           "scores"]

log = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
MAX_RECORDS = 5000  # ~1 kB each: a few MB at most, read on every dashboard refresh
COUNTED = ("labelled_fraction", "labelled_tasks", "holdout_tasks", "image_tasks",
           "region_tasks", "regions_created")


class HistoryError(ValueError):
    """The history file exists but is not a list of records."""


def history_path(root: str | Path) -> Path:
    return Path(root) / HISTORY_FILE


def read(root: str | Path) -> list[dict]:
    """The records under a store root, oldest first; [] when there is no history yet.
    Raises HistoryError when the file does not parse (the message says how)."""
    path = history_path(root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise HistoryError(f"{path.name} unreadable: {exc}") from exc
    try:
        records = json.loads(text)
    except ValueError as exc:
        raise HistoryError(f"{path.name} is not valid JSON ({exc})") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise HistoryError(f"{path.name} is not a list of cycle records")
    return records


def append(root: str | Path, record: dict) -> None:
    """Add one record (atomic rewrite). A broken file is moved aside first."""
    try:
        records = read(root)
    except HistoryError as exc:
        path = history_path(root)
        aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("%s; moved to %s, a new history starts", exc, aside.name)
        path.replace(aside)
        records = []
    records.append(record)
    payload = json.dumps(records[-MAX_RECORDS:], indent=0, default=str)
    atomic_write_bytes(history_path(root), payload.encode("utf-8"))


def scores(metrics: Any) -> tuple[dict | None, dict | None]:
    """(teacher, student) as ``{"miou", "iou"}`` from a version's metrics; a flat
    ``{"miou": ...}`` (a checkpoint trained offline) counts as the teacher's."""
    if not isinstance(metrics, dict):
        return None, None

    def one(value: Any) -> dict | None:
        if not isinstance(value, dict) or not isinstance(value.get("miou"), int | float):
            return None
        iou = value.get("iou")
        return {"miou": float(value["miou"]), "iou": list(iou) if isinstance(iou, list) else []}

    if "teacher" in metrics or "student" in metrics:
        return one(metrics.get("teacher")), one(metrics.get("student"))
    return one(metrics), None


def cycle_record(result: dict, meta: dict | None) -> dict:
    """The history record of a finished cycle (`cycle.run_cycle`'s result) and the
    saved version's side-file metadata."""
    meta = meta or {}
    teacher, student = scores(result.get("metrics"))
    timings = result.get("timings") or {}
    record = {
        "version": result.get("version"),
        "previous_version": result.get("previous_version"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": meta.get("method") or (meta.get("config") or {}).get("method"),
        "classes": list(meta.get("classes") or []),
        "seconds": round(sum(v for v in timings.values() if isinstance(v, int | float)), 1),
        "teacher": teacher,
        "student": student,
    }
    record.update({key: result.get(key) for key in COUNTED})
    return record


def record_cycle(settings: Any, project: int, result: dict) -> None:
    """Append the record of a cycle that trained a new version; a cycle that reused the
    current version or had nothing to train adds none. Logs, never raises."""
    if result.get("status") != "done" or not result.get("trained") or not result.get("version"):
        return
    try:
        store = store_module.project_store(settings.model_dir, project, settings.keep_versions)
        append(store.root, cycle_record(result, store.meta(result["version"])))
    except Exception as exc:  # the version is saved; only the curve misses a point
        log.error("project %s: cycle history not written: %s", project, exc)
