"""Property-based fuzzing of the three routes Label Studio calls (/predict, /setup,
/webhook) with hypothesis: bodies shaped like Label Studio's, with every field replaced by
anything JSON can hold, hostile URLs in the tasks and broken label configs. Whatever comes
in, the answer is never a 5xx, and every 4xx is JSON that says what is wrong.

The app runs with a trained model for project 1 (tiny images, so forwards are cheap), a
real local HTTP server for the images and a real Redis queue (its own queue name; no
worker, so nothing trains). Bounded: a few hundred examples in all, in seconds."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s4al_backend import jobs
from s4al_backend.app import create_app
from s4al_backend.backend import EVENTS
from s4al_backend.store import project_store
from tests.service_helpers import (
    CAMVID_CLASSES,
    FileServer,
    brush_config,
    make_model,
    make_settings,
    png_bytes,
)
from tests.test_jobs import REDIS_BASE, REDIS_DB, _require_redis

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# anything JSON can hold, nested a few levels
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    connection = _require_redis()
    queue = f"s4alfuzz-{uuid.uuid4().hex[:8]}"
    image = np.random.default_rng(0).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    with FileServer() as server:
        server.add("/data/upload/1/a.png", png_bytes(image))
        server.add("/data/upload/1/broken.png", b"\x89PNG not really")
        config = make_settings(tmp, server, redis_url=f"{REDIS_BASE}/{REDIS_DB}",
                               queue_name=queue, train_after_annotations=3)
        project_store(config.model_dir, "1").save(make_model(len(CAMVID_CLASSES)),
                                                  CAMVID_CLASSES)
        jobs.reset_jobs()
        yield create_app(config), server
        jobs.reset_jobs()
    for key in connection.scan_iter(match=f"*{queue}*", count=1000):
        connection.delete(key)


def image_urls(server_host: str):
    return st.sampled_from([
        "/data/upload/1/a.png", "/data/upload/1/broken.png", "/data/upload/1/missing.png",
        "/status/500", "/redirect?to=http://127.0.0.1:9/x.png", "s3://bucket/a.png",
        "gs://b/../../x", f"http://evil.example\\@{server_host}/data/upload/1/a.png",
        f"http://user:pw@{server_host}/data/upload/1/a.png", "file:///etc/passwd",
        "//evil.example/a.png", "data:image/png;base64,AAAA", "http://[::1", "",
    ]) | st.text(max_size=40)


def tasks(server_host: str):
    task = st.fixed_dictionaries(
        {"id": st.integers(-5, 10**12) | json_values,
         "data": st.fixed_dictionaries({"image": image_urls(server_host) | json_values})
         | json_values},
    )
    return st.lists(task | json_values, max_size=4) | json_values


label_configs = st.sampled_from([
    brush_config(), brush_config(["Sky", "Unicorn"], region=False),
    '<View><Image name="i" value="$i"/></View>', "<View><Image", "", "<!DOCTYPE x [<!ENTITY"
    ' e SYSTEM "file:///etc/passwd">]><View>&e;</View>',
]) | st.text(max_size=60)

# mostly the shapes Label Studio sends, so that the checks behind them are reached too
usual_projects = st.sampled_from(["1", "1.1700000000", "2", {"id": 1}, {"id": 3}, 1])
absurd_projects = st.sampled_from(["../x", "9" * 5000, {"id": "x" * 300}, {"id": 10**400}])
project_ids = st.one_of(usual_projects, usual_projects, usual_projects, absurd_projects,
                        json_values)


def check(reply) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.get_data(as_text=True)[:300])
    payload = reply.get_json()
    assert isinstance(payload, dict)
    if reply.status_code >= 400:
        assert isinstance(payload.get("error"), str) and payload["error"]


@given(data=st.data())
@FUZZ
def test_fuzz_predict(app, data):
    flask_app, server = app
    body = data.draw(st.fixed_dictionaries(
        {}, optional={"tasks": tasks(server.host), "project": project_ids,
                      "label_config": label_configs | json_values,
                      "params": json_values, "model_version": json_values}))
    check(flask_app.test_client().post("/predict", json=body))


@given(data=st.data())
@FUZZ
def test_fuzz_setup(app, data):
    flask_app, server = app
    body = data.draw(st.fixed_dictionaries(
        {}, optional={"project": project_ids, "schema": label_configs | json_values,
                      "hostname": st.sampled_from([server.url, "http://x\r\nInjected: 1"])
                      | json_values, "access_token": st.text(max_size=50) | json_values,
                      "model_version": json_values, "extra_params": json_values}))
    check(flask_app.test_client().post("/setup", json=body))


@given(data=st.data())
@FUZZ
def test_fuzz_webhook(app, data):
    flask_app, _ = app
    body = data.draw(st.fixed_dictionaries(
        {}, optional={"action": st.one_of(st.sampled_from(EVENTS), st.sampled_from(EVENTS),
                                          json_values),
                      "project": project_ids, "annotation": json_values,
                      "annotations": json_values, "task": json_values}))
    check(flask_app.test_client().post("/webhook", json=body))


@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@FUZZ
def test_fuzz_raw_bodies(app, raw):
    flask_app, _ = app
    client = flask_app.test_client()
    for path in ("/predict", "/setup", "/webhook"):
        check(client.post(path, data=raw, content_type="application/json"))
