"""The in-process queue (used without REDIS_URL): the embedded default for one machine.

One daemon thread in the web process runs the cycles in request order, with the same job
body as the Redis queue (`jobs_base.execute`). Failed cycles are retried after
RETRY_INTERVALS, as RQ's scheduled retries are. A file lock per project in MODEL_DIR
(locks.FileLock) keeps two processes of that machine (gunicorn workers) from training one
project at once.
"""

from __future__ import annotations

import logging
import queue as queue_module
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .jobs_base import (
    DEFAULT_RUNNER,
    RETRY_INTERVALS,
    RETRY_NOW,
    START_EVENT,
    Jobs,
    ProgressReporter,
    Runner,
    coalesced_reply,
    execute,
    failure_record,
    new_job_id,
    queued_reply,
    status_dict,
)
from .locks import FileLock

log = logging.getLogger(__name__)


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
        self._retry_timers: dict[int, threading.Timer] = {}  # per project, until it fires
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
            queued = state["queued"]
            if queued is not None:
                timer = self._retry_timers.pop(project, None)
                if reason == START_EVENT and timer is not None:
                    timer.cancel()  # the fault is fixed: the retry runs now
                    queued.pop("retry_at", None)
                    self._queue.put(project)
                    return coalesced_reply(project, queued["job_id"], RETRY_NOW)
                if timer is not None:
                    self._retry_timers[project] = timer
                return coalesced_reply(project, queued["job_id"], "a cycle is already queued")
            job_id = new_job_id("local", project)
            state["queued"] = {"job_id": job_id, "since": time.time(), "reason": reason,
                               "attempt": 0}
            self._queue.put(project)
        log.info("project %s: cycle queued in-process as %s (%s)", project, job_id, reason)
        return queued_reply(project, job_id, reason)

    def status(self, project: int) -> dict:
        with self._lock:
            state = self._project(project)
            running = None
            if state["running"]:
                running = {k: v for k, v in state["running"].items() if k != "reporter"}
                running["progress"] = dict(state["running"]["reporter"].latest)
            return status_dict(
                self.settings, "in-process", pending=state["pending"],
                queued=dict(state["queued"]) if state["queued"] else None,
                running=running, last=state["last"], queue_length=self._queue.qsize(),
            )

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
        lock = FileLock(self._lock_path(project))
        while not lock.acquire():  # another process of this machine trains it: wait
            time.sleep(self.lock_poll)
        try:
            self._run_locked(project, state, queued)
        finally:
            lock.release()

    def _run_locked(self, project: int, state: dict, queued: dict) -> None:
        """One cycle under the project's lock; its outcome becomes `last`, a failure with
        retries left queues the retry (unless a newer request already covers it)."""
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
            record = self._failure(project, queued["job_id"], attempt, exc)
        with self._lock:
            state["running"] = None
            state["last"] = record
            if attempt is not None and record["will_retry"]:
                if state["queued"] is None:
                    self._retry_later(project, queued["reason"], attempt + 1,
                                      self.retry_intervals[attempt])
                else:  # a newer request is queued: it covers the retry
                    record["will_retry"] = False

    def _failure(self, project: int, job_id: str, attempt: int, exc: Exception) -> dict:
        """The failure record of attempt `attempt` (0 = the first run), logged."""
        will_retry = attempt < len(self.retry_intervals)
        record = failure_record(
            exc, job_id, will_retry,
            max(0, len(self.retry_intervals) - attempt - 1) if will_retry else 0,
        )
        log.error("project %s: cycle failed: %s%s", project, record["error"],
                  f" (retry in {self.retry_intervals[attempt]} s)" if will_retry
                  else " (no retry left)")
        log.debug("%s", traceback.format_exc())
        return record

    def _retry_later(self, project: int, reason: str, attempt: int, delay: float) -> None:
        """Queue the retry now (requests coalesce into it, as with RQ's scheduled
        retries); the worker thread gets it after `delay` seconds."""
        state = self._project(project)
        state["queued"] = {"job_id": new_job_id("local", project), "since": time.time(),
                           "reason": reason, "attempt": attempt,
                           "retry_at": time.time() + delay}

        def fire():
            with self._lock:  # unless *Start Training* already ran it
                if self._closed or self._retry_timers.get(project) is not timer:
                    return
                del self._retry_timers[project]
            self._queue.put(project)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)
        self._retry_timers[project] = timer

    def _lock_path(self, project: int) -> Path:
        return Path(self.settings.model_dir) / "locks" / f"project-{project}.lock"

    def close(self) -> None:
        self._closed = True
        for timer in self._timers:
            timer.cancel()
        self._queue.put(None)

