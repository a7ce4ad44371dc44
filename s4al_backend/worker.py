"""A training worker: `python -m s4al_backend.worker` (REDIS_URL must be set).

It is an RQ `SimpleWorker` on QUEUE_NAME, and before it on the chunk queues through which
a running cycle hands out its pool scoring (`chunk_jobs`; a GPU worker also on the GPU
one): jobs run in the worker process itself, never in a fork (a forked job can deadlock
inside torch's thread pool).
It also runs RQ's scheduler, which the retries with backoff need, in a thread of its own
(RQ's `--with-scheduler` forks a child that outlives a SIGKILLed worker). When Redis goes
away, even mid-job, the worker waits for it with backoff and carries on. Start any
number, on any number of machines sharing the Redis and MODEL_DIR; a project is never
trained by two at once (see s4al_backend.redis_jobs). Close to rq's own command line (which
neither reconnects nor keeps its scheduler in the process):

    rq worker -w rq.worker.SimpleWorker --with-scheduler --url "$REDIS_URL" \
        "$QUEUE_NAME-chunks" "$QUEUE_NAME"

Every worker reads the same environment as the web service (LABEL_STUDIO_URL,
LABEL_STUDIO_API_KEY, MODEL_DIR, METHOD, TRAIN_*, ...).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import threading
import time

import redis
from rq.scheduler import RQScheduler
from rq.worker import SimpleWorker

from .chunk_jobs import worker_queues
from .settings import Settings, SettingsError, redact_url

log = logging.getLogger(__name__)


class StoppableWorker(SimpleWorker):
    """RQ's SimpleWorker that remembers whether it was asked to stop (SIGTERM / SIGINT),
    which tells a deliberate stop from a work loop that ended on a lost Redis."""

    stop_requested = False

    def request_stop(self, signum, frame):
        type(self).stop_requested = True  # every later worker of this process too
        super().request_stop(signum, frame)


class SchedulerThread(threading.Thread):
    """RQ's scheduler (it moves retries whose backoff has passed into the queue) in a
    daemon thread of the worker rather than RQ's forked child process: it dies with the
    worker, even on SIGKILL, and survives a Redis outage by retrying."""

    def __init__(self, queues, connection, interval: int = 1):  # RQ wants whole seconds
        super().__init__(name="s4al-scheduler", daemon=True)
        self.scheduler = RQScheduler(queues, connection=connection, interval=interval)
        self.interval = interval
        self._stopped = threading.Event()
        self._failing = False

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.tick()
                self._failing = False
            except redis.exceptions.RedisError as exc:
                if not self._failing:
                    log.warning("scheduler: Redis unavailable (%s); retrying", exc)
                self._failing = True
            self._stopped.wait(self.interval)

    def tick(self) -> None:
        """Take (or keep) the queue's scheduler lock; if held, queue the jobs now due."""
        scheduler = self.scheduler
        if scheduler.should_reacquire_locks:
            scheduler.acquire_locks()
            if scheduler.acquired_locks:
                scheduler.register_birth()
        if scheduler.acquired_locks:
            scheduler.heartbeat()
            scheduler.enqueue_scheduled_jobs()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)
        try:
            if self.scheduler.acquired_locks:
                self.scheduler.stop()  # releases its locks for another worker's scheduler
        except Exception as exc:  # Redis gone: the locks expire by themselves
            log.warning("scheduler: could not release its locks: %s", exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s4al_backend.worker",
        description="Run training jobs from the Redis queue (RQ SimpleWorker + scheduler).",
    )
    parser.add_argument("--burst", action="store_true",
                        help="quit when the queue is empty (tests, cron)")
    parser.add_argument("--no-scheduler", action="store_true",
                        help="do not run RQ's scheduler here (retries then wait for a worker "
                        "that does)")
    parser.add_argument("--name", help="worker name (default: RQ's)")
    parser.add_argument("--max-jobs", type=int, help="quit after this many jobs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"s4al worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per LS request
    if not settings.redis_url:
        print("s4al worker: REDIS_URL is not set; without it the web service trains in its "
              "own background thread and needs no worker", file=sys.stderr)
        return 2
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)

    connection = redis.Redis.from_url(settings.redis_url)
    try:
        connection.ping()
    except redis.exceptions.RedisError as exc:
        print(f"s4al worker: Redis unavailable at {redact_url(settings.redis_url)}: {exc}",
              file=sys.stderr)
        return 1
    return serve(settings, args, connection)


def serve(settings: Settings, args: argparse.Namespace, connection) -> int:
    """Work the queue until asked to stop (or, with --burst / --max-jobs, until done).
    When RQ's loop ends because Redis went away (even mid-job), wait for Redis with
    backoff and carry on with a fresh worker: the queued jobs are still waiting."""
    from rq import Queue

    queue = Queue(settings.queue_name, connection=connection,
                  default_timeout=settings.job_timeout)
    # chunk queues first: a free worker helps a running cycle (chunk_jobs) before it
    # starts another
    queues = [Queue(name, connection=connection, default_timeout=settings.job_timeout)
              for name in worker_queues(settings.queue_name, settings.resolve_device())]
    scheduler = None if args.no_scheduler else SchedulerThread([queue], connection)
    if scheduler is not None and args.burst:
        scheduler.tick()  # retries already due, then the burst
        scheduler = None
    elif scheduler is not None:
        scheduler.start()
    try:
        for attempt in itertools.count():
            name = args.name if attempt == 0 or not args.name else f"{args.name}-{attempt}"
            worker = StoppableWorker(queues, connection=connection, name=name)
            log.info("worker %s on queues %s at %s (method %s, device %s)", worker.name,
                     ", ".join(q.name for q in queues), redact_url(settings.redis_url),
                     settings.method, settings.device)
            try:
                worker.work(burst=args.burst, max_jobs=args.max_jobs,
                            logging_level=settings.log_level)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.error("worker %s lost Redis: %s", worker.name, exc)
            if worker.stop_requested:
                return 0
            if _redis_up(connection) and (args.burst or args.max_jobs):
                return 0  # done as asked
            log.warning("worker %s stopped (Redis lost, or an error above); waiting for "
                        "Redis, then a fresh worker takes the queue", worker.name)
            if not wait_for_redis(connection, worker):
                return 0
    finally:
        if scheduler is not None:
            scheduler.stop()
    return 0


def _redis_up(connection) -> bool:
    try:
        return bool(connection.ping())
    except redis.exceptions.RedisError:
        return False


def wait_for_redis(connection, worker: StoppableWorker) -> bool:
    """Ping with backoff (1 s doubling to 30 s) until Redis answers: True, or False when
    a stop was asked for meanwhile (SIGTERM / SIGINT)."""
    delay = 1.0
    while not worker.stop_requested:
        if _redis_up(connection):
            return True
        log.info("Redis not answering; next try in %.0f s", delay)
        time.sleep(delay)
        delay = min(30.0, delay * 2)
    return False


if __name__ == "__main__":
    sys.exit(main())
