"""What the dashboard shows, gathered without torch: per project the current version (the
store's side files), the learning curve (history.py, plus kept versions the history
lacks), per-class IoU against the previous version, the training queue (jobs.py) and the
region tasks (region_board.py). Every source may be missing or broken: a problem becomes
a line in `ProjectView.problems`, never an exception, so the page always renders.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import history
from . import store as store_module
from .charts import Bar, LineChart, class_bars, line_chart, time_label
from .settings import redact_url

__all__ = ["ProjectView", "TrainingView", "known_projects", "project_view", "public_settings",
           "training_view"]

_PROJECT_DIR = re.compile(r"\d+")
TOP_REGIONS = 8
KEY_KINDS = {"legacy": "legacy token", "pat": "personal access token"}
PHASE_NAMES = {"starting": "starting", "read": "reading Label Studio",
               "images": "loading images", "cold-start": "supervised warm-up",
               "evaluate": "evaluating on the holdout", "save": "saving the new version",
               "predict": "predicting and scoring the pool",
               "push-regions": "pushing region tasks", "done": "done"}


@dataclass
class TrainingView:
    state: str  # idle / queued / running / unavailable
    phase: str | None = None
    iteration: int | None = None
    total: int | None = None
    rate: float | None = None  # iterations (or images) per second
    eta_s: float | None = None
    loss: float | None = None
    message: str | None = None
    pending: int = 0
    train_after: int = 0
    last: str | None = None  # the last outcome, in words
    last_failed: bool = False
    queue: str = ""  # in-process / redis (QUEUE_NAME)
    since: str | None = None  # when the running cycle started / the queued one was asked
    reason: str | None = None

    @property
    def eta_text(self) -> str:
        seconds = max(0, int(round(self.eta_s or 0)))
        if seconds < 90:
            return f"{seconds} s"
        if seconds < 5400:
            return f"{round(seconds / 60)} min"
        return f"{seconds / 3600:.1f} h"

    @property
    def percent(self) -> float | None:
        if not self.total or self.iteration is None:
            return None
        return round(100.0 * min(self.iteration, self.total) / self.total, 1)


@dataclass
class ProjectView:
    key: str
    problems: list[str] = field(default_factory=list)
    current: dict | None = None
    cycles: int = 0  # records in the history (+ kept versions it lacks)
    unscored: int = 0  # cycles without a holdout score (no point on the curve)
    by_fraction: LineChart | None = None
    by_time: LineChart | None = None
    bars: list[Bar] = field(default_factory=list)
    previous_version: str | None = None
    training: TrainingView | None = None
    regions: dict | None = None
    studio_url: str = ""

    @property
    def busy(self) -> bool:
        return self.training is not None and self.training.state in ("queued", "running")


def known_projects(model_dir: str | Path, extra: list[str] = ()) -> list[str]:
    """Project ids with a store under MODEL_DIR/projects, plus `extra` (projects this
    process has seen), in numeric order."""
    found = set(str(e) for e in extra if _PROJECT_DIR.fullmatch(str(e)))
    try:
        found.update(entry.name for entry in (Path(model_dir) / "projects").iterdir()
                     if entry.is_dir() and _PROJECT_DIR.fullmatch(entry.name))
    except OSError:
        pass  # no MODEL_DIR/projects yet
    return sorted(found, key=int)


def project_view(settings: Any, key: str, board, jobs_status) -> ProjectView:
    """Everything the page says about one project. `board` is a RegionBoard,
    `jobs_status(project)` returns jobs.project_status's dict (or raises)."""
    view = ProjectView(key, studio_url=task_base(settings))
    store = store_module.project_store(settings.model_dir, key, settings.keep_versions)
    try:
        _current(view, store)
        records = _records(view, store)
    except OSError as exc:  # a folder where a file should be, an unreadable disk, ...
        view.problems.append(f"the store cannot be read ({type(exc).__name__}: {exc})")
        view.current, records = None, []
    _curves(view, records)
    _bars(view, records)
    try:
        view.training = training_view(jobs_status(int(key)))
    except Exception as exc:  # Redis down, ...: the rest of the page still stands
        view.training = TrainingView("unavailable", message=str(exc))
    stamp = f"{(view.current or {}).get('version')}|{view.training.last}"
    view.regions = _regions(board, int(key), stamp)
    return view


def task_base(settings: Any) -> str:
    """Label Studio's address as a person's browser reaches it, without credentials."""
    url = settings.label_studio_public_url or settings.label_studio_url
    return re.sub(r"//[^/@]*@", "//", redact_url(url))


def _current(view: ProjectView, store) -> None:
    pointer = store.pointer
    version = store.current()
    if version is None:
        if pointer.exists():
            view.problems.append(f"the store's pointer {pointer.name!r} names no stored "
                                 "checkpoint: predictions use the shared model, if any")
        elif store.versions():
            view.problems.append("checkpoints are stored but none is current")
        return
    meta = store.meta(version)
    if meta is None:
        view.problems.append(f"{version} has no readable side file "
                             f"({store.meta_path(version).name}): its scores are unknown")
        view.current = {"version": version}
        return
    teacher, student = history.scores(meta.get("metrics"))
    view.current = {
        "version": version,
        "method": meta.get("method") or (meta.get("config") or {}).get("method"),
        "created": meta.get("created"),
        "labelled_tasks": meta.get("labelled_tasks"),
        "holdout_tasks": meta.get("holdout_tasks"),
        "labelled_fraction": meta.get("labelled_fraction"),
        "teacher": teacher,
        "student": student,
        "published": meta.get("published", "teacher"),  # older versions served the teacher
        "classes": list(meta.get("classes") or []),
    }


def _records(view: ProjectView, store) -> list[dict]:
    """History records, then kept versions the history does not name (trained before
    the history existed, or imported), in version order."""
    try:
        records = history.read(store.root)
    except history.HistoryError as exc:
        view.problems.append(f"the learning history is broken: {exc}")
        records = []
    named = {r.get("version") for r in records}
    try:
        kept = store.versions()
    except OSError as exc:
        view.problems.append(f"the store cannot be listed: {exc}")
        kept = []
    for version in kept:
        meta = store.meta(version) if version not in named else None
        if meta is not None:
            teacher, student = history.scores(meta.get("metrics"))
            records.append({"version": version, "finished_at": meta.get("created"),
                            "labelled_fraction": meta.get("labelled_fraction"),
                            "classes": meta.get("classes"), "teacher": teacher,
                            "student": student})
    records.sort(key=lambda r: _sequence(r.get("version")))
    view.cycles = len(records)
    return records


def _sequence(version: Any) -> int:
    match = re.match(r"v(\d+)-", str(version or ""))
    return int(match.group(1)) if match else 0


def _curves(view: ProjectView, records: list[dict]) -> None:
    by_fraction: dict[str, list] = {"teacher": [], "student": []}
    by_time: dict[str, list] = {"teacher": [], "student": []}
    for record in records:
        fraction = record.get("labelled_fraction")
        stamp = _epoch(record.get("finished_at"))
        scored = False
        for name in ("teacher", "student"):
            miou = (record.get(name) or {}).get("miou")
            if not isinstance(miou, int | float) or not math.isfinite(miou):
                continue
            scored = True
            tip = _tooltip(record, name, miou)
            if isinstance(fraction, int | float):
                by_fraction[name].append((100 * fraction, 100 * miou, record["version"], tip))
            if stamp is not None:
                by_time[name].append((stamp, 100 * miou, record["version"], tip))
        view.unscored += 0 if scored else 1
    view.by_fraction = line_chart(by_fraction, x_label="labelled pixels (%)",
                                  y_label="holdout mIoU (%)",
                                  x_format=lambda v: f"{v:g}")
    stamps = [point[0] for values in by_time.values() for point in values]
    span = max(600.0, max(stamps) - min(stamps)) if stamps else 0.0  # the padded axis
    view.by_time = line_chart(by_time, x_label="time (UTC)", y_label="holdout mIoU (%)",
                              x_format=lambda v: time_label(v, span), x_time=True)


def _tooltip(record: dict, name: str, miou: float) -> str:
    fraction = record.get("labelled_fraction")
    where = f", {100 * fraction:.2f}% labelled" if isinstance(fraction, int | float) else ""
    return f"{record.get('version')} {name}: mIoU {100 * miou:.1f}%{where}"


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _bars(view: ProjectView, records: list[dict]) -> None:
    current = view.current or {}
    teacher = current.get("teacher") or {}
    classes = current.get("classes") or []
    if not classes or not teacher.get("iou"):
        return
    earlier = [r for r in records if _sequence(r.get("version")) < _sequence(current["version"])
               and (r.get("teacher") or {}).get("iou") and r.get("classes") == classes]
    previous = earlier[-1] if earlier else None
    view.previous_version = previous["version"] if previous else None
    view.bars = class_bars(classes, teacher["iou"],
                           previous["teacher"]["iou"] if previous else None)


def _regions(board, project: int, stamp: str) -> dict:
    from .region_board import region_summary

    return region_summary(board.regions(project, stamp), TOP_REGIONS)


def training_view(status: dict | None) -> TrainingView:
    """jobs.project_status's dict -> what the "training now" panel says."""
    status = status or {}
    if status.get("error"):
        return TrainingView("unavailable", message=str(status["error"]))
    view = TrainingView("idle", pending=int(status.get("pending_annotations") or 0),
                        train_after=int(status.get("train_after_annotations") or 0))
    view.last, view.last_failed = _last_words(status.get("last"))
    name = status.get("queue_name")
    view.queue = f"{status.get('queue') or '?'}" + (f" ({name})" if name else "")
    running, queued = status.get("running"), status.get("queued")
    if running:
        _progress(view, running.get("progress") or {})
        view.state, view.reason = "running", running.get("reason")
        view.since = _clock(running.get("started_at"))
    elif queued:
        view.state, view.reason = "queued", queued.get("reason")
        view.since = _clock(queued.get("since"))
        view.message = "waiting for a worker"
    return view


def _clock(epoch: Any) -> str | None:
    return time_label(epoch, 60) + " UTC" if isinstance(epoch, int | float) else None


def _progress(view: TrainingView, progress: dict) -> None:
    phase = str(progress.get("phase") or "starting")
    view.phase = PHASE_NAMES.get(phase, f"training ({phase})")
    view.message = progress.get("message")
    iteration, total = progress.get("iteration"), progress.get("total")
    if isinstance(iteration, int) and isinstance(total, int) and total > 0:
        view.iteration, view.total = iteration, total
    eta, loss = progress.get("eta_s"), progress.get("loss")
    view.eta_s = float(eta) if isinstance(eta, int | float) else None
    view.loss = float(loss) if isinstance(loss, int | float) else None
    if view.eta_s and view.total and view.iteration is not None and view.iteration < view.total:
        view.rate = (view.total - view.iteration) / view.eta_s


def _last_words(last: dict | None) -> tuple[str | None, bool]:
    """The last cycle's outcome as a sentence, and whether it failed."""
    if not last:
        return None, False
    stamp = last.get("finished_at")
    when = time_label(stamp) if isinstance(stamp, int | float) else "?"
    if last.get("status") == "failed":
        retry = " (it will be retried)" if last.get("will_retry") else ""
        return f"Failed at {when} UTC: {last.get('error')}{retry}", True
    if last.get("status") == "no-labels":
        return f"{when} UTC: nothing to train yet ({last.get('message') or 'no labels'})", False
    teacher, _ = history.scores(last.get("metrics"))
    score = f", holdout mIoU {100 * teacher['miou']:.1f}%" if teacher else ""
    verb = "trained" if last.get("trained") else "kept"
    seconds = last.get("seconds")
    took = f" in {seconds:.0f} s" if isinstance(seconds, int | float) else ""
    return (f"{when} UTC: {verb} {last.get('version')}{took}{score}; "
            f"{last.get('regions_created') or 0} region task(s) and "
            f"{last.get('predictions_pushed') or 0} prediction(s) pushed"), False


def public_settings(settings: Any) -> list[tuple[str, Any]]:
    """(VARIABLE, value) of every setting, secrets shown only as whether they are set."""
    values = settings.public()
    kind = values.pop("api_key_kind", None)
    if values.get("label_studio_api_key"):
        values["label_studio_api_key"] = f"(set: {KEY_KINDS.get(kind, kind)})"
    for key in ("label_studio_url", "label_studio_public_url"):
        if values.get(key):
            values[key] = re.sub(r"//[^/@]*@", "//", redact_url(values[key]))
    return [(name.upper(), value) for name, value in values.items()]
