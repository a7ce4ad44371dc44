"""What both training queues share (jobs.py picks one; redis_jobs.py, local_jobs.py).

- The webhook rules (`Jobs.on_event`): ANNOTATION_CREATED / ANNOTATION_UPDATED /
  ANNOTATIONS_DELETED add to the project's `pending` counter; at TRAIN_AFTER_ANNOTATIONS (0 =
  never automatically) a cycle is requested. START_TRAINING requests one at once.
- Coalescing: one queued cycle per project; requests while it waits coalesce into it, so
  a storm of webhooks leaves one queued job; none is lost, because a cycle rereads the
  whole project from Label Studio when it starts. The replies (`queued_reply`,
  `coalesced_reply`), the failure record (`failure_record`) and the status dict
  (`status_dict`) are built here, once, for both queues.
- The job body both run: `execute` with a `ProgressReporter`.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")
START_EVENT = "START_TRAINING"
NOTED_EVENTS = ("PROJECT_UPDATED",)
DEFAULT_RUNNER = "s4al_backend.cycle:run_cycle"

RETRY_INTERVALS: tuple[int, ...] = (30, 120, 600)  # seconds before retry 1, 2, 3
PROGRESS_EVERY = 1.0  # seconds between progress writes to Redis
PROGRESS_LOG_EVERY = 60.0  # seconds between progress lines in the log
RETRY_NOW = "the retry waiting for its backoff runs now"

Runner = Callable[..., dict]


class QueueUnavailable(RuntimeError):
    """The queue (Redis) cannot take the request; the web layer answers 503."""


_MAX_PROJECT_ID = 10**18  # Label Studio's ids are database integers


def project_of(data: Any) -> int | None:
    """The project id of a webhook body: `project` is an object with `id` (1.23), an id,
    or a `task`'s project."""
    if not isinstance(data, dict):
        return None
    for candidate in (data.get("project"), (data.get("task") or {}).get("project")
                      if isinstance(data.get("task"), dict) else None):
        if isinstance(candidate, dict):
            candidate = candidate.get("id")
        if isinstance(candidate, bool):
            continue
        if isinstance(candidate, int) and 0 <= candidate < _MAX_PROJECT_ID:
            return candidate
        if isinstance(candidate, str):
            head = candidate.split(".", 1)[0]  # /setup's "<id>.<timestamp>"
            if head.isascii() and head.isdigit() and len(head) <= 18:
                return int(head)
    return None


def load_runner(path: str) -> Runner:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------- progress
class ProgressReporter:
    """Receives the cycle's progress dicts; keeps the latest, forwards it to `sink` at
    most every PROGRESS_EVERY seconds (and on every phase change), and logs phase changes,
    a progress line every PROGRESS_LOG_EVERY seconds and each phase's last iteration.

    An update may carry `step: {"name", "done", "total"}`: the cycle's own steps (read,
    images, train, score, push; `cycle.STEPS`) kept side by side in `latest["steps"]`
    (`{name: {"done", "total"}}`, total None while unknown), so /status shows every step
    so far, not only the current phase."""

    def __init__(self, project: int, sink: Callable[[dict], None] | None = None):
        self.project = project
        self.sink = sink
        self.latest: dict = {}
        self._last_write = 0.0
        self._last_phase = None
        self._last_line = time.monotonic()
        self.started = time.time()
        self.phase_times: dict[str, float] = {}
        self._phase_started = time.monotonic()
        self.steps: dict[str, dict] = {}

    def __call__(self, update: dict) -> None:
        step = update.get("step")
        if isinstance(step, dict) and step.get("name"):
            self.steps[str(step["name"])] = {"done": step.get("done"),
                                             "total": step.get("total")}
        update = {k: v for k, v in update.items() if _jsonable(v) and k != "step"}
        update["steps"] = {name: dict(value) for name, value in self.steps.items()}
        phase = update.get("phase")
        now = time.monotonic()
        changed = phase is not None and phase != self._last_phase
        if changed:
            if self._last_phase is not None:
                self.phase_times[self._last_phase] = (
                    self.phase_times.get(self._last_phase, 0.0) + now - self._phase_started
                )
            self._phase_started = now
            self._last_phase = phase
            self._last_line = now
            log.info("project %s: %s%s", self.project, phase,
                     f" ({update['message']})" if update.get("message") else "")
        # a new phase starts afresh: no stale rate or ETA of the previous one in /status
        self.latest = {**({} if changed else self.latest), **update, "updated_at": time.time()}
        if "message" not in update and not changed:
            self.latest.pop("message", None)
        total, iteration = update.get("total"), update.get("iteration")
        if isinstance(total, int) and isinstance(iteration, int) and total > 0 and (
                now - self._last_line >= PROGRESS_LOG_EVERY or iteration == total):
            self._last_line = now
            log.info("project %s: %s", self.project, progress_line(update))
        if self.sink and (changed or now - self._last_write >= PROGRESS_EVERY):
            self._last_write = now
            try:
                self.sink(dict(self.latest))
            except Exception as exc:  # progress must never fail a cycle
                log.warning("project %s: progress not saved: %s", self.project, exc)

    def finish(self) -> dict[str, float]:
        if self._last_phase is not None:
            self.phase_times[self._last_phase] = (
                self.phase_times.get(self._last_phase, 0.0) + time.monotonic()
                - self._phase_started
            )
        return {k: round(v, 3) for k, v in self.phase_times.items()}


def progress_line(update: dict) -> str:
    """`s4al 334/2000 loss 0.512, 0.25 it/s, phase eta 6664 s, eta 6664 s`."""
    parts = [f"{update.get('phase')} {update['iteration']}/{update['total']}"]
    loss, rate = update.get("loss"), update.get("rate")
    if isinstance(loss, float):
        parts[0] += f" loss {loss:.3f}"
    if isinstance(rate, float | int):
        parts.append(f"{rate:.2f} it/s")
    for key, name in (("phase_eta_s", "phase eta"), ("eta_s", "eta")):
        if isinstance(update.get(key), float | int):
            parts.append(f"{name} {update[key]:.0f} s")
    return ", ".join(parts)


def _jsonable(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int | bool | type(None) | list | dict)


def execute(
    settings: Any,
    project: int,
    reason: str,
    progress: ProgressReporter,
    runner: Runner | str = DEFAULT_RUNNER,
) -> dict:
    """Run one cycle (the same code for both queues); returns the cycle's result dict with
    `seconds` and per-phase `timings` added."""
    fn = load_runner(runner) if isinstance(runner, str) else runner
    started = time.monotonic()
    log.info("project %s: cycle starts (%s)", project, reason or "requested")
    try:
        result = fn(settings, project, reason=reason, progress=progress) or {}
    finally:
        timings = progress.finish()
    result = dict(result)
    result.setdefault("status", "done")
    result["seconds"] = round(time.monotonic() - started, 3)
    result.setdefault("timings", timings)
    log.info(
        "project %s: cycle %s in %.1f s (version %s)%s", project, result["status"],
        result["seconds"], result.get("version"),
        f" timings {result['timings']}" if result.get("timings") else "",
    )
    return result


# --------------------------------------------------------------------------- base
class Jobs:
    """What the web layer uses: `on_event(event, data)`, `request_cycle(project)`,
    `status(project)`."""

    kind = "none"

    def __init__(
        self,
        settings: Any,
        runner: Runner | str = DEFAULT_RUNNER,
        retry_intervals: Sequence[float] = RETRY_INTERVALS,
    ):
        self.settings = settings
        self.runner = runner
        self.retry_intervals = tuple(retry_intervals)

    # the webhook
    def on_event(self, event: str, data: dict) -> dict:
        event = str(event or "").upper()
        project = project_of(data)
        if event in NOTED_EVENTS:
            return {"status": "ignored", "event": event, "project": project,
                    "message": "noted; the next cycle rereads the project and its config"}
        if event not in ANNOTATION_EVENTS and event != START_EVENT:
            return {"status": "ignored", "event": event, "project": project,
                    "message": f"event {event or '(none)'} does not start training"}
        if project is None:
            return {"status": "ignored", "event": event,
                    "message": "no project id in the webhook body"}
        if event == START_EVENT:
            return {"event": event, **self.request_cycle(project, "START_TRAINING")}
        deleted = data.get("annotations")
        count = max(1, len(deleted)) if event == "ANNOTATIONS_DELETED" and isinstance(
            deleted, list) else 1
        pending = self._add_pending(project, count)
        threshold = int(self.settings.train_after_annotations)
        if threshold <= 0 or pending < threshold:
            return {"status": "counted", "event": event, "project": project,
                    "pending": pending, "train_after": threshold,
                    "message": f"{pending} annotation change(s) since the last cycle"
                    + (f"; training starts at {threshold}" if threshold > 0 else
                       "; TRAIN_AFTER_ANNOTATIONS=0: only START_TRAINING trains")}
        return {"event": event, "pending": pending,
                **self.request_cycle(project, f"{pending} annotation change(s)")}

    def request_cycle(self, project: int, reason: str = "") -> dict:
        raise NotImplementedError

    def status(self, project: int) -> dict:
        raise NotImplementedError

    def _add_pending(self, project: int, count: int) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


def new_job_id(queue: str, project: int) -> str:
    return f"s4al-{queue}-p{project}-{uuid.uuid4().hex[:12]}"


def queued_reply(project: int, job_id: str, reason: str) -> dict:
    """`request_cycle`'s reply when it queued a new cycle."""
    return {"status": "queued", "project": project, "job_id": job_id,
            "message": f"training queued ({reason})" if reason else "training queued"}


def coalesced_reply(project: int, job_id: str, message: str) -> dict:
    """`request_cycle`'s reply when the project's queued cycle covers the request."""
    return {"status": "coalesced", "project": project, "job_id": job_id, "message": message}


def failure_record(exc: BaseException, job_id: str, will_retry: bool,
                   retries_left: int) -> dict:
    """The project's `last` outcome after a failed cycle."""
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "job_id": job_id,
            "finished_at": time.time(), "will_retry": will_retry,
            "retries_left": retries_left}


def status_dict(
    settings: Any,
    queue: str,
    queue_name: str | None = None,
    pending: int = 0,
    queued: dict | None = None,
    running: dict | None = None,
    last: dict | None = None,
    queue_length: int = 0,
) -> dict:
    """`Jobs.status(project)`: the same keys, in the same order, from either queue."""
    return {
        "queue": queue,
        "queue_name": queue_name,
        "pending_annotations": pending,
        "train_after_annotations": int(settings.train_after_annotations),
        "queued": queued,
        "running": running,
        "last": last,
        "queue_length": queue_length,
    }
