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


def test_torch_threads_change_only_when_torch_threads_says_so(tmp_path):
    """The service's runtime leaves torch's thread count alone unless TORCH_THREADS is set
    (the host decides; conftest's single thread stays for the other tests)."""
    from s4al_backend.backend import Runtime
    from s4al_backend.settings import Settings

    before = torch.get_num_threads()
    env = {"MODEL_DIR": str(tmp_path / "models"), "IMAGE_CACHE_DIR": str(tmp_path / "cache")}
    try:
        torch.set_num_threads(3)
        Runtime(Settings.from_env(env))
        assert torch.get_num_threads() == 3
        Runtime(Settings.from_env({**env, "TORCH_THREADS": "2"}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_predict_never_sends_the_key_to_a_host_hidden_behind_a_backslash(client, server,
                                                                          settings):
    save_model(settings)
    with FileServer() as foreign:
        tasks = [{"id": 7, "data": {"image": f"http://{foreign.host}\\@{server.host}"
                                              "/data/upload/1/x.png"}}]
        reply = predict(client, tasks)
        assert foreign.requests == []
    assert reply.status_code == 200
    assert "ambiguously" in reply.get_json()["results"][0]["error"]


# --------------------------------------------------------------------- bounded requests
def test_a_slow_image_never_stalls_other_predicts(tmp_path, server, camvid_images):
    import threading
    from dataclasses import replace

    # bounds with room for a loaded CI machine, each well below what the defect gave
    settings = replace(make_settings(tmp_path, server), image_timeout=5)
    save_model(settings)
    app = create_app(settings)
    good = tasks_for(server)
    slow = {"id": 50, "data": {"image": "/slow/40?every=0.25"}}  # 10 s if let run
    replies = {}

    def slow_request():
        t0 = time.monotonic()
        replies["slow"] = predict(app.test_client(), [slow, good[0]])
        replies["slow_s"] = time.monotonic() - t0

    predict(app.test_client(), good[:1])  # model loaded before timing anything
    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    quick = predict(app.test_client(), good[1:2])
    quick_s = time.monotonic() - t0
    thread.join(timeout=30)
    assert quick.status_code == 200 and quick.get_json()["results"][0]["result"]
    assert quick_s < 3.5, f"a small /predict waited {quick_s:.1f} s behind a slow image"
    results = replies["slow"].get_json()["results"]
    assert "IMAGE_TIMEOUT (5 s)" in results[0]["error"] and results[1]["result"]
    assert replies["slow_s"] < 8.0


def big_png(height: int, width: int) -> bytes:
    """A few KB of PNG that decodes to height x width: stripes compress to nothing."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2] = (128, 128, 128)
    return png_bytes(image)


def test_a_large_image_is_scaled_down_for_the_network(tmp_path, server, camvid_images):
    from dataclasses import replace

    settings = replace(make_settings(tmp_path, server), max_predict_pixels=60_000)
    save_model(settings)
    app = create_app(settings)
    data = server.add("/data/upload/1/big.png", big_png(900, 1600))
    assert len(data) < 20_000
    seen = []
    runtime = app.extensions["s4al"]
    tasks = tasks_for(server)[:1] + [{"id": 60, "data": {"image": data}}]
    predict(app.test_client(), tasks[:1])
    model = runtime.model_for("1").model
    hook = model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    try:
        reply = predict(app.test_client(), tasks)
    finally:
        hook.remove()
    results = reply.get_json()["results"]
    assert reply.status_code == 200 and results[1]["result"]
    assert all(n * h * w <= 60_000 for n, _, h, w in seen), seen
    assert (1, 3, 183, 326) in seen  # 900 x 1600 scaled by sqrt(60000 / 1440000)
    first = results[1]["result"][0]
    assert (first["original_height"], first["original_width"]) == (900, 1600)
    mask = rle.decode(first["value"]["rle"], 900, 1600)
    assert mask.shape == (900, 1600) and mask.any()


def test_a_forward_failure_fails_only_its_own_task(client, server, settings, caplog):
    save_model(settings)
    data = server.add("/data/upload/1/big.png", big_png(240, 320))
    tasks = tasks_for(server)[:2] + [{"id": 70, "data": {"image": data}}]
    predict(client, tasks[:1])
    model = client.application.extensions["s4al"].model_for("1").model

    def out_of_memory(_module, args):  # what torch raises when an allocation fails
        if args[0].shape[-1] == 320:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")

    hook = model.register_forward_pre_hook(out_of_memory)
    try:
        reply = predict(client, tasks)
    finally:
        hook.remove()
    results = reply.get_json()["results"]
    assert reply.status_code == 200
    assert results[0]["result"] and results[1]["result"]
    assert "MAX_PREDICT_PIXELS" in results[2]["error"] and results[2]["result"] == []


# --------------------------------------------------------------------- secrets (issue 14)
SECRET = "S3cretPw-7731"
SECRET_REDIS_URLS = [f"redis://127.0.0.1:1/0?password={SECRET}",  # nothing listens on :1
                     f"redis://{SECRET}@127.0.0.1:1/0", f"redis://:{SECRET}@127.0.0.1:1/0"]


@pytest.mark.parametrize("redis_url", SECRET_REDIS_URLS)
def test_redis_password_never_in_replies_or_logs(tmp_path, server, caplog, redis_url):
    settings = make_settings(tmp_path, server, redis_url=redis_url,
                             label_studio_url=f"http://ls-user:{SECRET}@{server.host}")
    with caplog.at_level(logging.DEBUG):
        client = create_app(settings).test_client()
        webhook = client.post("/webhook", json={"action": "START_TRAINING",
                                                "project": {"id": 3}})
        status = client.get("/status?project=3")
    assert webhook.status_code == 503 and "Redis unavailable" in webhook.get_json()["error"]
    assert "Redis unavailable" in status.get_json()["training"]["error"]
    text = (webhook.get_data(as_text=True) + status.get_data(as_text=True) + repr(settings)
            + "\n".join(r.getMessage() for r in caplog.records))
    assert SECRET not in text


def test_settings_log_line_and_config_errors_hide_passwords(tmp_path):
    port = free_port()
    env = service_env(tmp_path, REDIS_URL=SECRET_REDIS_URLS[0],
                      LABEL_STUDIO_URL=f"http://u:{SECRET}@127.0.0.1:9")
    process = subprocess.Popen([sys.executable, "_wsgi.py", "--host", "127.0.0.1", "--port",
                                str(port)], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_health(port, process)
    finally:
        process.send_signal(signal.SIGTERM)
        log = process.communicate(timeout=15)[1]
    assert "settings: Settings(" in log and "password=***" in log and SECRET not in log
    for name, value in (("LABEL_STUDIO_URL", f"ftp://u:{SECRET}@ls"),
                        ("LABEL_STUDIO_URL", f"http://u:{SECRET}@ls:99999"),
                        ("REDIS_URL", f"mysql://u:{SECRET}@db"),
                        ("ALLOWED_IMAGE_HOSTS", f"http://u:{SECRET}@bucket")):
        done = subprocess.run([sys.executable, "_wsgi.py", "--port", str(free_port())],
                              cwd=ROOT, env=service_env(tmp_path, **{name: value}),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and f"configuration error: {name}" in done.stderr
        assert SECRET not in done.stderr + done.stdout


@pytest.mark.parametrize("redis_url", SECRET_REDIS_URLS[:2])
def test_worker_never_prints_the_redis_password(tmp_path, redis_url):
    done = subprocess.run([sys.executable, "-m", "s4al_backend.worker", "--burst"], cwd=ROOT,
                          env=service_env(tmp_path, REDIS_URL=redis_url),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Redis unavailable at redis://" in done.stderr
    assert SECRET not in done.stderr + done.stdout


# --------------------------------------------------------------------- bounded memory
def test_label_configs_of_many_projects_stay_bounded(client):
    import gc
    import tracemalloc

    from s4al_backend.backend import MAX_REMEMBERED_CONFIG_BYTES

    padding = "x" * (1024 * 1024)
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for project in range(60):  # 60 MB of distinct label configs
            schema = CONFIG.replace("<View>", f"<View><!-- {project} {padding} -->")
            reply = client.post("/setup", json={"project": str(100 + project), "schema": schema})
            assert reply.status_code == 200
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < MAX_REMEMBERED_CONFIG_BYTES + 8 * 1024 * 1024, f"+{grown / 2**20:.0f} MB kept"
    # the most recent projects' configs are still remembered: /predict without a config
    assert predict(client, [], config=None, project="159").status_code == 200
    assert predict(client, [], config=None, project="100").status_code == 400


# --------------------------------------------------------------------- malformed input
DEEP_JSON = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
def test_deeply_nested_json_is_a_400(client, path):
    reply = client.post(path, data=DEEP_JSON, content_type="application/json")
    assert reply.status_code == 400 and "nested too deeply" in reply.get_json()["error"]


@pytest.mark.parametrize("project", ["x" * 300, "1" * 300, "9" * 5000, {"id": 10**400},
                                     {"id": "x" * 300}])
def test_absurd_project_ids_are_a_400(client, project):
    replies = [
        client.post("/setup", json={"project": project, "schema": CONFIG}),
        predict(client, [], project=project),
        client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": project}),
        client.get("/status", query_string={"project": str(project)}),
    ]
    for reply in replies:
        assert reply.status_code == 400, (reply.request.path, reply.get_json())
        assert "not a project id" in reply.get_json()["error"]


@pytest.mark.parametrize("annotations", [5, "x", {"id": 1}, None])
def test_annotations_deleted_with_a_malformed_list_counts_one(client, annotations):
    reply = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 77},
                                          "annotations": annotations})
    assert reply.status_code == 200 and reply.get_json()["status"] == "counted"


# --------------------------------------------------------------------- /setup's token (issue 14)
def test_setup_cannot_swap_or_break_the_image_token(tmp_path, server, caplog):
    settings = make_settings(tmp_path, server, label_studio_api_key="", image_cache_mb=0)
    save_model(settings)
    client = create_app(settings).test_client()
    tasks = tasks_for(server)[:1]  # fetched again by every /predict (no image cache)

    def setup(token, hostname="http://elsewhere:8080"):
        return client.post("/setup", json={"project": PROJECT, "schema": CONFIG,
                                           "hostname": hostname, "access_token": token})

    with caplog.at_level(logging.INFO):
        assert setup(LEGACY_KEY).status_code == 200
        assert predict(client, tasks).get_json()["results"][0]["result"]
        assert setup("evil\r\nX-Injected: 1" + "a" * 20).status_code == 200  # malformed
        assert predict(client, tasks).get_json()["results"][0]["result"]
        assert setup("f" * 40).status_code == 200  # well-formed, but ours still works
        assert predict(client, tasks).get_json()["results"][0]["result"]
        assert setup(LEGACY_KEY, hostname="http://x\r\n[ERROR] forged line").status_code == 200
    assert server.requests[-1][2] == f"Token {LEGACY_KEY}"
    messages = [r.getMessage() for r in caplog.records]
    assert not any("\n" in m for m in messages if "forged line" in m)
    assert any("malformed access token" in m for m in messages)


def test_a_refused_setup_token_is_replaced_by_the_next(tmp_path, server):
    settings = make_settings(tmp_path, server, label_studio_api_key="", image_cache_mb=0)
    save_model(settings)
    client = create_app(settings).test_client()
    tasks = tasks_for(server)[:1]
    client.post("/setup", json={"project": PROJECT, "schema": CONFIG, "access_token": "f" * 40})
    assert "HTTP 401" in predict(client, tasks).get_json()["results"][0]["error"]
    client.post("/setup", json={"project": PROJECT, "schema": CONFIG, "access_token": LEGACY_KEY})
    assert predict(client, tasks).get_json()["results"][0]["result"]


def test_basic_auth_user_with_a_colon_stops_the_start(tmp_path):
    env = service_env(tmp_path, BASIC_AUTH_USER="team:ls", BASIC_AUTH_PASS="pw-123")
    done = subprocess.run([sys.executable, "_wsgi.py", "--port", str(free_port())], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "configuration error: BASIC_AUTH_USER: must not contain ':'" in done.stderr
