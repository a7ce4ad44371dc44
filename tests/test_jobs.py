"""Webhooks -> jobs, against the real Redis on 127.0.0.1:6379 and real RQ worker processes.

Each test uses its own queue name, which is also the prefix of every key it makes (our
`s4al:<queue>:...` keys, RQ's queue, registries, job ids and worker names), and deletes
those keys at the end. Redis database 5 keeps them apart from anything else.

The cycles here are stand-ins (`recording_runner`, `failing_runner`, importable by the
worker processes); the real cycle runs in tests/test_cycle.py, including under a worker
that is SIGKILLed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from s4al_backend import jobs
from s4al_backend.settings import Settings
from s4al_backend.studio import StudioError

ROOT = Path(__file__).resolve().parents[1]
REDIS_BASE = os.environ.get("S4AL_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = 5
RUNNER = "tests.test_jobs:recording_runner"
FAILING = "tests.test_jobs:failing_runner"


# --------------------------------------------------------------------------- stand-in cycles
def _runs_key(settings) -> str:
    return f"s4al:{settings.queue_name}:test:runs"


def recording_runner(settings, project, reason="", progress=None):
    """Records its start and end in Redis, reports progress, sleeps S4AL_TEST_SLEEP s."""
    import redis

    connection = redis.Redis.from_url(settings.redis_url)
    start = time.time()
    progress({"phase": "train", "iteration": 1, "total": 2, "loss": 1.0, "eta_s": 1.0})
    time.sleep(float(os.environ.get("S4AL_TEST_SLEEP", "0.5")))
    progress({"phase": "train", "iteration": 2, "total": 2, "loss": 0.5, "eta_s": 0.0})
    connection.rpush(_runs_key(settings), json.dumps(
        {"project": project, "start": start, "end": time.time(), "pid": os.getpid(),
         "reason": reason}))
    return {"version": f"fake-{int(start * 1000)}"}


def failing_runner(settings, project, reason="", progress=None):
    """Fails like an unreachable Label Studio S4AL_TEST_FAILURES times, then succeeds."""
    import redis

    connection = redis.Redis.from_url(settings.redis_url)
    attempt = connection.incr(f"s4al:{settings.queue_name}:test:attempts")
    connection.rpush(_runs_key(settings), json.dumps({"attempt": attempt, "t": time.time()}))
    if attempt <= int(os.environ.get("S4AL_TEST_FAILURES", "1")):
        raise StudioError("Label Studio refused GET api/tasks/?project=1 (503): "
                          "{'detail': 'injected 503'}", 503)
    return {"version": "recovered"}


# --------------------------------------------------------------------------- fixtures
def _require_redis():
    """A connection to the test Redis. Without one the test is skipped on a developer's
    machine, but fails under CI (CI set, as .ci/run does): CI promises Redis, and a suite
    that skipped its queue tests would pass without testing them."""
    import redis

    connection = redis.Redis.from_url(f"{REDIS_BASE}/{REDIS_DB}", socket_connect_timeout=1)
    try:
        connection.ping()
    except redis.exceptions.RedisError as exc:
        message = f"no Redis at {REDIS_BASE}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return connection


@pytest.fixture
def redis_env(tmp_path):
    """Environment for one test: a fresh queue name (= key prefix), Redis db 5, a tmp
    MODEL_DIR; the test's keys are deleted afterwards."""
    connection = _require_redis()
    queue = f"s4altest-{uuid.uuid4().hex[:10]}"
    env = {
        "REDIS_URL": f"{REDIS_BASE}/{REDIS_DB}",
        "QUEUE_NAME": queue,
        "MODEL_DIR": str(tmp_path / "models"),
        "TRAIN_AFTER_ANNOTATIONS": "1",
        "JOB_TIMEOUT": "120",
        "LOG_LEVEL": "INFO",
    }
    yield env
    jobs.reset_jobs()
    for key in connection.scan_iter(match=f"*{queue}*", count=1000):
        connection.delete(key)
    for key in ("rq:workers", "rq:queues"):
        for member in connection.smembers(key) if connection.type(key) == b"set" else []:
            if queue.encode() in member:
                connection.srem(key, member)
    connection.close()


def settings_from(env: dict) -> Settings:
    return Settings.from_env(env)


class Worker:
    """`python -m s4al_backend.worker` in a subprocess with the test's environment."""

    def __init__(self, env: dict, name: str, log_path: Path, burst: bool = False,
                 extra_env: dict | None = None):
        full_env = {**os.environ, **env, **(extra_env or {}), "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, "-m", "s4al_backend.worker", "--name", name]
        if burst:
            args.append("--burst")
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        # its own process group: RQ's scheduler is a forked child that a SIGKILL of the
        # worker alone would leave running
        self.process = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, sig=None) -> None:
        """SIGTERM (a warm shutdown) by default; `sig=SIGKILL` kills the worker and its
        scheduler at once, as a machine or container dying would."""
        if self.process.poll() is None:
            if sig is None:
                self.process.terminate()
            else:
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        try:  # anything left in the group (the scheduler child)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def runs(connection, settings) -> list[dict]:
    return [json.loads(r) for r in connection.lrange(_runs_key(settings), 0, -1)]


def webhook(action: str, project: int = 1) -> dict:
    body = {"action": action, "project": {"id": project, "title": "p"}}
    if action.startswith("ANNOTATION_"):
        body["annotation"] = {"id": 1, "result": []}
        body["task"] = {"id": 1, "project": project}
    return body


# --------------------------------------------------------------------------- unit
def test_project_of_reads_every_shape():
    assert jobs.project_of({"project": {"id": 7}}) == 7
    assert jobs.project_of({"project": 8}) == 8
    assert jobs.project_of({"project": "9.1700000000"}) == 9
    assert jobs.project_of({"task": {"project": 3}}) == 3
    assert jobs.project_of({"project": None}) is None
    assert jobs.project_of("nope") is None


def test_events_count_then_queue_then_coalesce(tmp_path):
    settings = settings_from({"MODEL_DIR": str(tmp_path), "TRAIN_AFTER_ANNOTATIONS": "3"})
    started = threading.Event()
    release = threading.Event()

    def runner(settings, project, reason="", progress=None):
        started.set()
        release.wait(10)
        return {"version": "v"}

    local = jobs.LocalJobs(settings, runner=runner)
    try:
        assert local.on_event("PROJECT_UPDATED", webhook("PROJECT_UPDATED"))["status"] == \
            "ignored"
        assert local.on_event("SOMETHING_ELSE", webhook("X"))["status"] == "ignored"
        first = local.on_event("ANNOTATION_CREATED", webhook("ANNOTATION_CREATED"))
        assert first["status"] == "counted" and first["pending"] == 1
        local.on_event("ANNOTATION_UPDATED", webhook("ANNOTATION_UPDATED"))
        third = local.on_event("ANNOTATIONS_DELETED", webhook("ANNOTATIONS_DELETED"))
        assert third["status"] == "queued"
        started.wait(5)
        # running now: the next requests queue one more cycle, then coalesce into it
        assert local.on_event("START_TRAINING", webhook("START_TRAINING"))["status"] == "queued"
        assert local.on_event("START_TRAINING", webhook("START_TRAINING"))["status"] == \
            "coalesced"
        status = local.status(1)
        assert status["running"]["job_id"]
        assert status["queued"] is not None
        release.set()
        assert local.wait_idle(10)
        assert local.status(1)["last"]["version"] == "v"
    finally:
        release.set()
        local.close()


# --------------------------------------------------------------------------- Redis
def test_webhook_storm_one_queued_at_most_one_running(redis_env, tmp_path):
    """200 concurrent webhooks through the real /webhook route: exactly one queued job;
    with a worker busy on the project, one running + one queued, none lost."""
    from rq import Queue
    from rq.registry import StartedJobRegistry

    from s4al_backend.app import create_app

    settings = settings_from(redis_env)
    connection = _require_redis()
    app = create_app(settings)
    jobs.reset_jobs()
    redis_jobs = jobs.get_jobs(settings)
    assert isinstance(redis_jobs, jobs.RedisJobs)
    redis_jobs.runner = RUNNER
    queue = Queue(settings.queue_name, connection=connection)
    started_registry = StartedJobRegistry(settings.queue_name, connection=connection)

    def storm(n: int, threads: int = 8) -> list[int]:
        codes: list[int] = []
        lock = threading.Lock()

        def fire(count: int) -> None:
            client = app.test_client()
            for i in range(count):
                action = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "START_TRAINING")[i % 3]
                response = client.post("/webhook", json=webhook(action))
                with lock:
                    codes.append(response.status_code)

        workers = [threading.Thread(target=fire, args=(n // threads,)) for _ in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        return codes

    # no worker yet: 200 webhooks -> exactly one queued job
    t0 = time.monotonic()
    codes = storm(200)
    storm_s = time.monotonic() - t0
    assert codes == [200] * 200
    assert queue.count == 1, queue.job_ids
    status = redis_jobs.status(1)
    assert status["queued"]["job_id"] == queue.job_ids[0]
    assert status["running"] is None

    # a worker takes it; while it runs, another storm queues exactly one more
    violations = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            queued, running = queue.count, started_registry.count
            if queued > 1 or running > 1:
                violations.append((queued, running))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    worker = Worker(redis_env, f"{settings.queue_name}-w1", tmp_path / "w1.log",
                    extra_env={"S4AL_TEST_SLEEP": "4"})
    try:
        wait_for(lambda: ((redis_jobs.status(1)["running"] or {}).get("progress") or {})
                 .get("phase") == "train", 60, "the first job to report progress")
        assert queue.count == 0
        assert storm(200) == [200] * 200
        last_webhook = time.time()
        assert queue.count == 1
        status = redis_jobs.status(1)
        assert status["running"] and status["queued"]
        progress = status["running"]["progress"]
        assert progress["phase"] == "train" and progress["total"] == 2
        wait_for(lambda: len(runs(connection, settings)) == 2, 60, "both cycles")
    finally:
        stop.set()
        sampler.join()
        worker.stop()
    assert not violations, violations[:5]
    done = runs(connection, settings)
    assert len(done) == 2, done
    # the last webhook's annotation is covered: a cycle started after it
    assert max(r["start"] for r in done) >= last_webhook - 0.01
    assert done[0]["end"] <= done[1]["start"]
    last = redis_jobs.status(1)["last"]
    assert last["status"] == "done" and last["version"].startswith("fake-")
    assert last["timings"]  # per-phase seconds from the progress reports
    print(f"storm of 200 webhooks: {storm_s:.2f} s ({storm_s / 200 * 1000:.1f} ms each)")


def test_two_workers_never_train_one_project_at_once(redis_env, tmp_path):
    settings = settings_from(redis_env)
    connection = _require_redis()
    redis_jobs = jobs.RedisJobs(settings, runner=RUNNER, lock_wait=0.3, retry_intervals=())
    extra = {"S4AL_TEST_SLEEP": "2"}
    w1 = Worker(redis_env, f"{settings.queue_name}-a", tmp_path / "a.log", extra_env=extra)
    w2 = Worker(redis_env, f"{settings.queue_name}-b", tmp_path / "b.log", extra_env=extra)
    try:
        assert redis_jobs.request_cycle(1, "first")["status"] == "queued"
        # the job takes the lock, then clears its queued marker: a request in between
        # coalesces into it (harmless: it has not read Label Studio yet), so wait for both
        wait_for(lambda: (s := redis_jobs.status(1))["running"] and s["queued"] is None, 60,
                 "the first job to start")
        assert redis_jobs.request_cycle(1, "second")["status"] == "queued"
        assert redis_jobs.request_cycle(1, "third")["status"] == "coalesced"
        # another project trains in parallel on the other worker
        assert redis_jobs.request_cycle(2, "other project")["status"] == "queued"
        wait_for(lambda: len(runs(connection, settings)) == 3, 60, "three cycles")
    finally:
        w1.stop()
        w2.stop()
    done = runs(connection, settings)
    first, second = sorted((r for r in done if r["project"] == 1), key=lambda r: r["start"])
    assert first["end"] <= second["start"], done  # never at once
    other = next(r for r in done if r["project"] == 2)
    assert other["start"] < first["end"] or other["start"] < second["end"]  # in parallel
    assert "goes back to the queue" in w1.output() + w2.output()


def test_failed_job_records_the_error_and_is_retried_with_backoff(redis_env, tmp_path):
    settings = settings_from(redis_env)
    connection = _require_redis()
    redis_jobs = jobs.RedisJobs(settings, runner=FAILING, retry_intervals=(2, 2))
    worker = Worker(redis_env, f"{settings.queue_name}-r", tmp_path / "r.log",
                    extra_env={"S4AL_TEST_FAILURES": "1"})
    try:
        redis_jobs.request_cycle(1, "START_TRAINING")
        failed = wait_for(lambda: (redis_jobs.status(1)["last"] or {}).get("status") == "failed"
                          and redis_jobs.status(1)["last"], 60, "the failure")
        assert "(503)" in failed["error"] and "injected 503" in failed["error"]
        assert failed["will_retry"] is True
        # the scheduled retry still counts as the project's queued cycle
        assert redis_jobs.request_cycle(1, "webhook")["status"] == "coalesced"
        wait_for(lambda: (redis_jobs.status(1)["last"] or {}).get("status") == "done", 60,
                 "the retry to succeed")
    finally:
        worker.stop()
    attempts = runs(connection, settings)
    assert len(attempts) == 2
    # backoff, not an immediate rerun (RQ schedules to the whole second: 2 s -> 1-2 s)
    assert attempts[1]["t"] - attempts[0]["t"] >= 1.0
    assert "cycle failed" in worker.output()


def test_redis_down_webhook_is_503_and_logged(tmp_path, caplog):
    from s4al_backend.app import create_app

    settings = settings_from({"REDIS_URL": "redis://127.0.0.1:1/0",
                              "MODEL_DIR": str(tmp_path), "TRAIN_AFTER_ANNOTATIONS": "1"})
    jobs.reset_jobs()
    client = create_app(settings).test_client()
    try:
        with caplog.at_level(logging.ERROR, logger="s4al_backend.redis_jobs"):
            started = time.monotonic()
            response = client.post("/webhook", json=webhook("ANNOTATION_CREATED"))
            elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert "Redis unavailable at redis://127.0.0.1:1/0" in response.get_json()["error"]
        assert any("Redis unavailable" in r.getMessage() for r in caplog.records)
        assert elapsed < 1.0  # Label Studio waits about 1 s for a webhook reply
        # events that queue nothing still answer 200
        assert client.post("/webhook", json=webhook("PROJECT_UPDATED")).status_code == 200
    finally:
        jobs.reset_jobs()


# --------------------------------------------------------------------------- Start Training
def test_start_training_runs_a_waiting_retry_now(redis_env, tmp_path):
    settings = settings_from(redis_env)
    connection = _require_redis()
    redis_jobs = jobs.RedisJobs(settings, runner=FAILING, retry_intervals=(120,))
    worker = Worker(redis_env, f"{settings.queue_name}-s", tmp_path / "s.log",
                    extra_env={"S4AL_TEST_FAILURES": "1"})
    try:
        redis_jobs.request_cycle(1, "START_TRAINING")
        wait_for(lambda: (redis_jobs.status(1)["last"] or {}).get("status") == "failed", 60,
                 "the failure")
        # the fault is fixed; the retry would wait 120 s: Start Training runs it now
        reply = redis_jobs.request_cycle(1, "START_TRAINING")
        assert reply["status"] == "coalesced" and "runs now" in reply["message"]
        wait_for(lambda: (redis_jobs.status(1)["last"] or {}).get("status") == "done", 20,
                 "the retry to run at once")
    finally:
        worker.stop()
    assert len(runs(connection, settings)) == 2


def test_start_training_runs_a_waiting_local_retry_now(tmp_path):
    calls = []

    def flaky(settings, project, reason="", progress=None):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise StudioError("Label Studio unreachable", None)
        return {"version": "fixed"}

    settings = Settings(model_dir=tmp_path / "models")
    local = jobs.LocalJobs(settings, runner=flaky, retry_intervals=(120,), lock_poll=0.05)
    try:
        local.request_cycle(1, "START_TRAINING")
        wait_for(lambda: (local.status(1)["last"] or {}).get("status") == "failed", 20,
                 "the failure")
        assert "runs now" in local.request_cycle(1, "START_TRAINING")["message"]
        wait_for(lambda: (local.status(1)["last"] or {}).get("status") == "done", 10,
                 "the retry to run at once")
        assert local.request_cycle(1, "webhook")["status"] == "queued"  # nothing left over
        local.wait_idle(20)
    finally:
        local.close()
    assert len(calls) == 3  # the failure, the retry brought forward, the new request
