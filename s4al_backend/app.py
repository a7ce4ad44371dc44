"""The Flask app: Label Studio's ML-backend protocol (the 2.x one) over ``S4ALBackend``.

Routes: ``GET /`` and ``GET /health`` -> ``{"status": "UP", "model_class": ...}`` (a
browser asking ``/`` for HTML is sent to the dashboard, ``dashboard.py``);
``POST /setup`` -> ``{"model_version"}``; ``POST /predict`` -> ``{"results": [...]}`` (one
item per task, in order); ``POST /webhook`` -> ``backend.fit(event, data)``;
``GET /metrics``; ``GET /status?project=<id>`` -> ``backend.status(project)``.

Errors are JSON ``{"error": message, "status": code}``: 4xx for the caller's faults
(malformed JSON, missing fields, a label config without an image + brush control), 503
when a model cannot be loaded, 500 (logged with its traceback, message withheld) for
bugs. With BASIC_AUTH_USER/PASS every route asks for them except ``/health`` (container
health checks) and ``/webhook`` (Label Studio posts its webhooks without credentials; they
only ever enqueue work, and the work rereads Label Studio).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable

from flask import Flask, Response, g, jsonify, redirect, request, url_for
from werkzeug.datastructures import Authorization
from werkzeug.exceptions import HTTPException

from .backend import BadRequest, ModelUnavailable, Runtime, S4ALBackend
from .dashboard import create_blueprint
from .settings import Settings

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024 * 1024
NO_AUTH_PATHS = ("/health", "/webhook")

Backend = Callable[..., S4ALBackend]  # backend(project=None, label_config=None)


def create_app(settings: Settings | None = None, backend_class=S4ALBackend) -> Flask:
    """The app for `settings` (default: the environment); each request gets a
    `backend_class(project_id=, label_config=, runtime=)` over the app's one Runtime."""
    settings = settings or Settings.from_env()
    for name in ("s4al_backend", "model"):
        logging.getLogger(name).setLevel(settings.log_level)
    runtime = Runtime(settings)
    threading.Thread(target=runtime.warm_up, name="s4al-warm-up", daemon=True).start()
    app = Flask("s4al_backend")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False
    app.extensions["s4al"] = runtime
    app.register_blueprint(create_blueprint(runtime))

    def backend(project=None, label_config=None):
        return backend_class(project_id=project, label_config=label_config, runtime=runtime)

    _add_auth_and_logging(app, settings)
    _add_error_handlers(app)
    _add_health_routes(app, runtime, backend_class.__name__)
    _add_setup_route(app, runtime, backend)
    _add_predict_route(app, runtime, backend)
    _add_training_routes(app, backend)
    return app


def _body() -> dict:
    """The request's JSON object, else BadRequest."""
    try:
        data = request.get_json(silent=True, force=True)  # any content type
    except RecursionError:  # json's parser recurses once per level
        raise BadRequest("the JSON body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": message, "status": status})
    response.status_code = status
    return response


# ------------------------------------------------------------ auth and logging
def _add_auth_and_logging(app: Flask, settings: Settings) -> None:
    @app.before_request
    def check_auth():
        g.started = time.perf_counter()
        expected = settings.basic_auth
        if expected is None or request.path in NO_AUTH_PATHS:
            return None
        if not _credentials_match(request.authorization, expected):
            response = _error(401, "authentication required")
            response.headers["WWW-Authenticate"] = 'Basic realm="s4al-backend"'
            return response
        return None

    @app.after_request
    def log_request(response: Response):
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        quiet = request.path in ("/health", "/") or request.path.startswith("/dashboard")
        level = logging.DEBUG if quiet and response.status_code < 400 else logging.INFO
        logger.log(level, "%s %s -> %d (%.3f s)", request.method, request.path,
                   response.status_code, elapsed)
        return response


def _credentials_match(auth: Authorization | None, expected: tuple[str, str]) -> bool:
    """Basic-auth user and password against BASIC_AUTH_USER/PASS, in constant time (both
    compared always, so the timing tells nothing about which one is wrong)."""
    user = (auth.username or "") if auth and auth.type == "basic" else ""
    password = (auth.password or "") if auth and auth.type == "basic" else ""
    ok_user = hmac.compare_digest(user.encode(), expected[0].encode())
    ok_pass = hmac.compare_digest(password.encode(), expected[1].encode())
    return ok_user and ok_pass


# ------------------------------------------------------------ errors
def _add_error_handlers(app: Flask) -> None:
    @app.errorhandler(BadRequest)
    def bad_request(exc: BadRequest):
        logger.warning("%s %s: %s", request.method, request.path, exc)
        return _error(exc.status, str(exc))

    @app.errorhandler(ModelUnavailable)
    def model_unavailable(exc: ModelUnavailable):
        return _error(503, str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        logger.exception("%s %s failed", request.method, request.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the backend's log")


# ------------------------------------------------------------ routes
def _add_health_routes(app: Flask, runtime: Runtime, model_class: str) -> None:
    @app.get("/")
    @app.get("/health")
    def health():
        if request.path == "/" and _wants_html():  # a person's browser: the dashboard
            return redirect(url_for("dashboard.dashboard"))
        return jsonify({"status": "UP", "model_class": model_class})

    @app.get("/metrics")
    def metrics():
        return jsonify({
            "predict": runtime.stats.snapshot(),
            "models": runtime.loaded_versions(),
            "device": runtime.device,
        })


def _add_setup_route(app: Flask, runtime: Runtime, backend: Backend) -> None:
    @app.post("/setup")
    def setup():
        data = _body()
        schema = data.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            raise BadRequest("/setup needs 'schema': the project's label config")
        model = backend(data.get("project"), schema)
        model.get_label_map()  # 400 naming what the config lacks
        runtime.remember_config(model.project, schema)
        runtime.remember_setup(data.get("hostname"), data.get("access_token"))
        return jsonify({"model_version": model.model_version})


def _add_predict_route(app: Flask, runtime: Runtime, backend: Backend) -> None:
    settings = runtime.settings
    # a /predict beyond PREDICT_CONCURRENCY is turned away at once rather than queued:
    # waiting requests would hold the server's threads, and /health (1 s in Label
    # Studio), /setup (3 s) and /webhook (1 s) would wait behind them
    predict_slots = threading.BoundedSemaphore(settings.predict_concurrency)

    @app.post("/predict")
    def predict():
        if not predict_slots.acquire(blocking=False):
            logger.warning("/predict turned away: %d already in flight (PREDICT_CONCURRENCY)",
                           settings.predict_concurrency)
            response = _error(503, f"busy: {settings.predict_concurrency} /predict requests "
                              "already in flight (PREDICT_CONCURRENCY); retry shortly")
            response.headers["Retry-After"] = "2"
            return response
        try:
            return _answer_predict(runtime, backend)
        finally:
            predict_slots.release()


def _answer_predict(runtime: Runtime, backend: Backend) -> Response:
    data = _body()
    if "tasks" not in data:
        raise BadRequest("/predict needs 'tasks'")
    config = data.get("label_config")
    if config is not None and not isinstance(config, str):
        raise BadRequest("'label_config' must be the label config XML")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("'params' must be an object")
    context = params.get("context")
    model = backend(data.get("project"), config)
    if config:
        runtime.remember_config(model.project, config)
    results = model.predict(data["tasks"], context=context)
    return jsonify({"results": results, "model_version": model.model_version})


def _add_training_routes(app: Flask, backend: Backend) -> None:
    @app.post("/webhook")
    def webhook():
        data = _body()
        event = data.get("action")
        if not isinstance(event, str) or not event:
            raise BadRequest("the webhook body has no 'action'")
        project = data.get("project")
        config = project.get("label_config") if isinstance(project, dict) else None
        model = backend(project, config if isinstance(config, str) else None)
        result = model.fit(event, data)
        return jsonify(result)

    @app.get("/status")
    def status():
        project = request.args.get("project")
        return jsonify(backend(project).status(project))


def _wants_html() -> bool:
    """True when the client prefers HTML (a browser) over JSON (health checks, scripts)."""
    accept = request.accept_mimetypes
    return accept.accept_html and accept["text/html"] > accept["application/json"]
