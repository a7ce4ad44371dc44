"""locks.ProjectLock's two implementations against the real parts: flock on a real file,
across a real second process that is SIGKILLed; RedisLock on the real Redis (db 5, a key
unique to the test, deleted afterwards), its heartbeat outliving the TTL and a SIGKILLed
holder's lock expiring; and two in-process queues sharing one MODEL_DIR (two gunicorn
workers) never training one project at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from s4al_backend import jobs
from s4al_backend.locks import FileLock, RedisLock
from s4al_backend.settings import Settings
from tests.test_jobs import REDIS_BASE, REDIS_DB, _require_redis, wait_for

ROOT = Path(__file__).resolve().parents[1]


def _holder(code: str) -> subprocess.Popen:
    """A second process that takes a lock with `code`, prints `held` and sleeps."""
    script = textwrap.dedent(code) + "\nprint('held', flush=True)\nimport time\ntime.sleep(60)\n"
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "held"
    return process


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(10)


# --------------------------------------------------------------------------- FileLock
def test_file_lock_excludes_a_second_holder_until_released(tmp_path):
    path = tmp_path / "locks" / "project-1.lock"
    first, second = FileLock(path), FileLock(path)
    assert first.acquire()
    assert path.exists()  # its folder was made
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    second.release()  # releasing a lock not held does nothing


def test_file_lock_held_by_a_killed_process_is_freed_by_the_os(tmp_path):
    path = tmp_path / "project-1.lock"
    process = _holder(f"""
        from pathlib import Path
        from s4al_backend.locks import FileLock
        assert FileLock(Path({str(path)!r})).acquire()
    """)
    try:
        lock = FileLock(path)
        assert not lock.acquire()  # the other process holds it
        _kill(process)
        assert lock.acquire()  # the OS dropped the dead process's lock
        lock.release()
    finally:
        _kill(process)


# --------------------------------------------------------------------------- RedisLock
@pytest.fixture
def redis_key():
    connection = _require_redis()
    key = f"s4al:s4altest-{uuid.uuid4().hex[:10]}:p1:lock"
    yield connection, key
    connection.delete(key)
    connection.close()


def test_redis_lock_heartbeat_outlives_its_ttl_and_release_frees_it(redis_key):
    connection, key = redis_key
    first = RedisLock(connection, key, "job-a", ttl=0.6)
    second = RedisLock(connection, key, "job-b", ttl=0.6)
    assert first.acquire()
    try:
        assert not second.acquire()
        time.sleep(1.5)  # over twice the TTL: only the heartbeat keeps it
        assert connection.get(key) == b"job-a"
        assert not second.acquire()
    finally:
        first.release()
    assert connection.get(key) is None
    second.release()  # never acquired: must not touch the key
    assert second.acquire()
    RedisLock(connection, key, "job-c", ttl=0.6).release()  # not the holder: leaves it
    assert connection.get(key) == b"job-b"
    second.release()


def test_redis_lock_of_a_killed_holder_expires_after_its_ttl(redis_key):
    connection, key = redis_key
    process = _holder(f"""
        import redis
        from s4al_backend.locks import RedisLock
        connection = redis.Redis.from_url({f"{REDIS_BASE}/{REDIS_DB}"!r})
        assert RedisLock(connection, {key!r}, "dead-job", ttl=1.0).acquire()
    """)
    try:
        lock = RedisLock(connection, key, "next-job", ttl=1.0)
        assert not lock.acquire()
        _kill(process)  # the heartbeat dies with it
        wait_for(lock.acquire, 5, "the dead holder's lock to expire", interval=0.1)
        lock.release()
    finally:
        _kill(process)


# --------------------------------------------------------------------------- LocalJobs
def test_two_in_process_queues_on_one_model_dir_never_overlap(tmp_path):
    """Two web processes (gunicorn workers) of one machine each run a LocalJobs; the file
    lock in MODEL_DIR makes their cycles of one project take turns."""
    spans: list[tuple[float, float]] = []
    spans_lock = threading.Lock()

    def runner(settings, project, reason="", progress=None):
        start = time.monotonic()
        time.sleep(0.4)
        with spans_lock:
            spans.append((start, time.monotonic()))
        return {"version": reason}

    settings = Settings(model_dir=tmp_path / "models")
    first = jobs.LocalJobs(settings, runner=runner, lock_poll=0.05)
    second = jobs.LocalJobs(settings, runner=runner, lock_poll=0.05)
    try:
        assert first.request_cycle(1, "first")["status"] == "queued"
        assert second.request_cycle(1, "second")["status"] == "queued"
        assert first.wait_idle(20) and second.wait_idle(20)
    finally:
        first.close()
        second.close()
    assert len(spans) == 2
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert b_start >= a_end, f"the cycles overlapped: {spans}"
    assert {first.status(1)["last"]["version"], second.status(1)["last"]["version"]} == \
        {"first", "second"}
