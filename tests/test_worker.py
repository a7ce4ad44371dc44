"""The worker process (`python -m s4al_backend.worker`) against a Redis of its own that the
test kills and restarts: the worker reconnects and takes the next job; a SIGKILLed worker
leaves no scheduler process behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest

from s4al_backend import jobs
from s4al_backend.settings import Settings
from tests.test_jobs import RUNNER, Worker, runs, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OwnRedis:
    """A redis-server on a free port with no persistence, started and killed at will
    (the shared Redis on 6379 is never touched)."""

    def __init__(self, directory):
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory),
             "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client), 10, "redis-server to answer")

    def stall(self, seconds: float) -> None:
        """Redis itself busy for ``seconds`` (DEBUG SLEEP): every client waits."""
        import redis

        redis.Redis.from_url(self.url).execute_command("DEBUG", "SLEEP", seconds)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (the tests need a real Redis)")
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def env_for(server: OwnRedis, tmp_path) -> dict:
    return {"REDIS_URL": server.url, "QUEUE_NAME": f"s4alw-{uuid.uuid4().hex[:8]}",
            "MODEL_DIR": str(tmp_path / "models"), "TRAIN_AFTER_ANNOTATIONS": "1",
            "JOB_TIMEOUT": "120", "LOG_LEVEL": "INFO"}


def test_worker_reconnects_after_redis_dies_mid_job(own_redis, tmp_path):
    import redis

    env = env_for(own_redis, tmp_path)
    settings = Settings.from_env(env)
    worker = Worker(env, "w-reconnect", tmp_path / "w.log", extra_env={"S4AL_TEST_SLEEP": "2"})
    try:
        first = jobs.RedisJobs(settings, runner=RUNNER, retry_intervals=())
        first.request_cycle(1, "before the outage")
        wait_for(lambda: first.status(1)["running"], 60, "the first job to start")
        own_redis.kill()  # mid-job: its end, RQ's bookkeeping and the heartbeat all fail
        time.sleep(5)
        own_redis.start()  # an empty Redis (no persistence): a new job is queued on it
        assert worker.process.poll() is None, worker.output()
        second = jobs.RedisJobs(settings, runner=RUNNER, retry_intervals=())
        second.request_cycle(1, "after the outage")
        connection = redis.Redis.from_url(own_redis.url)
        wait_for(lambda: "after the outage" in [r["reason"] for r in runs(connection, settings)],
                 90, "the job queued after the outage to run")
        assert worker.process.poll() is None
    finally:
        worker.stop()
    # the outage was seen: mid-job (this worker's reconnect) or, when the job beat the
    # kill on a loaded machine, between jobs (RQ's own dequeue retry)
    output = worker.output()
    assert "waiting for Redis" in output or "could not connect to Redis" in output, output


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_sigkilled_worker_leaves_no_scheduler_behind(own_redis, tmp_path):
    env = env_for(own_redis, tmp_path)
    worker = Worker(env, "w-kill", tmp_path / "k.log")
    try:
        wait_for(lambda: "Listening on" in worker.output(), 60, "the worker to listen")
        time.sleep(1.5)  # the scheduler has started by now (RQ's is a forked child)
        os.kill(worker.process.pid, signal.SIGKILL)  # the worker alone, not its group
        worker.process.wait(10)
        time.sleep(0.5)
        assert not _group_alive(worker.process.pid), "a process of the worker outlived it"
    finally:
        worker.stop()
