"""Training jobs: webhooks in, at most one queued and one running cycle per project out.

Two interchangeable queues run the same job code (`jobs_base.execute`) under the same
webhook and coalescing rules (`jobs_base.Jobs`):

- `RedisJobs` (redis_jobs.py, REDIS_URL set): RQ on Redis, queue QUEUE_NAME; workers are
  separate processes (`python -m s4al_backend.worker`) on any number of machines.
- `LocalJobs` (local_jobs.py, no REDIS_URL): one background thread in the web process;
  the embedded default for one machine.

Both keep one project to one cycle at a time with a `locks.ProjectLock` (a Redis key with
a TTL, or a file lock in MODEL_DIR).

This module picks the process's queue (`get_jobs`, `project_status`) and is the one import
path of the names the web layer and the tests use. `run_cycle_job` keeps its dotted path,
`s4al_backend.jobs.run_cycle_job`: queued RQ jobs name it.
"""

from __future__ import annotations

import threading
from typing import Any

from .jobs_base import Jobs, ProgressReporter, QueueUnavailable, project_of, status_dict
from .local_jobs import LocalJobs
from .redis_jobs import RedisJobs, run_cycle_job

__all__ = [
    "Jobs", "LocalJobs", "ProgressReporter", "QueueUnavailable", "RedisJobs", "get_jobs",
    "project_of", "project_status", "reset_jobs", "run_cycle_job",
]

_instances: dict[tuple, Jobs] = {}
_instances_lock = threading.Lock()


def _key(settings: Any) -> tuple:
    return (settings.redis_url or "", settings.queue_name, str(settings.model_dir))


def get_jobs(settings: Any) -> Jobs:
    """The process's queue for these settings: Redis when REDIS_URL is set, else the
    in-process one (created once per process)."""
    key = _key(settings)
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
        with _instances_lock:
            existing = _instances.get(_key(settings))
        if existing is None:
            return status_dict(settings, "in-process")
        return existing.status(project)
    return get_jobs(settings).status(project)


def reset_jobs() -> None:
    """Forget the process's queues (tests)."""
    with _instances_lock:
        for jobs in _instances.values():
            jobs.close()
        _instances.clear()
