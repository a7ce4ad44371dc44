"""The service under load, as real server processes: /health stays fast while /predict
requests pile up (gunicorn, the README's command), a burst of 200 webhooks on the
embedded server is counted in full, a frozen Redis is a quick 503."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from s4al_backend import jobs
from s4al_backend.app import create_app
from s4al_backend.store import project_store
from tests.service_helpers import CAMVID_CLASSES, FileServer, brush_config, make_model
from tests.test_app import ROOT, free_port, service_env, wait_health
from tests.test_jobs import webhook
from tests.test_worker import OwnRedis


class Server:
    """A server process on a free port, stopped with SIGTERM."""

    def __init__(self, args: list[str], env: dict):
        self.port = free_port()
        args = [a.replace("{port}", str(self.port)) for a in args]
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_health(self.port, self.process)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def fire(count: int, send) -> list:
    """``send(i)`` from ``count`` threads at once; their results."""
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = send(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_health_stays_fast_while_predicts_pile_up(tmp_path):
    model_dir = tmp_path / "model_dir"
    project_store(model_dir, "1").save(make_model(len(CAMVID_CLASSES)), CAMVID_CLASSES)
    with FileServer() as files:
        env = service_env(tmp_path, LABEL_STUDIO_URL=files.url, IMAGE_TIMEOUT="6")
        server = Server([sys.executable, "-m", "gunicorn", "--workers", "1", "--threads", "8",
                         "--timeout", "120", "--bind", "127.0.0.1:{port}", "_wsgi:app"], env)
        try:
            body = {"project": "1", "label_config": brush_config(),
                    "tasks": [{"id": 1, "data": {"image": "/slow/60?every=0.1"}}]}
            predicts: list = []
            sender = threading.Thread(target=lambda: predicts.extend(fire(
                10, lambda i: requests.post(server.url("/predict"), json=body, timeout=60))))
            sender.start()
            time.sleep(1.0)  # every /predict is in (slow image downloads hold them)
            latencies = []
            for _ in range(5):
                t0 = time.monotonic()
                assert requests.get(server.url("/health"), timeout=30).status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.2)
            sender.join(timeout=90)
        finally:
            server.stop()
    assert max(latencies) < 1.0, f"/health took {max(latencies):.2f} s (Label Studio waits 1 s)"
    codes = sorted(r.status_code for r in predicts)
    assert codes.count(200) >= 4 and set(codes) <= {200, 503}, codes
    busy = next(r.json() for r in predicts if r.status_code == 503)
    assert "PREDICT_CONCURRENCY" in busy["error"]


def test_a_burst_of_webhooks_on_the_embedded_server_is_counted_in_full(tmp_path):
    """200 webhooks at once while Redis stalls for 0.5 s (a fork for a snapshot, a slow
    disk): more requests hold a Redis connection than the pool has. The web side's 0.75 s
    socket timeout is longer than the stall."""
    redis_server = OwnRedis(tmp_path)
    redis_server.start()
    env = service_env(tmp_path, REDIS_URL=redis_server.url, QUEUE_NAME="burst",
                      TRAIN_AFTER_ANNOTATIONS="100000")
    server = Server([sys.executable, "_wsgi.py", "--host", "127.0.0.1", "--port", "{port}"],
                    env)
    try:
        requests.post(server.url("/webhook"), json=webhook("ANNOTATION_CREATED", project=4),
                      timeout=30)
        stall = threading.Thread(target=redis_server.stall, args=(0.5,))
        stall.start()  # Redis answers nobody for 0.5 s, measured by Redis itself
        replies = fire(200, lambda i: requests.post(
            server.url("/webhook"), json=webhook("ANNOTATION_CREATED", project=4), timeout=30))
        stall.join()
        status = requests.get(server.url("/status?project=4"), timeout=10).json()
    finally:
        server.stop()
        redis_server.kill()
    refused = {r.json()["error"] for r in replies if r.status_code != 200}
    assert not refused, refused
    assert status["training"]["pending_annotations"] == 201


def test_a_frozen_redis_is_a_quick_503(tmp_path):
    redis_server = OwnRedis(tmp_path)
    redis_server.start()
    jobs.reset_jobs()
    try:
        from tests.service_helpers import make_settings

        settings = make_settings(tmp_path, redis_url=redis_server.url, queue_name="frozen")
        client = create_app(settings).test_client()
        assert client.post("/webhook", json=webhook("ANNOTATION_CREATED")).status_code == 200
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            reply = client.post("/webhook", json=webhook("ANNOTATION_CREATED"))
            elapsed = time.monotonic() - t0
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
    finally:
        jobs.reset_jobs()
        redis_server.kill()
    assert reply.status_code == 503 and "Redis unavailable" in reply.get_json()["error"]
    assert elapsed < 1.5, f"a frozen Redis took {elapsed:.2f} s to a 503 (2 s before the fix)"


@pytest.fixture(autouse=True)
def _fresh_jobs():
    jobs.reset_jobs()
    yield
    jobs.reset_jobs()
