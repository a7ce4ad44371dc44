"""A training worker: `python -m s4al_backend.worker` (REDIS_URL must be set).

It is an RQ `SimpleWorker` on QUEUE_NAME: jobs run in the worker process itself, never in
a fork (a forked job can deadlock inside torch's thread pool).
It also runs RQ's scheduler, which the retries with backoff need. Start any number, on any
number of machines sharing the Redis and MODEL_DIR; a project is never trained by two at
once (see s4al_backend.jobs). Equivalent with rq's own command line:

    rq worker -w rq.worker.SimpleWorker --with-scheduler --url "$REDIS_URL" "$QUEUE_NAME"

Every worker reads the same environment as the web service (LABEL_STUDIO_URL,
LABEL_STUDIO_API_KEY, MODEL_DIR, METHOD, TRAIN_*, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .settings import Settings, SettingsError, redact_url


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

    import redis
    from rq import Queue
    from rq.worker import SimpleWorker

    connection = redis.Redis.from_url(settings.redis_url)
    try:
        connection.ping()
    except redis.exceptions.RedisError as exc:
        print(f"s4al worker: Redis unavailable at {redact_url(settings.redis_url)}: {exc}",
              file=sys.stderr)
        return 1
    queue = Queue(settings.queue_name, connection=connection,
                  default_timeout=settings.job_timeout)
    worker = SimpleWorker([queue], connection=connection, name=args.name)
    logging.getLogger(__name__).info(
        "worker %s on queue %r at %s (method %s, device %s)", worker.name, settings.queue_name,
        redact_url(settings.redis_url), settings.method, settings.device,
    )
    worker.work(burst=args.burst, with_scheduler=not args.no_scheduler,
                max_jobs=args.max_jobs, logging_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
