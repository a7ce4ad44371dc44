"""The service through HTTP (Flask's test client) with a real local HTTP server standing in
for Label Studio's file serving: every route's payloads, basic auth, caller faults as
clear 4xx, per-task errors that never fail a batch, model reload on a version change,
class maps by name, secrets kept out of logs and replies, the entry points."""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from label_studio_sdk.label_interface import LabelInterface

from model.inference import predict_probabilities
from s4al_backend import rle
from s4al_backend.app import create_app
from s4al_backend.backend import MISMATCH_NOTE, UNTRAINED_VERSION, S4ALBackend
from s4al_backend.store import project_store, shared_store
from tests.service_helpers import (
    CAMVID_CLASSES,
    LEGACY_KEY,
    FileServer,
    brush_config,
    make_model,
    make_settings,
    png_bytes,
    read_rgb,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = brush_config()
PROJECT = "1.1700000000"


@pytest.fixture(scope="module")
def camvid_images(camvid_root):
    paths = sorted((camvid_root / "train").glob("*.png"))[:3]
    return {p.name: read_rgb(p) for p in paths}


@pytest.fixture
def server(camvid_images):
    with FileServer() as srv:
        for name, image in camvid_images.items():
            srv.add(f"/data/upload/1/{name}", png_bytes(image))
        yield srv


@pytest.fixture
def settings(tmp_path, server):
    return make_settings(tmp_path, server)


@pytest.fixture
def client(settings):
    return create_app(settings).test_client()


def tasks_for(server, names=None, start=1):
    names = names or [p.rsplit("/", 1)[1] for p in server.files]
    return [{"id": start + i, "data": {"image": f"/data/upload/1/{n}"}}
            for i, n in enumerate(names)]


def predict(client, tasks, config=CONFIG, project=PROJECT, **kwargs):
    body = {"tasks": tasks, "project": project, "label_config": config,
            "params": {"login": None, "password": None, "context": None}}
    return client.post("/predict", json=body, **kwargs)


def save_model(settings, classes=CAMVID_CLASSES, seed=0, project="1"):
    store = (project_store(settings.model_dir, project, settings.keep_versions) if project
             else shared_store(settings.model_dir, settings.keep_versions))
    return store.save(make_model(len(classes), seed), classes, {"metrics": {"miou": 0.1}})


def reference_classes(settings, project, image):
    """What the model predicts, argmax straight from model/, at the service's precision
    (AMP: bf16 on a CPU with native bf16)."""
    model, _ = project_store(settings.model_dir, project).load()
    probs = next(predict_probabilities(model, [image], batch_size=1, device="cpu",
                                       amp=settings.amp))
    return probs.argmax(0).numpy()


# --------------------------------------------------------------------- health, setup
def test_health(client):
    for path in ("/", "/health"):
        reply = client.get(path)
        assert reply.status_code == 200
        assert reply.get_json() == {"status": "UP", "model_class": "S4ALBackend"}


def test_setup_and_predict_before_any_training(client, server):
    reply = client.post("/setup", json={"project": PROJECT, "schema": CONFIG,
                                        "hostname": server.url, "access_token": "x" * 40,
                                        "extra_params": None})
    assert reply.status_code == 200
    assert reply.get_json() == {"model_version": UNTRAINED_VERSION}
    tasks = tasks_for(server)
    reply = predict(client, tasks)
    assert reply.status_code == 200
    results = reply.get_json()["results"]
    assert results == [{"result": [], "score": None, "model_version": UNTRAINED_VERSION}] * 3
    assert server.requests == []  # nothing fetched for an untrained model


@pytest.mark.parametrize("body,fragment", [
    ({"project": PROJECT}, "needs 'schema'"),
    ({"project": PROJECT, "schema": ""}, "needs 'schema'"),
    ({"project": PROJECT, "schema": '<View><Image name="i" value="$i"/></View>'},
     "no <BrushLabels>"),
    ({"project": PROJECT, "schema": '<View><Text name="t" value="$t"/></View>'}, "no <Image>"),
    ({"project": PROJECT, "schema": "<View><Image"}, "does not parse"),
    ({"project": "../../etc", "schema": CONFIG}, "not a project id"),
])
def test_setup_caller_faults_are_400_with_a_message(client, body, fragment):
    reply = client.post("/setup", json=body)
    assert reply.status_code == 400
    payload = reply.get_json()
    assert payload["status"] == 400 and fragment in payload["error"]


def test_malformed_requests(client):
    for path in ("/setup", "/predict", "/webhook"):
        reply = client.post(path, data="{not json", content_type="application/json")
        assert reply.status_code == 400 and "JSON object" in reply.get_json()["error"]
        reply = client.post(path, json=[1, 2])
        assert reply.status_code == 400
    reply = client.get("/predict")
    assert reply.status_code == 405 and reply.get_json()["status"] == 405
    reply = client.get("/nope")
    assert reply.status_code == 404 and "error" in reply.get_json()


@pytest.mark.parametrize("body,fragment", [
    ({"project": PROJECT, "label_config": CONFIG}, "needs 'tasks'"),
    ({"tasks": {"id": 1}, "label_config": CONFIG}, "must be a list"),
    ({"tasks": [{"id": 1}], "label_config": CONFIG}, "tasks[0]"),
    ({"tasks": [{"id": 1, "data": {}}], "project": "99.1"}, "no label config"),
    ({"tasks": [], "label_config": 5}, "label config XML"),
    ({"tasks": [], "label_config": CONFIG, "params": [1]}, "'params'"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": "<View/>"}, "no <Image>"),
])
def test_predict_caller_faults_are_400(client, body, fragment):
    reply = client.post("/predict", json=body)
    assert reply.status_code == 400
    assert fragment in reply.get_json()["error"]


def test_predict_uses_the_config_from_setup(client, server, settings):
    version = save_model(settings)
    client.post("/setup", json={"project": PROJECT, "schema": CONFIG})
    reply = client.post("/predict", json={"tasks": tasks_for(server)[:1], "project": PROJECT})
    assert reply.status_code == 200
    assert reply.get_json()["results"][0]["model_version"] == version


# --------------------------------------------------------------------- predictions
def test_predictions_with_a_model(client, server, settings, camvid_images):
    version = save_model(settings)
    reply = client.post("/setup", json={"project": PROJECT, "schema": CONFIG})
    assert reply.get_json() == {"model_version": version}
    tasks = tasks_for(server)
    reply = predict(client, tasks)
    assert reply.status_code == 200
    results = reply.get_json()["results"]
    assert len(results) == len(tasks)
    interface = LabelInterface(CONFIG)
    for item, image in zip(results, camvid_images.values(), strict=True):
        assert item["model_version"] == version
        assert 0 < item["score"] <= 1
        assert item["result"], "a random model still labels every pixel"
        assert interface.validate_prediction(item, return_errors=True) == []
        height, width = image.shape[:2]
        expected = reference_classes(settings, "1", image)
        seen = np.zeros((height, width), bool)
        for region in item["result"]:
            assert (region["original_width"], region["original_height"]) == (width, height)
            assert region["type"] == "brushlabels" and region["from_name"] == "tag"
            assert 0 < region["score"] <= 1
            (label,) = region["value"]["brushlabels"]
            mask = rle.decode(region["value"]["rle"], height, width)
            np.testing.assert_array_equal(mask, expected == CAMVID_CLASSES.index(label))
            assert not (seen & mask).any()
            seen |= mask
        assert seen.all()  # every pixel gets exactly one class
        assert all(auth == f"Token {LEGACY_KEY}" for _, _, auth in server.requests)


def test_setup_never_loads_a_model(client, settings):
    # Label Studio gives /setup 3 s: the version and its classes come from the store's
    # side file, the checkpoint is loaded by the first /predict only
    version = save_model(settings)
    assert client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).get_json() == \
        {"model_version": version}
    assert client.get("/metrics").get_json()["predict"]["model_loads"] == 0
    assert client.get("/status?project=1").get_json()["model_version"] == version
    assert client.get("/metrics").get_json()["predict"]["model_loads"] == 0


def test_version_without_side_file_still_served(client, server, settings):
    version = save_model(settings)
    project_store(settings.model_dir, "1").meta_path(version).unlink()
    assert client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).get_json() == \
        {"model_version": version}
    assert predict(client, tasks_for(server)[:1]).get_json()["results"][0]["result"]


def test_images_of_different_sizes_in_one_request(client, server, settings, camvid_images):
    save_model(settings)
    small = next(iter(camvid_images.values()))[:50, :70]
    server.add("/data/upload/1/small.png", png_bytes(small))
    tasks = tasks_for(server, [next(iter(camvid_images)), "small.png"])
    results = predict(client, tasks).get_json()["results"]
    sizes = [(r["result"][0]["original_width"], r["result"][0]["original_height"])
             for r in results]
    assert sizes == [(160, 120), (70, 50)]


def test_bad_tasks_get_an_empty_result_and_the_batch_survives(client, server, settings, caplog,
                                                              camvid_images):
    version = save_model(settings)
    server.add("/data/upload/1/broken.png", b"\x89PNG\r\n\x1a\n definitely not a png")
    server.add("/data/upload/1/huge.png", b"x" * (settings.max_image_bytes + 1))
    with FileServer() as foreign:
        foreign_url = foreign.url + foreign.add("/public/a.png", png_bytes(
            next(iter(camvid_images.values()))))
        good = tasks_for(server)
        tasks = [
            good[0],
            {"id": 101, "data": {"image": "/data/upload/1/broken.png"}},
            {"id": 102, "data": {"image": "/status/401"}},
            {"id": 103, "data": {"image": foreign_url}},
            good[1],
            {"id": 104, "data": {"picture": "/data/upload/1/x.png"}},
            {"id": 105, "data": {"image": "/data/upload/1/missing.png"}},
            {"id": 106, "data": {"image": "/data/upload/1/huge.png"}},
            good[2],
        ]
        with caplog.at_level(logging.ERROR, logger="s4al_backend"):
            reply = predict(client, tasks)
        assert foreign.requests == []
    assert reply.status_code == 200
    results = reply.get_json()["results"]
    assert len(results) == len(tasks)
    for index in (0, 4, 8):
        assert results[index]["result"] and results[index]["model_version"] == version
    expected_errors = {
        1: "broken", 2: "HTTP 401", 3: "ALLOWED_IMAGE_HOSTS", 5: "data.image",
        6: "HTTP 404", 7: "MAX_IMAGE_BYTES",
    }
    for index, fragment in expected_errors.items():
        item = results[index]
        assert item["result"] == [] and item["model_version"] == version
        assert fragment in item["error"], (index, item["error"])
        task_id = tasks[index]["id"]
        assert any(f"task {task_id}:" in r.getMessage() for r in caplog.records), task_id
    # the process keeps serving
    assert client.get("/health").status_code == 200
    assert predict(client, good[:1]).get_json()["results"][0]["result"]
    metrics = client.get("/metrics").get_json()["predict"]
    assert metrics["task_errors"] == 6 and metrics["tasks"] == 10


def test_image_cache_between_requests(client, server, settings):
    save_model(settings)
    tasks = tasks_for(server)[:1]
    first = predict(client, tasks).get_json()["results"][0]
    second = predict(client, tasks).get_json()["results"][0]
    assert server.count(tasks[0]["data"]["image"]) == 1
    assert [r["value"]["rle"] for r in first["result"]] == \
           [r["value"]["rle"] for r in second["result"]]


def test_model_reloaded_when_the_current_version_changes(client, server, settings):
    tasks = tasks_for(server)[:1]
    v1 = save_model(settings, seed=0)
    first = predict(client, tasks).get_json()["results"][0]
    assert first["model_version"] == v1
    # another process (a training worker) saves a new version into the store
    v2 = save_model(settings, seed=1)
    assert v2 != v1
    assert client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).get_json() == \
        {"model_version": v2}
    second = predict(client, tasks).get_json()["results"][0]
    assert second["model_version"] == v2
    assert first["result"] != second["result"]
    predict(client, tasks)
    assert client.get("/metrics").get_json()["predict"]["model_loads"] == 2
    assert v2 in client.get("/metrics").get_json()["models"].values()


def test_checkpoint_on_other_classes_is_never_misapplied(client, server, settings):
    v = save_model(settings, classes=["Cat", "Dog"])
    expected = f"{v} ({MISMATCH_NOTE})"
    assert client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).get_json() == \
        {"model_version": expected}
    results = predict(client, tasks_for(server)).get_json()["results"]
    assert results == [{"result": [], "score": None, "model_version": expected}] * 3


def test_classes_mapped_by_name(client, server, settings, camvid_images):
    # the model knows Road and Sky (in another order) and a class the config lacks
    v = save_model(settings, classes=["Road", "Alien", "Sky"])
    config = brush_config(["Sky", "Car", "Road"])
    assert client.post("/setup", json={"project": PROJECT, "schema": config}).get_json() == \
        {"model_version": v}
    image = next(iter(camvid_images.values()))
    expected = reference_classes(settings, "1", image)  # 0 Road, 1 Alien, 2 Sky
    item = predict(client, tasks_for(server)[:1], config=config).get_json()["results"][0]
    labels = {r["value"]["brushlabels"][0]: rle.decode(r["value"]["rle"], *image.shape[:2])
              for r in item["result"]}
    assert set(labels) <= {"Road", "Sky"}
    if "Road" in labels:
        np.testing.assert_array_equal(labels["Road"], expected == 0)
    if "Sky" in labels:
        np.testing.assert_array_equal(labels["Sky"], expected == 2)
    covered = sum(m.sum() for m in labels.values())
    assert covered == (expected != 1).sum()  # "Alien" pixels stay unlabelled


def test_shared_model_serves_projects_without_their_own(client, server, settings):
    shared = save_model(settings, project=None)
    assert predict(client, tasks_for(server)[:1], project="5.1").get_json()["results"][0][
        "model_version"] == shared
    own = save_model(settings, project="5", seed=3)
    assert predict(client, tasks_for(server)[:1], project="5.1").get_json()["results"][0][
        "model_version"] == own
    assert client.post("/setup", json={"project": "6.1", "schema": CONFIG}).get_json() == \
        {"model_version": shared}


# --------------------------------------------------------------------- auth
def test_basic_auth(tmp_path, server, fit_calls):
    settings = make_settings(tmp_path, server, basic_auth_user="ls", basic_auth_pass="pw-123")
    client = create_app(settings).test_client()
    body = {"project": PROJECT, "schema": CONFIG}
    reply = client.post("/setup", json=body)
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"].startswith("Basic")
    assert reply.get_json()["error"] == "authentication required"
    assert client.post("/setup", json=body, auth=("ls", "wrong")).status_code == 401
    assert client.post("/setup", json=body, auth=("LS", "pw-123")).status_code == 401
    assert client.post("/setup", json=body, auth=("ls", "pw-123")).status_code == 200
    assert predict(client, [], auth=("ls", "pw-123")).status_code == 200
    assert client.get("/").status_code == 401
    assert client.get("/metrics").status_code == 401
    # open: health checks, and Label Studio's webhooks (sent without credentials)
    assert client.get("/health").status_code == 200
    assert client.post("/webhook", json={"action": "START_TRAINING",
                                         "project": {"id": 1}}).status_code == 200


def test_auth_off_by_default(client):
    assert client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).status_code == 200


def test_setup_token_used_when_no_api_key(tmp_path, server):
    settings = make_settings(tmp_path, server, label_studio_api_key="")
    save_model(settings)
    client = create_app(settings).test_client()
    tasks = tasks_for(server)[:1]
    assert "HTTP 401" in predict(client, tasks).get_json()["results"][0]["error"]
    client.post("/setup", json={"project": PROJECT, "schema": CONFIG,
                                "hostname": "http://elsewhere:8080", "access_token": LEGACY_KEY})
    assert predict(client, tasks).get_json()["results"][0]["result"]


# --------------------------------------------------------------------- webhook, status
@pytest.fixture
def fit_calls(monkeypatch):
    """Records backend.fit calls instead of queueing training (the jobs tests cover that)."""
    calls = []

    def fit(self, event, data, **kwargs):
        calls.append((self.project, event, data))
        return {"status": "queued", "event": event}

    monkeypatch.setattr(S4ALBackend, "fit", fit)
    return calls


@pytest.mark.parametrize("event", ["ANNOTATION_CREATED", "ANNOTATION_UPDATED",
                                   "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED"])
def test_webhook_route_calls_fit(client, fit_calls, event):
    body = {"action": event, "project": {"id": 1, "label_config": CONFIG},
            "annotation": {"id": 3}, "task": {"id": 4}}
    reply = client.post("/webhook", json=body)
    assert reply.status_code == 200
    assert reply.get_json() == {"status": "queued", "event": event}
    assert fit_calls == [("1", event, body)]


def test_webhook_faults_and_other_events(client):
    assert client.post("/webhook", json={"project": 1}).status_code == 400
    reply = client.post("/webhook", json={"action": "TASKS_CREATED", "project": 1})
    assert reply.status_code == 200 and "does not concern training" in reply.get_json()["message"]
    reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": "x/y"}})
    assert reply.status_code == 400


def test_status_and_metrics(client, server, settings):
    reply = client.get("/status?project=1")
    assert reply.status_code == 200
    assert reply.get_json()["model_version"] == UNTRAINED_VERSION
    version = save_model(settings)
    status = client.get("/status?project=1").get_json()
    assert status["model_version"] == version and status["versions"] == [version]
    assert status["model_source"] == "project" and status["classes"] == CAMVID_CLASSES
    assert status["metrics"] == {"miou": 0.1}
    assert client.get("/status?project=../x").status_code == 400
    predict(client, tasks_for(server))
    metrics = client.get("/metrics").get_json()
    assert metrics["device"] == "cpu"
    for key in ("requests", "tasks", "download_s", "decode_s", "forward_s", "postprocess_s"):
        assert key in metrics["predict"]
    assert metrics["predict"]["tasks"] == 3 and metrics["predict"]["forward_s"] > 0


def test_internal_errors_are_json_500_and_logged(settings, monkeypatch, caplog):
    client = create_app(settings).test_client()
    monkeypatch.setattr(S4ALBackend, "status", lambda self, project=None: 1 / 0)
    with caplog.at_level(logging.ERROR):
        reply = client.get("/status")
    assert reply.status_code == 500
    assert reply.get_json()["error"].startswith("internal error (ZeroDivisionError)")
    assert any("GET /status failed" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------- secrets
def test_secrets_never_logged_or_returned(tmp_path, server, caplog):
    settings = make_settings(tmp_path, server, basic_auth_user="ls", basic_auth_pass="pw-secret-9")
    save_model(settings)
    client = create_app(settings).test_client()
    auth = ("ls", "pw-secret-9")
    bodies = []
    with caplog.at_level(logging.DEBUG):
        bodies.append(client.post("/setup", json={"project": PROJECT, "schema": CONFIG,
                                                  "access_token": "setup-token-77"},
                                  auth=auth).get_data(as_text=True))
        bodies.append(predict(client, tasks_for(server) + [
            {"id": 9, "data": {"image": "/status/401"}}], auth=auth).get_data(as_text=True))
        bodies.append(client.get("/metrics", auth=auth).get_data(as_text=True))
        bodies.append(client.get("/status?project=1", auth=auth).get_data(as_text=True))
        bodies.append(client.post("/setup", json={}, auth=("ls", "bad")).get_data(as_text=True))
    text = "\n".join(bodies) + "\n".join(r.getMessage() for r in caplog.records) + repr(settings)
    for secret in (LEGACY_KEY, "pw-secret-9", "setup-token-77"):
        assert secret not in text


# --------------------------------------------------------------------- other servers
def test_label_studio_ml_init_app_serves_the_same_class(settings, server, monkeypatch):
    api = pytest.importorskip("label_studio_ml.api")
    from s4al_backend import backend as backend_module

    if backend_module._Base is object:
        pytest.skip("label_studio_ml installed but not 2.x")
    monkeypatch.setattr(backend_module, "_default_runtime", backend_module.Runtime(settings))
    save_model(settings)
    client = api.init_app(S4ALBackend).test_client()
    assert client.get("/health").get_json()["model_class"] == "S4ALBackend"
    version = client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).get_json()
    results = predict(client, tasks_for(server)).get_json()["results"]
    assert [r["model_version"] for r in results] == [version["model_version"]] * 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_health(port: int, process, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stderr.read()}")
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
        except requests.RequestException:
            time.sleep(0.2)
    raise AssertionError("server did not come up")


def service_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "LANG", "OMP_NUM_THREADS", "TMPDIR")}
    env.update({"MODEL_DIR": str(tmp_path / "model_dir"), "DEVICE": "cpu", **extra})
    return env


@pytest.mark.parametrize("command", ["python", "gunicorn"])
def test_entry_points_serve(tmp_path, command):
    port = free_port()
    if command == "python":
        args = [sys.executable, "_wsgi.py", "--host", "127.0.0.1", "--port", str(port)]
    else:
        args = [sys.executable, "-m", "gunicorn", "--workers", "1", "--threads", "4",
                "--bind", f"127.0.0.1:{port}", "_wsgi:app"]
    process = subprocess.Popen(args, cwd=ROOT, env=service_env(tmp_path), text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_health(port, process) == {"status": "UP", "model_class": "S4ALBackend"}
        reply = requests.post(f"http://127.0.0.1:{port}/setup",
                              json={"project": PROJECT, "schema": CONFIG}, timeout=10)
        assert reply.json() == {"model_version": UNTRAINED_VERSION}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_bad_setting_stops_the_start_naming_the_variable(tmp_path):
    env = service_env(tmp_path, DEVICE="tpu")
    done = subprocess.run([sys.executable, "_wsgi.py", "--port", str(free_port())], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "DEVICE: must be auto, cpu, cuda" in done.stderr


def test_untouched_torch_threads():
    # the service never changes torch's threads unless TORCH_THREADS says so
    assert torch.get_num_threads() == 1
