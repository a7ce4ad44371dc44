"""End-to-end fixtures: a real Label Studio 1.23 server, the backend and an RQ worker as
real processes, the real Redis on 127.0.0.1:6379.

- Label Studio runs from `.venv-ls` (`make setup-ls`). It is migrated once per test run
  into a template data dir (`label-studio init -q`, ~60 s of CPU) and every server starts
  from a copy of it (5-8 s). Missing `.venv-ls` is a test *failure*, never a skip: CI
  installs it through `make test`.
- The server serves up to 20 CamVid images (the bundled tests/fixtures/camvid, or the
  CamVid folder S4AL_E2E_CAMVID names), at 160x120, through its local-files storage.
- `backend_stack` starts gunicorn (`_wsgi:app`) and `python -m s4al_backend.worker` with a
  fresh MODEL_DIR, a queue name of their own and tiny training settings.

Every process is started in its own session and stopped by its process group at teardown.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
# Label Studio's own venv (`make setup-ls`); S4AL_E2E_LS_VENV points elsewhere
LS_VENV = Path(os.environ.get("S4AL_E2E_LS_VENV") or REPO / ".venv-ls")
LS_BIN = LS_VENV / "bin" / "label-studio"
VENV_BIN = Path(sys.executable).parent
CAMVID = Path(os.environ.get("S4AL_E2E_CAMVID") or REPO / "tests" / "fixtures" / "camvid")

N_IMAGES = 20
DOWNSCALE = 3  # 480x360 -> 160x120 (the bundled fixture is already 160x120)
IMAGE_SIZE = (160, 120)  # width, height
IGNORE = 255
CAMVID_IGNORE = 11  # 'Unlabelled' in CamVid's annotation PNGs

LS_USER = "admin@example.com"
LS_PASSWORD = "s4al-e2e-" + secrets.token_hex(4)
LS_TOKEN = secrets.token_hex(20)  # 40 hex characters: a legacy API token
REDIS_URL = os.environ.get("S4AL_E2E_REDIS_URL", "redis://127.0.0.1:6379/13")

# names Label Studio also reads bare (HOST, PORT, ...) or with HEARTEX_; never leak them in
_STRAY = ("HOST", "PORT", "USERNAME", "PASSWORD", "DEBUG", "DJANGO_SETTINGS_MODULE",
          "DJANGO_DB", "DATABASE_URL")
# every setting the backend reads, so the developer's own environment cannot leak in
_BACKEND_NAMES = (
    "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "ALLOWED_IMAGE_HOSTS", "MODEL_DIR", "DEVICE",
    "PREDICT_BATCH_SIZE", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "IMAGE_CACHE_DIR",
    "IMAGE_CACHE_MB", "BACKBONE_WEIGHTS", "TORCH_THREADS", "BASIC_AUTH_USER",
    "BASIC_AUTH_PASS", "LOG_LEVEL", "REDIS_URL", "QUEUE_NAME", "TRAIN_AFTER_ANNOTATIONS",
    "METHOD", "TRAIN_ITERATIONS", "COLD_START_ITERATIONS", "TRAIN_CROP", "TRAIN_BATCH_SIZE",
    "HOLDOUT_FRACTION", "ACQUISITION", "ACQUIRE_WITH", "REGION_SIZE", "REGIONS_PER_IMAGE",
    "REGIONS_PER_CYCLE", "KEEP_VERSIONS", "JOB_TIMEOUT", "NUM_GPUS", "PREDICT_CONCURRENCY",
    "MAX_PREDICT_PIXELS", "IMAGE_TIMEOUT",
    "AMP", "CYCLE_BUDGET", "COLD_START_BUDGET", "FIRST_VERSION", "PREDICTION_VERSIONS",
)

# Tiny training: each cycle takes seconds on one CPU thread.
TINY_TRAINING = {
    "DEVICE": "cpu",
    "TORCH_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "METHOD": "s4al",
    "TRAIN_ITERATIONS": "12",
    "COLD_START_ITERATIONS": "6",
    "TRAIN_CROP": "96",
    "TRAIN_BATCH_SIZE": "2",
    "PREDICT_BATCH_SIZE": "4",
    "HOLDOUT_FRACTION": "0",
    "ACQUISITION": "entropy",
    "REGION_SIZE": "20",
    "REGIONS_PER_IMAGE": "1",
    "REGIONS_PER_CYCLE": "4",
    "TRAIN_AFTER_ANNOTATIONS": "4",
    "JOB_TIMEOUT": "600",
    "FIRST_VERSION": "false",  # one version per cycle, as the tests count them
    "LOG_LEVEL": "INFO",
}


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Process:
    """A child process in its own session (so its whole group can be stopped)."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path = REPO
    popen: subprocess.Popen | None = None

    def start(self) -> Process:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.log, "ab")  # the child keeps its own copy of the descriptor
        handle.write(f"\n===== start {time.strftime('%H:%M:%S')}: {self.args}\n".encode())
        handle.flush()
        self.popen = subprocess.Popen(
            self.args, cwd=self.cwd, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        handle.close()
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(10)

    def tail(self, lines: int = 60) -> str:
        return f"--- {self.name} log ({self.log}) ---\n{log_tail(self.log, lines)}"


def wait_http(url: str, process: Process, timeout: float, ok=lambda r: r.ok) -> None:
    """Poll `url` until `ok(response)`; fail with the process's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not process.alive:
            pytest.fail(f"{process.name} exited with {process.popen.returncode} before "
                        f"{url} answered\n{process.tail()}")
        try:
            response = requests.get(url, timeout=3)
            if ok(response):
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}"
        time.sleep(0.5)
    pytest.fail(f"{process.name} not ready at {url} after {timeout:.0f} s ({last})\n"
                f"{process.tail()}")


# --------------------------------------------------------------------------- images
@dataclass(frozen=True)
class CamVidImage:
    name: str  # file name in the document root folder
    image: np.ndarray  # uint8 H x W x 3, RGB
    mask: np.ndarray  # int64 H x W, 255 = unlabelled

    @property
    def labelled_pixels(self) -> int:
        return int((self.mask != IGNORE).sum())


@dataclass
class ImageSet:
    root: Path  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    classes: list[str]
    images: dict[str, CamVidImage]
    source: Path
    _folders: dict[tuple[str, ...], str] = field(default_factory=dict)

    def folder(self, names: list[str] | None = None) -> Path:
        """A folder under the document root holding `names` (default: all images); one
        folder per distinct selection, so a project's storage sees exactly those."""
        names = sorted(names or self.images)
        key = tuple(names)
        if key not in self._folders:
            folder = self.root / f"set{len(self._folders)}"
            folder.mkdir()
            for name in names:
                shutil.copyfile(self.root / "all" / name, folder / name)
            self._folders[key] = folder.name
        return self.root / self._folders[key]


def _pick_names(root: Path, count: int) -> list[tuple[str, str]]:
    """(split, file name) pairs: evenly spread over train (then val) for variety."""
    picked: list[tuple[str, str]] = []
    for split in ("train", "val"):
        files = sorted(p.name for p in (root / split).glob("*.png"))
        if not files:
            continue
        need = count - len(picked)
        step = max(1, len(files) // need) if need > 0 else 1
        picked.extend((split, f) for f in files[::step][:need])
        if len(picked) >= count:
            break
    return picked


@pytest.fixture(scope="session")
def camvid_images(tmp_path_factory) -> ImageSet:
    import json

    source = CAMVID
    classes = json.loads((source / "classes.json").read_text())["classes"]
    root = tmp_path_factory.mktemp("ls-docroot")
    (root / "all").mkdir()
    images: dict[str, CamVidImage] = {}
    for split, name in _pick_names(source, N_IMAGES):
        bgr = cv2.imread(str(source / split / name), cv2.IMREAD_COLOR)
        label = cv2.imread(str(source / f"{split}annot" / name), cv2.IMREAD_GRAYSCALE)
        assert bgr is not None and label is not None, f"cannot read {source / split / name}"
        if bgr.shape[:2] != IMAGE_SIZE[::-1]:
            bgr = cv2.resize(bgr, IMAGE_SIZE, interpolation=cv2.INTER_AREA)
            label = cv2.resize(label, IMAGE_SIZE, interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(root / "all" / name), bgr)
        mask = label.astype(np.int64)
        mask[mask >= len(classes)] = IGNORE
        images[name] = CamVidImage(name, bgr[:, :, ::-1].copy(), mask)
    assert len(images) >= 8, f"too few CamVid images found under {source}"
    return ImageSet(root, classes, images, source)


# --------------------------------------------------------------------------- Label Studio
def _clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if k not in _STRAY and k not in _BACKEND_NAMES
        and not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "S4AL_"))
    }
    env["OMP_NUM_THREADS"] = "1"
    env.pop("VIRTUAL_ENV", None)
    return env


def ls_env(data_dir: Path, document_root: Path, port: int | None = None) -> dict[str, str]:
    env = _clean_env()
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": LS_USER,
        "LABEL_STUDIO_PASSWORD": LS_PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": LS_TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "PATH": f"{LS_VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
    })
    if port is not None:
        env["LABEL_STUDIO_HOST"] = f"http://127.0.0.1:{port}"
    return env


def require_label_studio() -> None:
    if not LS_BIN.exists():
        pytest.fail(
            f"Label Studio is not installed: {LS_BIN} is missing. The end-to-end tests need "
            f"it; run `make setup-ls` (or `make test`, which installs it).", pytrace=False)


@pytest.fixture(scope="session")
def ls_template(tmp_path_factory, camvid_images) -> Path:
    """A data dir migrated once (`label-studio init -q`), copied for every server."""
    require_label_studio()
    template = tmp_path_factory.mktemp("ls-template")
    log = template.parent / "ls-init.log"
    started = time.monotonic()
    with open(log, "wb") as handle:
        done = subprocess.run(
            [str(LS_BIN), "init", "-q"], cwd=template.parent,
            env=ls_env(template, camvid_images.root), stdout=handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, timeout=900,
        )
    if done.returncode != 0 or not (template / "label_studio.sqlite3").exists():
        pytest.fail(f"`label-studio init -q` failed ({done.returncode})\n{log_tail(log)}")
    print(f"\n[e2e] Label Studio migrated in {time.monotonic() - started:.0f} s")
    return template


@dataclass
class LabelStudioServer:
    url: str
    api_key: str
    data_dir: Path
    images: ImageSet
    process: Process

    def client(self, api_key: str | None = None):
        from label_studio_sdk.client import LabelStudio

        return LabelStudio(base_url=self.url, api_key=api_key or self.api_key, timeout=120)


def start_label_studio(template: Path, images: ImageSet, workdir: Path) -> LabelStudioServer:
    data_dir = workdir / "ls-data"
    shutil.copytree(template, data_dir)
    port = free_port()  # a busy port would silently become port+1: pick a free one
    url = f"http://127.0.0.1:{port}"
    process = Process(
        "label-studio",
        [str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1",
         "--port", str(port)],
        ls_env(data_dir, images.root, port), workdir / "label-studio.log", cwd=workdir,
    ).start()
    try:
        wait_http(f"{url}/health", process, timeout=240)
        who = requests.get(f"{url}/api/current-user/whoami",
                           headers={"Authorization": f"Token {LS_TOKEN}"}, timeout=30)
        if who.status_code != 200:
            pytest.fail(f"Label Studio does not take the legacy token ({who.status_code}): "
                        f"{who.text[:300]}\n{process.tail()}")
    except BaseException:
        process.stop()
        raise
    return LabelStudioServer(url, LS_TOKEN, data_dir, images, process)


@pytest.fixture(scope="session")
def label_studio(ls_template, camvid_images, tmp_path_factory) -> Iterator[LabelStudioServer]:
    started = time.monotonic()
    server = start_label_studio(ls_template, camvid_images, tmp_path_factory.mktemp("ls"))
    print(f"\n[e2e] Label Studio up at {server.url} in {time.monotonic() - started:.0f} s")
    yield server
    server.process.stop()


# --------------------------------------------------------------------------- Redis
@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.exceptions.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}", pytrace=False)
    return REDIS_URL


def _drop_redis_keys(url: str, queue: str) -> None:
    import redis

    connection = redis.Redis.from_url(url)
    try:
        for pattern in (f"s4al:{queue}:*", f"*{queue}*"):
            for key in connection.scan_iter(match=pattern, count=500):
                connection.delete(key)
        connection.srem("rq:queues", f"rq:queue:{queue}")
        for key in connection.scan_iter(match="rq:worker:*", count=500):
            if connection.type(key) == b"hash" and connection.hget(key, "queues") == \
                    queue.encode():
                connection.delete(key)
                connection.srem("rq:workers", key)
    except redis.exceptions.RedisError:
        pass
    finally:
        connection.close()


# --------------------------------------------------------------------------- backend
@dataclass
class BackendStack:
    """The backend (gunicorn) and its worker, sharing a MODEL_DIR and a queue."""

    url: str
    port: int
    env: dict[str, str]
    model_dir: Path
    workdir: Path
    web: Process | None = None
    worker: Process | None = None

    def start_web(self) -> None:
        if self.web is not None and self.web.alive:
            return
        if not port_is_free(self.port):
            time.sleep(2)
        self.web = Process(
            "backend",
            [str(VENV_BIN / "gunicorn"), "--workers", "1", "--threads", "4",
             "--bind", f"127.0.0.1:{self.port}", "--timeout", "300",
             "--graceful-timeout", "5", "_wsgi:app"],
            self.env, self.workdir / "backend.log",
        ).start()
        wait_http(f"{self.url}/health", self.web, timeout=180)

    def start_worker(self) -> None:
        if self.worker is not None and self.worker.alive:
            return
        self.worker = Process(
            "worker", [sys.executable, "-m", "s4al_backend.worker"], self.env,
            self.workdir / "worker.log",
        ).start()
        time.sleep(1.0)
        if not self.worker.alive:
            pytest.fail(f"the worker exited at once\n{self.worker.tail()}")

    def stop_web(self) -> None:
        if self.web is not None:
            self.web.stop()

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def stop(self) -> None:
        self.stop_web()
        self.stop_worker()

    def logs(self, lines: int = 80) -> str:
        return "\n".join(p.tail(lines) for p in (self.web, self.worker) if p is not None)

    # --- the service's own routes
    def get(self, path: str, **params) -> dict:
        response = requests.get(f"{self.url}{path}", params=params, timeout=30)
        assert response.ok, f"GET {path} -> {response.status_code}: {response.text[:500]}"
        return response.json()

    def status(self, project: int) -> dict:
        return self.get("/status", project=project)


@pytest.fixture
def backend_stack(tmp_path, label_studio, redis_url) -> Iterator:
    """Factory: `backend_stack(**env_overrides)` starts the web process and the worker
    (unless `worker=False`) against the session's Label Studio; all stopped at teardown."""
    stacks: list[BackendStack] = []

    def start(worker: bool = True, **overrides: str) -> BackendStack:
        index = len(stacks)
        workdir = tmp_path / f"stack{index}"
        model_dir = workdir / "model_dir"
        model_dir.mkdir(parents=True)
        queue = f"e2e-{uuid.uuid4().hex[:10]}"
        port = free_port()
        env = _clean_env()
        env.update(TINY_TRAINING)
        env.update({
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.api_key,
            "REDIS_URL": redis_url,
            "QUEUE_NAME": queue,
            "MODEL_DIR": str(model_dir),
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "TORCH_HOME": str(workdir / "torch-home"),
        })
        env.update({k: str(v) for k, v in overrides.items()})
        stack = BackendStack(f"http://127.0.0.1:{port}", port, env, model_dir, workdir)
        stacks.append(stack)
        stack.start_web()
        if worker:
            stack.start_worker()
        return stack

    yield start
    for stack in stacks:
        stack.stop()
        _drop_redis_keys(redis_url, stack.env["QUEUE_NAME"])
