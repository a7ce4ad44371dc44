"""The backend class, in LabelStudioMLBase's shapes, and the per-process runtime it uses.

``S4ALBackend(project_id=None, label_config=None)`` is cheap to build (one per request,
as label-studio-ml 2.x does); everything heavy lives in a ``Runtime`` shared by the whole
process: settings, the image fetcher, loaded models (one per store, reloaded when the
store's ``current`` version changes) and counters for /metrics.

Model versions as Label Studio sees them (/setup and /predict return the same string for
the same project and label config, so Label Studio asks for predictions exactly once per
new model):
- ``untrained``: no model yet for the project (nor a shared one); empty results.
- ``<version>``: e.g. ``v0003-20260101-120000``.
- ``<version> (classes do not match the label config)``: the model knows none of the
  config's labels; empty results rather than labels applied to the wrong classes.
When only some classes match, the matching ones are predicted (by name, whatever their
order) and the rest are logged.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import store as store_module
from .images import ImageError, ImageFetcher, decode_image
from .labels import ClassMapping, LabelConfigError, LabelMap, mask_to_results
from .lru import BoundedLRU
from .prediction import NetworkInput, batches, fit_pixels, scale_to
from .settings import Settings, redact_url

__all__ = [
    "EVENTS",
    "UNTRAINED_VERSION",
    "BadRequest",
    "LoadedModel",
    "VersionInfo",
    "ModelUnavailable",
    "Runtime",
    "S4ALBackend",
    "default_runtime",
]

logger = logging.getLogger(__name__)

UNTRAINED_VERSION = "untrained"
MISMATCH_NOTE = "classes do not match the label config"
EVENTS = (
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
    "START_TRAINING",
    "PROJECT_UPDATED",
)
MAX_CACHED_MODELS = 8
MAX_REMEMBERED_CONFIGS = 1000  # project ids whose label config /setup or /predict sent
MAX_REMEMBERED_CONFIG_BYTES = 32 * 1024 * 1024


def _label_studio_ml_base():
    """label-studio-ml 2.x's LabelStudioMLBase when installed, so its ``init_app`` can
    serve this class; ``object`` otherwise (1.x has another constructor)."""
    try:
        from label_studio_ml.model import LabelStudioMLBase
    except Exception:
        return object
    if not hasattr(LabelStudioMLBase, "set_extra_params"):
        return object
    return LabelStudioMLBase


_Base = _label_studio_ml_base()


class BadRequest(ValueError):
    """The caller's fault: answered with a 4xx and this message."""

    status = 400


class ModelUnavailable(RuntimeError):
    """The current model version exists but cannot be loaded (503)."""

    status = 503


@dataclass(frozen=True)
class VersionInfo:
    """A project's current version as the store describes it, without loading it."""

    version: str
    root: Path
    classes: tuple[str, ...]
    meta: dict


@dataclass
class LoadedModel:
    version: str
    root: Path
    model: Any
    classes: tuple[str, ...]
    meta: dict
    device: str
    loaded_at: float = field(default_factory=time.time)


class _Stats:
    """Counters for /metrics, thread-safe."""

    KEYS = ("requests", "tasks", "task_errors", "download_s", "decode_s", "forward_s",
            "postprocess_s", "wall_s", "model_loads")

    def __init__(self):
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.KEYS, 0)
        self.started = time.time()

    def add(self, **values):
        with self._lock:
            for key, value in values.items():
                self._values[key] += value

    def snapshot(self) -> dict:
        with self._lock:
            out = {k: (round(v, 4) if isinstance(v, float) else v)
                   for k, v in self._values.items()}
        out["uptime_s"] = round(time.time() - self.started, 1)
        return out


def config_digest(config: str) -> str:
    """A label config's fingerprint: caches and warnings key on it, never on the XML
    itself (configs can be megabytes)."""
    return hashlib.sha256(config.encode("utf-8", "surrogatepass")).hexdigest()


class Runtime:
    """Process-wide state: settings, image fetching, loaded models, label configs."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.fetcher = ImageFetcher(settings)
        self.stats = _Stats()
        self._device: str | None = None
        self._models: OrderedDict[Path, LoadedModel] = OrderedDict()
        self._load_lock = threading.Lock()
        self.forward_lock = threading.Lock()  # one forward at a time: no thread thrash
        self._configs = BoundedLRU(MAX_REMEMBERED_CONFIGS, MAX_REMEMBERED_CONFIG_BYTES, len)
        self._label_maps = BoundedLRU(64)
        self._setup_token: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="s4al-fetch")
        self._warned = BoundedLRU(4096)
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = self.settings.resolve_device()
        return self._device

    # ------------------------------------------------------------ label configs
    def label_map(self, config: str) -> LabelMap:
        key = config_digest(config)
        label_map = self._label_maps.get(key)
        if label_map is None:
            label_map = LabelMap.from_config(config)
            self._label_maps.put(key, label_map)
        return label_map

    def remember_config(self, project: str | None, config: str) -> None:
        """The project's label config for later /predict calls without one (bounded:
        the least recently used projects are forgotten first; they send it again)."""
        if project is not None:
            self._configs.put(project, config)

    def config_for(self, project: str | None) -> str | None:
        return self._configs.get(project) if project is not None else None

    def known_projects(self) -> list[str]:
        """Projects Label Studio set up or asked predictions for in this process."""
        return [project for project in self._configs.keys() if project]

    def remember_setup(self, hostname: Any, access_token: Any) -> None:
        """What /setup says about Label Studio. Its access token (the project owner's
        legacy token) is used only when LABEL_STUDIO_API_KEY is unset, sent only to
        LABEL_STUDIO_URL's origin, and never replaces a token Label Studio accepts; its
        hostname never widens the allowed hosts (and is logged escaped)."""
        if access_token:
            outcome = self.fetcher.auth.offer_setup_token(access_token)
            if outcome in ("malformed", "kept"):
                self.warn_once(("setup-token", outcome),
                               "/setup sent a %s access token: not used (%s)", outcome,
                               "not a Label Studio token" if outcome == "malformed" else
                               "the token in use still works; set LABEL_STUDIO_API_KEY "
                               "to choose one")
        if hostname and isinstance(hostname, str):
            given = hostname.rstrip("/").lower()[:200]
            if given != self.settings.label_studio_url.lower():
                self.warn_once(
                    ("host", given),
                    "Label Studio calls itself %r but LABEL_STUDIO_URL is %s: relative "
                    "image URLs are fetched from LABEL_STUDIO_URL", redact_url(given),
                    redact_url(self.settings.label_studio_url),
                )

    # ------------------------------------------------------------ models
    def warm_up(self) -> None:
        """Import torch and the model code ahead of the first request (seconds of CPU)
        so that the first /setup after a training stays inside Label Studio's 3 s."""
        try:
            import model.checkpoint  # noqa: F401
            import model.inference  # noqa: F401
        except Exception:  # the first request will report it
            logger.exception("warm-up import failed")

    def current_info(self, project: str | None) -> VersionInfo | None:
        """The project's current version and classes from the store's side files (no
        torch, no checkpoint read: /setup must answer within 3 s); falls back to loading
        the model when a version has no side file."""
        found = store_module.resolve_current(
            self.settings.model_dir, project, self.settings.keep_versions
        )
        if found is None:
            return None
        store, version = found
        meta = store.meta(version)
        if meta is None:
            loaded = self.model_for(project)
            if loaded is None:
                return None
            return VersionInfo(loaded.version, loaded.root, loaded.classes,
                               {k: v for k, v in loaded.meta.items() if k != "train_state"})
        return VersionInfo(version, store.root, tuple(meta["classes"]), meta)

    def model_for(self, project: str | None) -> LoadedModel | None:
        """The project's current model, loaded once and reloaded when the store's
        ``current`` version changes (another process may have trained it)."""
        found = store_module.resolve_current(
            self.settings.model_dir, project, self.settings.keep_versions
        )
        if found is None:
            return None
        store, version = found
        root = store.root
        loaded = self._models.get(root)
        if loaded is not None and loaded.version == version:
            return loaded
        with self._load_lock:
            loaded = self._models.get(root)
            if loaded is not None and loaded.version == version:
                return loaded
            started = time.perf_counter()
            try:
                model, meta = store.load(version, self.device)
            except Exception as exc:
                logger.error("cannot load model %s from %s: %s", version, root, exc)
                if loaded is not None:
                    logger.error("still serving %s", loaded.version)
                    return loaded
                raise ModelUnavailable(f"model version {version} cannot be loaded: {exc}") from exc
            classes = tuple(meta.get("classes") or ())
            fresh = LoadedModel(version, root, model, classes, meta, self.device)
            self._models[root] = fresh
            self._models.move_to_end(root)
            while len(self._models) > MAX_CACHED_MODELS:
                self._models.popitem(last=False)
            self.stats.add(model_loads=1)
            logger.info("loaded model %s from %s (%d classes, %.2f s, %s)", version, root,
                        len(classes), time.perf_counter() - started, self.device)
            return fresh

    def loaded_versions(self) -> dict[str, str]:
        return {str(root): m.version for root, m in list(self._models.items())}

    def warn_once(self, key: tuple, message: str, *args) -> None:
        if self._warned.add(key):
            logger.warning(message, *args)

    def submit(self, fn, *args):
        return self._pool.submit(fn, *args)


_default_runtime: Runtime | None = None
_default_lock = threading.Lock()


def default_runtime() -> Runtime:
    """The process's runtime from the environment (for servers that build the backend
    class themselves, like label-studio-ml's ``init_app``)."""
    global _default_runtime
    with _default_lock:
        if _default_runtime is None:
            _default_runtime = Runtime(Settings.from_env())
        return _default_runtime


def version_for(model: VersionInfo | LoadedModel | None, label_map: LabelMap | None) -> str:
    """The model version Label Studio sees for a model (or none) and a label config."""
    if model is None:
        return UNTRAINED_VERSION
    if label_map is not None and ClassMapping.between(model.classes, label_map).overlap == 0:
        return f"{model.version} ({MISMATCH_NOTE})"
    return model.version


class S4ALBackend(_Base):
    """Label Studio ML backend for semantic segmentation with brush labels."""

    TRAIN_EVENTS = EVENTS

    def __init__(self, project_id: Any = None, label_config: str | None = None, *,
                 runtime: Runtime | None = None, **kwargs):
        self.runtime = runtime or default_runtime()
        try:
            self.project = store_module.project_key(project_id)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        config = label_config or self.runtime.config_for(self.project)
        self.label_config_xml = config
        self._version: str | None = None
        if _Base is not object:  # label-studio-ml 2.x: parses the config, calls setup()
            try:
                super().__init__(project_id=self.project, label_config=config)
            except (BadRequest, ModelUnavailable):
                raise
            except Exception as exc:  # the SDK's XML errors
                raise BadRequest(f"the label config does not parse: {exc}") from None

    # ------------------------------------------------------------ LabelStudioMLBase
    def setup(self) -> None:
        """Resolve the model version for this project and label config."""
        label_map = self.get_label_map() if self.label_config_xml else None
        self._version = version_for(self.runtime.current_info(self.project), label_map)
        if _Base is not object:
            self.set("model_version", self._version)

    @property
    def model_version(self) -> str:
        if self._version is None:
            self.setup()
        return self._version

    def get_label_map(self) -> LabelMap:
        if not self.label_config_xml:
            raise BadRequest("no label config: send label_config (or /setup's schema) first")
        try:
            return self.runtime.label_map(self.label_config_xml)
        except LabelConfigError as exc:
            raise BadRequest(str(exc)) from None

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        """One ``{"result", "score", "model_version"}`` per task, in order. A task whose
        image cannot be had gets an empty result, an ``error`` and a log line."""
        started = time.perf_counter()
        tasks = _check_tasks(tasks)
        label_map = self.get_label_map()
        stats = self.runtime.stats
        stats.add(requests=1, tasks=len(tasks))
        info = self.runtime.current_info(self.project)
        version = version_for(info, label_map)
        loaded = None
        if info is not None and version == info.version:  # a model that serves this config
            loaded = self.runtime.model_for(self.project)
            # answer with the version actually loaded (a newer one may have just arrived)
            version = version_for(loaded, label_map)
        self._version = version
        if loaded is None or version != loaded.version:
            if info is not None and version.endswith(f"({MISMATCH_NOTE})"):
                self.runtime.warn_once(
                    ("mismatch", info.version, config_digest(self.label_config_xml)),
                    "model %s knows classes %s, the label config has %s: no predictions",
                    info.version, list(info.classes), list(label_map.classes),
                )
            stats.add(wall_s=time.perf_counter() - started)
            return [_empty(version) for _ in tasks]

        mapping = ClassMapping.between(loaded.classes, label_map)
        if mapping.missing or mapping.extra:
            self.runtime.warn_once(
                ("partial", loaded.version, config_digest(self.label_config_xml)),
                "model %s vs label config: config classes it cannot predict %s; model "
                "classes the config lacks (left unlabelled) %s",
                loaded.version, list(mapping.missing), list(mapping.extra),
            )
        lookup = None if mapping.identity else mapping.lookup()
        outputs: list[dict | None] = [None] * len(tasks)
        errors: dict[int, str] = {}
        timing = dict.fromkeys(("download_s", "decode_s", "forward_s", "postprocess_s"), 0.0)
        settings = self.runtime.settings
        inputs = self._images(tasks, label_map, errors, timing)
        # the network runs under the forward lock one batch at a time; downloads and
        # post-processing happen outside it, so a slow image never holds up other requests
        for batch in batches(inputs, settings.predict_batch_size, settings.max_predict_pixels):
            for item, probs in zip(batch, self._forward(loaded, batch, errors, timing),
                                   strict=True):
                if probs is None:
                    continue
                t0 = time.perf_counter()
                try:
                    outputs[item.index] = self._to_prediction(probs, item.size, label_map,
                                                              lookup, version)
                except Exception as exc:  # a bug for one task must not lose the batch
                    logger.exception("task %s: post-processing failed",
                                     tasks[item.index].get("id"))
                    errors[item.index] = f"post-processing failed: {type(exc).__name__}"
                timing["postprocess_s"] += time.perf_counter() - t0
        for index, message in errors.items():
            outputs[index] = {**_empty(version), "error": message}
        stats.add(task_errors=len(errors), wall_s=time.perf_counter() - started, **timing)
        return [o if o is not None else _empty(version) for o in outputs]

    def _forward(self, loaded: LoadedModel, batch: list[NetworkInput], errors: dict,
                 timing: dict) -> list:
        """Probabilities per input (None where the network failed on it, with the error in
        ``errors``). A failed batch is retried image by image: one image fails alone."""
        from model.inference import predict_probabilities

        try:
            with self.runtime.forward_lock:
                t0 = time.perf_counter()
                out = list(predict_probabilities(
                    loaded.model, [item.image for item in batch], batch_size=len(batch),
                    device=loaded.device, amp=self.runtime.settings.amp,
                ))
                timing["forward_s"] += time.perf_counter() - t0
                return out
        except (RuntimeError, MemoryError) as exc:  # out of memory, mostly
            if len(batch) > 1:
                return [self._forward(loaded, [item], errors, timing)[0] for item in batch]
            item = batch[0]
            height, width = item.image.shape[:2]
            logger.error("task %s: the network failed on a %dx%d input: %s", item.task_id,
                         width, height, exc)
            errors[item.index] = (
                f"the model could not run on this image ({width}x{height} px at the network: "
                f"{type(exc).__name__}); lower MAX_PREDICT_PIXELS or PREDICT_BATCH_SIZE"
            )
            return [None]

    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """Webhook events: counted / queued by s4al_backend.jobs (RQ on Redis, or the
        in-process queue); the training itself runs in a worker. Redis down -> 503."""
        from . import jobs

        if not isinstance(event, str) or not event:
            raise BadRequest("the webhook body has no 'action'")
        if event not in EVENTS:
            return {"status": "ignored", "message": f"event {event} does not concern training"}
        body = dict(data) if isinstance(data, dict) else {}
        if self.project is not None and str(self.project).isdigit():
            body["project"] = int(self.project)
        try:
            return jobs.get_jobs(self.runtime.settings).on_event(event, body)
        except jobs.QueueUnavailable as exc:
            raise ModelUnavailable(f"training queue unavailable: {exc}") from exc

    def status(self, project: Any = None) -> dict:
        """Model state of a project for GET /status."""
        try:
            key = store_module.project_key(project) if project is not None else self.project
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        settings = self.runtime.settings
        own = store_module.project_store(settings.model_dir, key, settings.keep_versions) \
            if key else None
        info = self.runtime.current_info(key)
        return {
            "project": key,
            "model_version": info.version if info else UNTRAINED_VERSION,
            "model_source": ("project" if own is not None and info is not None
                             and info.root == own.root else "shared" if info else None),
            "versions": own.versions() if own is not None else [],
            "classes": list(info.classes) if info else [],
            "metrics": (info.meta.get("metrics") if info else None),
            "labelled_fraction": (info.meta.get("labelled_fraction") if info else None),
            "created": (info.meta.get("created") if info else None),
            "training": self._training_status(key),
        }

    def _training_status(self, key: str | None) -> dict | None:
        """The project's queue, running job (with progress) and last cycle, from jobs."""
        from . import jobs

        if key is None or not str(key).isdigit():
            return None
        try:
            return jobs.project_status(self.runtime.settings, int(key))
        except jobs.QueueUnavailable as exc:
            return {"error": str(exc)}

    # ------------------------------------------------------------ internals
    def _load_image(self, task: dict, label_map: LabelMap):
        """The task image, decoded and scaled to MAX_PREDICT_PIXELS (in a pool thread)."""
        url = label_map.image_url(task)
        t0 = time.perf_counter()
        data = self.runtime.fetcher.fetch_bytes(url, task.get("id"))
        t1 = time.perf_counter()
        settings = self.runtime.settings
        image = decode_image(data, settings.max_image_pixels)
        scaled = fit_pixels(image, settings.max_predict_pixels)
        return scaled, image.shape[:2], t1 - t0, time.perf_counter() - t1

    def _images(self, tasks, label_map, errors, timing) -> Iterator[NetworkInput]:
        """Task images in order, fetched and decoded a few ahead in threads; failures go to
        ``errors`` (logged with the task id) and are skipped."""
        window = max(2, 2 * self.runtime.settings.predict_batch_size)
        pending: deque = deque()
        upcoming = iter(range(len(tasks)))

        def submit_next() -> None:
            for index in upcoming:
                pending.append((index, self.runtime.submit(self._load_image, tasks[index],
                                                           label_map)))
                return

        for _ in range(window):
            submit_next()
        while pending:
            index, future = pending.popleft()
            submit_next()
            try:
                image, size, download, decode = future.result()
            except (ImageError, KeyError) as exc:
                message = str(exc).strip("'\"")
                logger.error("task %s: %s", tasks[index].get("id"), message)
                errors[index] = message
                continue
            except Exception as exc:
                logger.exception("task %s: image failed", tasks[index].get("id"))
                errors[index] = f"image failed: {type(exc).__name__}"
                continue
            timing["download_s"] += download
            timing["decode_s"] += decode
            yield NetworkInput(index, tasks[index].get("id"), image, size)

    @staticmethod
    def _to_prediction(probs, size: tuple[int, int], label_map: LabelMap, lookup,
                       version: str) -> dict:
        confidence, classes = probs.max(dim=0)
        confidence = confidence.numpy()
        classes = classes.numpy()
        if lookup is not None:
            classes = lookup[classes]
        # the network may have seen the image scaled down: the masks are at its own size
        return {
            "result": mask_to_results(scale_to(classes, size), label_map,
                                      scale_to(confidence, size)),
            "score": round(float(confidence.mean()), 4),
            "model_version": version,
        }


def _empty(version: str) -> dict:
    return {"result": [], "score": None, "model_version": version}


def _check_tasks(tasks) -> list[dict]:
    if not isinstance(tasks, list):
        raise BadRequest("'tasks' must be a list of Label Studio tasks")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise BadRequest(f"tasks[{i}] is not a task with a 'data' object")
    return tasks
