"""Training jobs: webhooks in, at most one queued and one running cycle per project out.

Two interchangeable queues run the same job code (`execute`):

- `RedisJobs` (REDIS_URL set): RQ on Redis, queue QUEUE_NAME. Workers are separate
  processes, any number on any number of machines sharing the Redis:
  `python -m s4al_backend.worker` (a `SimpleWorker` with the scheduler, which retries
  need), or `rq worker -w rq.worker.SimpleWorker --with-scheduler --url $REDIS_URL s4al`.
  Never rq's default forking worker: a forked job can deadlock inside torch.
- `LocalJobs` (no REDIS_URL): one background thread in the web process; the embedded
  default for one machine. A file lock in MODEL_DIR keeps two processes of that machine
  (gunicorn workers) from training one project at once.

Per project, in Redis under `s4al:<queue>:p<project>:`:

- `pending`: annotation events since the last cycle started. ANNOTATION_CREATED /
  ANNOTATION_UPDATED / ANNOTATIONS_DELETED add one; at TRAIN_AFTER_ANNOTATIONS (0 = never
  automatically) a cycle is requested. START_TRAINING requests one at once.
- `queued`: `<job id>|<time>` of the one queued job. Requests while it is pending coalesce
  into it, so a storm of webhooks leaves one queued job; none is lost, because a cycle
  rereads the whole project from Label Studio when it starts.
- `lock`: the job id training the project now, with a TTL renewed by a heartbeat thread.
  A second worker that picks the project's queued job while the lock is held puts it back
  (a new job id, still the one queued job) after a short wait: two workers never train one
  project at once. A SIGKILLed worker stops renewing; the lock expires after its TTL.
- `last`: the last cycle's outcome (JSON): result with version and metrics, or the error.

A job clears `queued` and `pending` once it holds the lock (later events queue the next
cycle), reports progress into `job.meta["progress"]` (phase, iteration, total, loss,
eta_s) and the log, and on failure records the error and lets RQ retry it with backoff
(`RETRY_INTERVALS`). The cycle saves a checkpoint atomically and makes it current only at
the end, so a killed job leaves the current version as it was.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import math
import os
import queue as queue_module
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")
START_EVENT = "START_TRAINING"
NOTED_EVENTS = ("PROJECT_UPDATED",)
DEFAULT_RUNNER = "s4al_backend.cycle:run_cycle"
JOB_FUNCTION = "s4al_backend.jobs.run_cycle_job"

RETRY_INTERVALS: tuple[int, ...] = (30, 120, 600)  # seconds before retry 1, 2, 3
LOCK_TTL = 60.0  # seconds a dead worker's lock outlives it
LOCK_WAIT = 5.0  # seconds a job waits before putting itself back when the lock is held
MARKER_GRACE = 30.0  # a queued marker younger than this is trusted even before its job exists
PROGRESS_EVERY = 1.0  # seconds between progress writes to Redis
PROGRESS_LOG_EVERY = 60.0  # seconds between progress lines in the log

Progress = Callable[[dict], None]
Runner = Callable[..., dict]


class QueueUnavailable(RuntimeError):
    """The queue (Redis) cannot take the request; the web layer answers 503."""


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
        if isinstance(candidate, int):
            return candidate
        if isinstance(candidate, str):
            head = candidate.split(".", 1)[0]  # /setup's "<id>.<timestamp>"
            if head.isdigit():
                return int(head)
    return None


def load_runner(path: str) -> Runner:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------- progress
class ProgressReporter:
    """Receives the cycle's progress dicts; keeps the latest, forwards it to `sink` at
    most every PROGRESS_EVERY seconds (and on every phase change), and logs phase changes,
    a progress line every PROGRESS_LOG_EVERY seconds and each phase's last iteration."""

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

    def __call__(self, update: dict) -> None:
        update = {k: v for k, v in update.items() if _jsonable(v)}
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
        count = max(1, len(data.get("annotations") or [])) if event == "ANNOTATIONS_DELETED" \
            else 1
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


# --------------------------------------------------------------------------- Redis
@dataclass(frozen=True)
class Keys:
    queue: str
    project: int

    def _k(self, name: str) -> str:
        return f"s4al:{self.queue}:p{self.project}:{name}"

    @property
    def pending(self) -> str:
        return self._k("pending")

    @property
    def queued(self) -> str:
        return self._k("queued")

    @property
    def lock(self) -> str:
        return self._k("lock")

    @property
    def last(self) -> str:
        return self._k("last")


# compare-and-set: replace KEYS[1] by ARGV[2] when it holds ARGV[1] ('' = absent)
_CAS = """
local cur = redis.call('get', KEYS[1])
if (cur == false and ARGV[1] == '') or cur == ARGV[1] then
  if ARGV[2] == '' then redis.call('del', KEYS[1])
  else redis.call('set', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3])) end
  return 1
end
return 0
"""
# renew KEYS[1]'s TTL (ms) if it still holds the token ARGV[1]
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# delete KEYS[1] if its value starts with ARGV[1]
_DEL_PREFIX = """
local cur = redis.call('get', KEYS[1])
if cur and string.sub(cur, 1, string.len(ARGV[1])) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

PENDING_STATUSES = ("queued", "scheduled", "deferred", "started")
MARKER_TTL = 7 * 24 * 3600


def _decode(value) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_marker(value) -> tuple[str, float] | None:
    text = _decode(value)
    if not text:
        return None
    job_id, _, stamp = text.partition("|")
    try:
        return job_id, float(stamp)
    except ValueError:
        return job_id, 0.0


class LockKeeper:
    """Holds `key` = `token` with a TTL, renewed from a daemon thread until `stop()`."""

    def __init__(self, connection, key: str, token: str, ttl: float):
        self.connection, self.key, self.token, self.ttl = connection, key, token, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lock {key}", daemon=True)

    def acquire(self) -> bool:
        return bool(self.connection.set(self.key, self.token, nx=True, px=int(self.ttl * 1000)))

    def start(self) -> LockKeeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.connection.eval(_RENEW, 1, self.key, self.token,
                                            int(self.ttl * 1000)):
                    log.error("lost the training lock %s (expired?)", self.key)
                    return
            except Exception as exc:  # Redis blips: try again at the next beat
                log.warning("could not renew lock %s: %s", self.key, exc)

    def release(self) -> None:
        self._stop.set()
        try:
            self.connection.eval(_RELEASE, 1, self.key, self.token)
        except Exception as exc:
            log.warning("could not release lock %s (it expires by itself): %s", self.key, exc)


class RedisJobs(Jobs):
    kind = "redis"

    def __init__(
        self,
        settings: Any,
        runner: Runner | str = DEFAULT_RUNNER,
        retry_intervals: Sequence[float] = RETRY_INTERVALS,
        lock_ttl: float = LOCK_TTL,
        lock_wait: float = LOCK_WAIT,
        connection=None,
    ):
        if not isinstance(runner, str):
            raise TypeError("RedisJobs needs the runner as an import path 'module:function'")
        super().__init__(settings, runner, retry_intervals)
        import redis
        from rq import Queue

        self.lock_ttl = lock_ttl
        self.lock_wait = lock_wait
        # the webhook answers within Label Studio's ~1 s: short timeouts on this side
        self.connection = connection or redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=0.5, socket_timeout=2.0
        )
        self.queue = Queue(settings.queue_name, connection=self.connection,
                           default_timeout=settings.job_timeout)
        self._errors = (redis.exceptions.RedisError, OSError)

    def keys(self, project: int) -> Keys:
        return Keys(self.settings.queue_name, project)

    def _unavailable(self, exc: BaseException) -> QueueUnavailable:
        from .settings import redact_url

        message = (f"Redis unavailable at {redact_url(self.settings.redis_url)}: "
                   f"{type(exc).__name__}: {exc}")
        log.error("%s", message)
        return QueueUnavailable(message)

    def _add_pending(self, project: int, count: int) -> int:
        try:
            return int(self.connection.incrby(self.keys(project).pending, count))
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    def _pending_job(self, job_id: str) -> str | None:
        """The job's status when it will still run, else None."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            status = Job.fetch(job_id, connection=self.connection).get_status()
        except NoSuchJobError:
            return None
        value = getattr(status, "value", status)
        return value if value in PENDING_STATUSES else None

    def request_cycle(self, project: int, reason: str = "") -> dict:
        try:
            return self._request_cycle(project, reason)
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    def _request_cycle(self, project: int, reason: str) -> dict:
        keys = self.keys(project)
        for _ in range(5):
            current = _decode(self.connection.get(keys.queued))
            marker = parse_marker(current)
            if marker:
                job_id, stamp = marker
                status = self._pending_job(job_id)
                if status or time.time() - stamp < MARKER_GRACE:
                    return {"status": "coalesced", "project": project, "job_id": job_id,
                            "message": f"a cycle is already queued ({status or 'queued'})"}
                log.warning("project %s: queued job %s is gone; queueing a new one",
                            project, job_id)
            job_id = new_job_id(self.settings.queue_name, project)
            value = f"{job_id}|{time.time():.3f}"
            if not self.connection.eval(_CAS, 1, keys.queued, current or "", value, MARKER_TTL):
                continue  # someone else changed it: look again
            try:
                self.enqueue(project, reason, job_id)
            except BaseException:
                self.connection.eval(_CAS, 1, keys.queued, value, "", 0)
                raise
            log.info("project %s: cycle queued as %s (%s)", project, job_id, reason)
            return {"status": "queued", "project": project, "job_id": job_id,
                    "message": f"training queued ({reason})" if reason else "training queued"}
        return {"status": "coalesced", "project": project,
                "message": "a cycle is being queued concurrently"}

    def enqueue(self, project: int, reason: str, job_id: str):
        from rq import Retry

        retry = None
        if self.retry_intervals:
            retry = Retry(max=len(self.retry_intervals),
                          interval=[int(math.ceil(i)) for i in self.retry_intervals])
        return self.queue.enqueue(
            JOB_FUNCTION,
            project,
            reason=reason,
            runner=self.runner,
            lock_ttl=self.lock_ttl,
            lock_wait=self.lock_wait,
            retry_intervals=list(self.retry_intervals),
            job_id=job_id,
            job_timeout=self.settings.job_timeout,
            retry=retry,
            result_ttl=7 * 24 * 3600,
            failure_ttl=7 * 24 * 3600,
            description=f"s4al cycle, project {project}: {reason or 'requested'}",
            meta={"project": project, "reason": reason, "enqueued_at": time.time()},
        )

    def status(self, project: int) -> dict:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        keys = self.keys(project)
        try:
            pending, queued_raw, lock_raw, last_raw = self.connection.mget(
                keys.pending, keys.queued, keys.lock, keys.last
            )
            out: dict[str, Any] = {
                "queue": "redis",
                "queue_name": self.settings.queue_name,
                "pending_annotations": int(pending or 0),
                "train_after_annotations": int(self.settings.train_after_annotations),
                "queued": None,
                "running": None,
                "last": json.loads(last_raw) if last_raw else None,
                "queue_length": self.queue.count,
            }
            marker = parse_marker(queued_raw)
            if marker:
                job_info: dict[str, Any] = {"job_id": marker[0], "since": marker[1]}
                try:
                    job = Job.fetch(marker[0], connection=self.connection)
                    job_info["status"] = getattr(job.get_status(), "value", None)
                    job_info["reason"] = job.meta.get("reason")
                except NoSuchJobError:
                    job_info["status"] = "missing"
                out["queued"] = job_info
            holder = _decode(lock_raw)
            if holder:
                running: dict[str, Any] = {"job_id": holder}
                try:
                    job = Job.fetch(holder, connection=self.connection)
                    running["started_at"] = job.meta.get("started_at")
                    running["reason"] = job.meta.get("reason")
                    running["progress"] = job.meta.get("progress")
                except NoSuchJobError:
                    pass
                out["running"] = running
            return out
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            pass


def new_job_id(queue: str, project: int) -> str:
    return f"s4al-{queue}-p{project}-{uuid.uuid4().hex[:12]}"


def run_cycle_job(
    project: int,
    reason: str = "",
    runner: str = DEFAULT_RUNNER,
    lock_ttl: float = LOCK_TTL,
    lock_wait: float = LOCK_WAIT,
    retry_intervals: Sequence[float] = RETRY_INTERVALS,
) -> dict:
    """The RQ job: one cycle of `project` under the project's lock (see the module doc)."""
    from rq import get_current_job

    from .settings import Settings

    job = get_current_job()
    if job is None:
        raise RuntimeError("run_cycle_job runs inside an RQ worker")
    settings = Settings.from_env()
    connection = job.connection
    keys = Keys(job.origin or settings.queue_name, project)
    lock = LockKeeper(connection, keys.lock, job.id, lock_ttl)
    if not lock.acquire():
        return _defer(job, keys, project, reason, runner, lock_ttl, lock_wait, retry_intervals)
    lock.start()
    try:
        connection.eval(_DEL_PREFIX, 1, keys.queued, job.id + "|")
        connection.delete(keys.pending)
        job.meta["started_at"] = time.time()
        job.meta["progress"] = {"phase": "starting"}
        job.save_meta()

        def sink(progress: dict) -> None:
            job.meta["progress"] = progress
            job.save_meta()

        reporter = ProgressReporter(project, sink)
        try:
            result = execute(settings, project, reason, reporter, runner)
        except Exception as exc:
            _record_failure(connection, keys, job, exc)
            raise
        result = {**result, "job_id": job.id, "finished_at": time.time()}
        connection.set(keys.last, json.dumps(result, default=str))
        sink({**reporter.latest, "phase": "done"})
        return result
    finally:
        lock.release()


def _defer(job, keys: Keys, project, reason, runner, lock_ttl, lock_wait, retry_intervals):
    """Another worker trains this project: wait a little, then put the cycle back as the
    project's one queued job (or leave it to a newer queued job)."""
    from rq import Queue, Retry

    holder = _decode(job.connection.get(keys.lock))
    log.info("project %s: %s is training it; job %s goes back to the queue", project,
             holder, job.id)
    time.sleep(lock_wait)
    connection = job.connection
    current = _decode(connection.get(keys.queued))
    marker = parse_marker(current)
    if marker and marker[0] != job.id:
        return {"status": "coalesced", "project": project, "into": marker[0]}
    new_id = new_job_id(keys.queue, project)
    value = f"{new_id}|{time.time():.3f}"
    if not connection.eval(_CAS, 1, keys.queued, current or "", value, MARKER_TTL):
        return {"status": "coalesced", "project": project}
    queue = Queue(job.origin, connection=connection)
    retry = Retry(max=len(retry_intervals), interval=[int(math.ceil(i)) for i in retry_intervals]) \
        if retry_intervals else None
    queue.enqueue(
        JOB_FUNCTION, project, reason=reason, runner=runner, lock_ttl=lock_ttl,
        lock_wait=lock_wait, retry_intervals=list(retry_intervals), job_id=new_id,
        job_timeout=job.timeout, retry=retry, result_ttl=7 * 24 * 3600,
        failure_ttl=7 * 24 * 3600, description=job.description,
        meta={"project": project, "reason": reason, "enqueued_at": time.time()},
    )
    return {"status": "deferred", "project": project, "requeued_as": new_id}


def _record_failure(connection, keys: Keys, job, exc: BaseException) -> None:
    from rq.timeouts import JobTimeoutException

    if isinstance(exc, JobTimeoutException):
        # the same cycle would time out again: no retry; the next webhook queues one
        job.retries_left = 0
        exc = RuntimeError(f"{exc} (JOB_TIMEOUT={job.timeout} s: raise it, or lower "
                           "CYCLE_BUDGET)")
    will_retry = bool(job.retries_left)
    if will_retry:
        # keep this job as the project's queued cycle until its retry runs, unless a
        # newer queued job already covers it (then the retry is dropped)
        value = f"{job.id}|{time.time():.3f}"
        if not connection.eval(_CAS, 1, keys.queued, "", value, MARKER_TTL):
            job.retries_left = 0
            will_retry = False
    record = {
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "job_id": job.id,
        "finished_at": time.time(),
        "will_retry": will_retry,
        "retries_left": job.retries_left or 0,
    }
    connection.set(keys.last, json.dumps(record))
    log.error("project %s: cycle failed: %s%s", job.meta.get("project"), record["error"],
              f" (retry in {job.get_retry_interval()} s, {job.retries_left} left)"
              if will_retry else " (no retry left)")


# --------------------------------------------------------------------------- in-process
class LocalJobs(Jobs):
    """The in-process queue: one daemon thread runs the cycles, in request order."""

    kind = "in-process"

    def __init__(
        self,
        settings: Any,
        runner: Runner | str = DEFAULT_RUNNER,
        retry_intervals: Sequence[float] = RETRY_INTERVALS,
        lock_poll: float = 2.0,
    ):
        super().__init__(settings, runner, retry_intervals)
        self.lock_poll = lock_poll
        self._lock = threading.RLock()
        self._state: dict[int, dict] = {}
        self._queue: queue_module.Queue = queue_module.Queue()
        self._timers: list[threading.Timer] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="s4al-jobs", daemon=True)
        self._thread.start()

    def _project(self, project: int) -> dict:
        return self._state.setdefault(
            project,
            {"pending": 0, "queued": None, "running": None, "last": None, "attempt": 0},
        )

    def _add_pending(self, project: int, count: int) -> int:
        with self._lock:
            state = self._project(project)
            state["pending"] += count
            return state["pending"]

    def request_cycle(self, project: int, reason: str = "") -> dict:
        with self._lock:
            state = self._project(project)
            if state["queued"] is not None:
                return {"status": "coalesced", "project": project,
                        "job_id": state["queued"]["job_id"],
                        "message": "a cycle is already queued"}
            job_id = new_job_id("local", project)
            state["queued"] = {"job_id": job_id, "since": time.time(), "reason": reason,
                               "attempt": 0}
            self._queue.put(project)
        log.info("project %s: cycle queued in-process as %s (%s)", project, job_id, reason)
        return {"status": "queued", "project": project, "job_id": job_id,
                "message": f"training queued ({reason})" if reason else "training queued"}

    def status(self, project: int) -> dict:
        with self._lock:
            state = self._project(project)
            running = None
            if state["running"]:
                running = {k: v for k, v in state["running"].items() if k != "reporter"}
                running["progress"] = dict(state["running"]["reporter"].latest)
            return {
                "queue": "in-process",
                "queue_name": None,
                "pending_annotations": state["pending"],
                "train_after_annotations": int(self.settings.train_after_annotations),
                "queued": dict(state["queued"]) if state["queued"] else None,
                "running": running,
                "last": state["last"],
                "queue_length": self._queue.qsize(),
            }

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until nothing is queued or running (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = any(s["queued"] or s["running"] for s in self._state.values())
            if not busy:
                return True
            time.sleep(0.05)
        return False

    def _loop(self) -> None:
        while not self._closed:
            project = self._queue.get()
            if project is None:
                return
            try:
                self._run(project)
            except Exception:  # never let the thread die
                log.exception("project %s: in-process job crashed", project)

    def _run(self, project: int) -> None:
        with self._lock:
            state = self._project(project)
            queued = state["queued"] or {"job_id": new_job_id("local", project), "reason": "",
                                         "attempt": 0}
        with _FileLock(self._lock_path(project), self.lock_poll) as held:
            if not held:
                return
            reporter = ProgressReporter(project)
            with self._lock:
                state["queued"] = None
                state["pending"] = 0
                state["running"] = {"job_id": queued["job_id"], "started_at": time.time(),
                                    "reason": queued["reason"], "reporter": reporter}
            try:
                result = execute(self.settings, project, queued["reason"], reporter,
                                 self.runner)
                record = {**result, "job_id": queued["job_id"], "finished_at": time.time()}
                attempt = None
            except Exception as exc:
                attempt = queued.get("attempt", 0)
                will_retry = attempt < len(self.retry_intervals)
                record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "job_id": queued["job_id"], "finished_at": time.time(),
                          "will_retry": will_retry,
                          "retries_left": max(0, len(self.retry_intervals) - attempt - 1)
                          if will_retry else 0}
                log.error("project %s: cycle failed: %s%s", project, record["error"],
                          f" (retry in {self.retry_intervals[attempt]} s)" if will_retry
                          else " (no retry left)")
                log.debug("%s", traceback.format_exc())
            with self._lock:
                state["running"] = None
                state["last"] = record
                if attempt is not None and record["will_retry"]:
                    if state["queued"] is None:
                        self._retry_later(project, queued["reason"], attempt + 1,
                                          self.retry_intervals[attempt])
                    else:  # a newer request is queued: it covers the retry
                        record["will_retry"] = False

    def _retry_later(self, project: int, reason: str, attempt: int, delay: float) -> None:
        """Queue the retry now (requests coalesce into it, as with RQ's scheduled
        retries); the worker thread gets it after `delay` seconds."""
        state = self._project(project)
        state["queued"] = {"job_id": new_job_id("local", project), "since": time.time(),
                           "reason": reason, "attempt": attempt,
                           "retry_at": time.time() + delay}

        def fire():
            if not self._closed:
                self._queue.put(project)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def _lock_path(self, project: int) -> Path:
        return Path(self.settings.model_dir) / "locks" / f"project-{project}.lock"

    def close(self) -> None:
        self._closed = True
        for timer in self._timers:
            timer.cancel()
        self._queue.put(None)


class _FileLock:
    """An exclusive flock on `path`, waited for by polling; released by the OS if the
    process dies."""

    def __init__(self, path: Path, poll: float, timeout: float | None = None):
        self.path, self.poll, self.timeout = path, poll, timeout
        self._fd: int | None = None

    def __enter__(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    return False
                time.sleep(self.poll)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


# --------------------------------------------------------------------------- factory
_instances: dict[tuple, Jobs] = {}
_instances_lock = threading.Lock()


def get_jobs(settings: Any) -> Jobs:
    """The process's queue for these settings: Redis when REDIS_URL is set, else the
    in-process one (created once per process)."""
    key = (settings.redis_url or "", settings.queue_name, str(settings.model_dir))
    with _instances_lock:
        jobs = _instances.get(key)
        if jobs is None:
            jobs = RedisJobs(settings) if settings.redis_url else LocalJobs(settings)
            _instances[key] = jobs
        return jobs


def project_status(settings: Any, project: int) -> dict:
    """`status(project)` of the process's queue, without starting an in-process queue
    just to report that nothing runs."""
    if not settings.redis_url:
        key = (settings.redis_url or "", settings.queue_name, str(settings.model_dir))
        with _instances_lock:
            existing = _instances.get(key)
        if existing is None:
            return {"queue": "in-process", "queue_name": None, "pending_annotations": 0,
                    "train_after_annotations": int(settings.train_after_annotations),
                    "queued": None, "running": None, "last": None, "queue_length": 0}
        return existing.status(project)
    return get_jobs(settings).status(project)


def reset_jobs() -> None:
    """Forget the process's queues (tests)."""
    with _instances_lock:
        for jobs in _instances.values():
            jobs.close()
        _instances.clear()
