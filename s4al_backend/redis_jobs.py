"""The Redis queue: RQ on Redis, queue QUEUE_NAME (used when REDIS_URL is set).

Workers are separate processes, any number on any number of machines sharing the Redis:
`python -m s4al_backend.worker` (a `SimpleWorker` with the scheduler, which retries need),
or `rq worker -w rq.worker.SimpleWorker --with-scheduler --url $REDIS_URL s4al`. Never rq's
default forking worker: a forked job can deadlock inside torch.

Per project, in Redis under `s4al:<queue>:p<project>:`:

- `pending`: annotation events since the last cycle started (jobs_base.Jobs.on_event).
- `queued`: `<job id>|<time>` of the one queued job. Requests while it is pending coalesce
  into it.
- `lock`: the job id training the project now (locks.RedisLock: a TTL renewed by a
  heartbeat thread). A second worker that picks the project's queued job while the lock
  is held puts it back (a new job id, still the one queued job) after a short wait: two
  workers never train one project at once. A SIGKILLed worker stops renewing; the lock
  expires after its TTL.
- `last`: the last cycle's outcome (JSON): result with version and metrics, or the error.

A job clears `queued` and `pending` once it holds the lock (later events queue the next
cycle), reports progress into `job.meta["progress"]` (phase, iteration, total, loss,
eta_s) and the log, and on failure records the error and lets RQ retry it with backoff
(`RETRY_INTERVALS`). The cycle saves a checkpoint atomically and makes it current only at
the end, so a killed job leaves the current version as it was.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .jobs_base import (
    DEFAULT_RUNNER,
    RETRY_INTERVALS,
    RETRY_NOW,
    START_EVENT,
    Jobs,
    ProgressReporter,
    QueueUnavailable,
    Runner,
    coalesced_reply,
    execute,
    failure_record,
    new_job_id,
    queued_reply,
    status_dict,
)
from .locks import RedisLock

log = logging.getLogger(__name__)

# the dotted path queued RQ jobs name: keep it (jobs.py re-exports run_cycle_job)
JOB_FUNCTION = "s4al_backend.jobs.run_cycle_job"

WEB_REDIS_CONNECTIONS = 100  # per web process; more requests wait for a free one
WEB_REDIS_TIMEOUT = 0.75  # seconds: each Redis call of a web request, and the pool wait
LOCK_TTL = 60.0  # seconds a dead worker's lock outlives it
LOCK_WAIT = 5.0  # seconds a job waits before putting itself back when the lock is held
MARKER_GRACE = 30.0  # a queued marker younger than this is trusted even before its job exists
RESULT_TTL = 7 * 24 * 3600  # seconds RQ keeps a finished or failed job



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


def web_connection(url: str):
    """The web side's Redis client. The webhook answers within Label Studio's ~1 s: short
    timeouts and no retries, so a frozen Redis is a 503 within a second; and a pool that
    waits for a free connection rather than failing, so a burst of webhooks beyond the
    pool's size is served, not answered 503 (and its annotations' triggers lost)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=WEB_REDIS_CONNECTIONS, timeout=WEB_REDIS_TIMEOUT,
        socket_connect_timeout=WEB_REDIS_TIMEOUT, socket_timeout=WEB_REDIS_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )
    return redis.Redis(connection_pool=pool)


class RedisJobs(Jobs):
    """The web side of the Redis queue: counts events, queues one RQ job per project
    (coalescing), reads its status; the job itself is `run_cycle_job` in a worker."""

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
        self.connection = connection or web_connection(settings.redis_url)
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
                if status == "scheduled" and reason == START_EVENT:
                    self._run_retry_now(job_id)
                    return coalesced_reply(project, job_id, RETRY_NOW)
                if status or time.time() - stamp < MARKER_GRACE:
                    return coalesced_reply(project, job_id, "a cycle is already queued "
                                           f"({status or 'queued'})")
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
            return queued_reply(project, job_id, reason)
        return {"status": "coalesced", "project": project,
                "message": "a cycle is being queued concurrently"}

    def _run_retry_now(self, job_id: str) -> None:
        """*Start Training* while a failed cycle waits for its retry backoff (30 s to
        10 min): the user has fixed the fault, so the retry is due now (the scheduler
        queues it within a second)."""
        from datetime import datetime, timezone

        from rq.job import Job

        job = Job.fetch(job_id, connection=self.connection)
        self.queue.schedule_job(job, datetime.now(timezone.utc))
        log.info("project job %s: retry brought forward (START_TRAINING)", job_id)

    def enqueue(self, project: int, reason: str, job_id: str):
        return enqueue_cycle(
            self.queue, project, reason, job_id, runner=self.runner,
            lock_ttl=self.lock_ttl, lock_wait=self.lock_wait,
            retry_intervals=self.retry_intervals, timeout=self.settings.job_timeout,
            description=f"s4al cycle, project {project}: {reason or 'requested'}",
        )

    def status(self, project: int) -> dict:
        keys = self.keys(project)
        try:
            pending, queued_raw, lock_raw, last_raw = self.connection.mget(
                keys.pending, keys.queued, keys.lock, keys.last
            )
            return status_dict(
                self.settings, "redis", queue_name=self.settings.queue_name,
                pending=int(pending or 0),
                last=json.loads(last_raw) if last_raw else None,
                queue_length=self.queue.count,
                queued=self._queued_info(parse_marker(queued_raw)),
                running=self._running_info(_decode(lock_raw)),
            )
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    def _queued_info(self, marker: tuple[str, float] | None) -> dict | None:
        """The queued marker's job: id, since, RQ status (`missing` when gone), reason."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        if not marker:
            return None
        job_info: dict[str, Any] = {"job_id": marker[0], "since": marker[1]}
        try:
            job = Job.fetch(marker[0], connection=self.connection)
            job_info["status"] = getattr(job.get_status(), "value", None)
            job_info["reason"] = job.meta.get("reason")
        except NoSuchJobError:
            job_info["status"] = "missing"
        return job_info

    def _running_info(self, holder: str | None) -> dict | None:
        """The lock holder's job: id, started_at, reason and its latest progress."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        if not holder:
            return None
        running: dict[str, Any] = {"job_id": holder}
        try:
            job = Job.fetch(holder, connection=self.connection)
            running["started_at"] = job.meta.get("started_at")
            running["reason"] = job.meta.get("reason")
            running["progress"] = job.meta.get("progress")
        except NoSuchJobError:
            pass
        return running

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            pass


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
    lock = RedisLock(connection, keys.lock, job.id, lock_ttl)
    if not lock.acquire():
        return _defer(job, keys, project, reason, runner, lock_ttl, lock_wait, retry_intervals)
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
    from rq import Queue

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
    enqueue_cycle(
        Queue(job.origin, connection=connection), project, reason, new_id, runner=runner,
        lock_ttl=lock_ttl, lock_wait=lock_wait, retry_intervals=retry_intervals,
        timeout=job.timeout, description=job.description,
    )
    return {"status": "deferred", "project": project, "requeued_as": new_id}


def enqueue_cycle(
    queue: Any,
    project: int,
    reason: str,
    job_id: str,
    *,
    runner: str,
    lock_ttl: float,
    lock_wait: float,
    retry_intervals: Sequence[float],
    timeout: int | None,
    description: str,
):
    """Put one `run_cycle_job` on the RQ `queue` (a new request, or a deferred job put
    back), with RQ's retries at `retry_intervals` (rounded up to whole seconds)."""
    from rq import Retry

    retry = None
    if retry_intervals:
        retry = Retry(max=len(retry_intervals),
                      interval=[int(math.ceil(i)) for i in retry_intervals])
    return queue.enqueue(
        JOB_FUNCTION,
        project,
        reason=reason,
        runner=runner,
        lock_ttl=lock_ttl,
        lock_wait=lock_wait,
        retry_intervals=list(retry_intervals),
        job_id=job_id,
        job_timeout=timeout,
        retry=retry,
        result_ttl=RESULT_TTL,
        failure_ttl=RESULT_TTL,
        description=description,
        meta={"project": project, "reason": reason, "enqueued_at": time.time()},
    )


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
    record = failure_record(exc, job.id, will_retry, job.retries_left or 0)
    connection.set(keys.last, json.dumps(record))
    log.error("project %s: cycle failed: %s%s", job.meta.get("project"), record["error"],
              f" (retry in {job.get_retry_interval()} s, {job.retries_left} left)"
              if will_retry else " (no retry left)")

