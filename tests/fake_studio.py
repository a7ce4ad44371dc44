"""A small, real HTTP server that plays the part of Label Studio 1.23 for tests.

It serves the endpoints label-studio-sdk 2.1.2 calls for what `s4al_backend.studio` does,
with the response shapes of Label Studio's own views (read from label-studio 1.23.2):

- `GET  /api/projects/<id>/`                      project (label_config, model_version, ...)
- `PATCH /api/projects/<id>/`                     update fields (model_version)
- `GET  /api/tasks/?project=&page=&page_size=&fields=all&include=`
      `{"tasks": [...], "total", "total_annotations", "total_predictions"}`; a page past
      the end is a 404 `{"detail": "Invalid page."}` (Django REST framework's paginator),
      which the SDK's pager treats as the end. Annotations and predictions only with
      `fields=all` (then also `predictions_model_versions`, comma-separated as SQLite's
      GROUP_CONCAT gives it); `include=a,b` keeps only those fields (drf-flex-fields),
      of the tasks and of their annotations alike, as Label Studio 1.23 does.
- `GET  /api/projects/<id>/model-versions/`       `{version: count}`
- `DELETE /api/projects/<id>/model-versions/`     `{"model_version"}` ->
      `{"deleted_predictions": n}`
- `GET  /api/tasks/<id>/`                         one task with annotations and predictions
- `POST /api/projects/<id>/import?return_task_ids=true`   a JSON list of tasks, each
      `{"data": ..., "predictions": [...]}`; 201 with the Community edition's counts
- `POST /api/projects/<id>/import/predictions`    `[{"task", "result", "score",
      "model_version"}]` -> 201 `{"created": n}`
- `POST /api/predictions/`                        one prediction -> 201
- `GET  /data/upload/<project>/<file>`            the task images (auth required)

Authentication is Label Studio's legacy token: `Authorization: Token <key>`, else 401.
Failures can be injected per path prefix (`fail(...)`) to play an unreachable or refusing
server. Every request is recorded in `requests` for assertions, with the bytes of its body
(`sent`: what the client wrote) and of the reply (`received`: what the client read).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, request
from werkzeug.serving import WSGIRequestHandler, make_server


class _QuietHandler(WSGIRequestHandler):
    def log(self, *args, **kwargs) -> None:  # keep test output readable
        pass


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Failure:
    method: str | None
    prefix: str
    status: int
    remaining: int | None  # None = until cleared
    body: Any = None
    after: bool = False  # answer the failure after doing the work (a lost reply)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict
    json: Any
    status: int = 0
    sent: int = 0
    received: int = 0


@dataclass
class FakeStudio:
    """In-memory Label Studio. Use as a context manager or call start()/stop()."""

    api_key: str = "0123456789abcdef0123456789abcdef01234567"
    page_size_max: int = 100
    projects: dict[int, dict] = field(default_factory=dict)
    tasks: dict[int, dict] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids = {k: itertools.count(1) for k in ("project", "task", "annotation", "prediction")}
        self._lock = threading.RLock()
        self._failures: list[_Failure] = []
        self._server = None
        self._thread: threading.Thread | None = None
        self.app = self._make_app()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeStudio:
        self._server = make_server(
            "127.0.0.1", 0, self.app, threaded=True, request_handler=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeStudio:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_port}"

    # ------------------------------------------------------------------ fixtures
    def add_project(self, label_config: str, title: str = "project") -> int:
        with self._lock:
            pid = next(self._ids["project"])
            self.projects[pid] = {
                "id": pid,
                "title": title,
                "label_config": label_config,
                "model_version": "",
                "created_at": _now(),
                "show_collab_predictions": True,
                "task_number": 0,
            }
            return pid

    def add_file(self, project: int, name: str, content: bytes) -> str:
        """Store an upload; returns the relative URL Label Studio puts in task data."""
        url = f"/data/upload/{project}/{name}"
        self.files[url] = content
        return url

    def add_task(self, project: int, data: dict, annotations: Iterable[list] = ()) -> int:
        with self._lock:
            tid = next(self._ids["task"])
            self.tasks[tid] = {
                "id": tid,
                "project": project,
                "data": dict(data),
                "meta": {},
                "created_at": _now(),
                "updated_at": _now(),
                "is_labeled": False,
                "overlap": 1,
                "inner_id": tid,
                "annotations": [],
                "predictions": [],
                "total_annotations": 0,
                "cancelled_annotations": 0,
                "total_predictions": 0,
                "file_upload": None,
                "storage_filename": None,
            }
            for result in annotations:
                self.add_annotation(tid, result)
            return tid

    def add_annotation(self, task_id: int, result: list, was_cancelled: bool = False) -> int:
        with self._lock:
            task = self.tasks[task_id]
            aid = next(self._ids["annotation"])
            task["annotations"].append(
                {
                    "id": aid,
                    "task": task_id,
                    "project": task["project"],
                    "result": result,
                    "was_cancelled": was_cancelled,
                    "ground_truth": False,
                    "completed_by": 1,
                    "created_at": _now(),
                    "updated_at": _now(),
                    "lead_time": 1.0,
                    "result_count": len(result),
                }
            )
            self._recount(task)
            return aid

    def _recount(self, task: dict) -> None:
        live = [a for a in task["annotations"] if not a["was_cancelled"]]
        task["total_annotations"] = len(live)
        task["cancelled_annotations"] = len(task["annotations"]) - len(live)
        task["total_predictions"] = len(task["predictions"])
        task["is_labeled"] = len(live) > 0

    def add_prediction(self, task_id: int, item: dict) -> dict:
        task = self.tasks[task_id]
        pred = {
            "id": next(self._ids["prediction"]),
            "task": task_id,
            "project": task["project"],
            "result": item.get("result") or [],
            "score": item.get("score"),
            "model_version": item.get("model_version", "undefined"),
            "created_at": _now(),
            "updated_at": _now(),
        }
        task["predictions"].append(pred)
        self._recount(task)
        return pred

    def project_tasks(self, project: int) -> list[dict]:
        with self._lock:
            return [t for t in self.tasks.values() if t["project"] == project]

    # ------------------------------------------------------------------ faults
    def fail(
        self,
        status: int,
        prefix: str = "/",
        method: str | None = None,
        times: int | None = None,
        body: Any = None,
        after: bool = False,
    ) -> None:
        """Answer `status` to the requests whose path starts with `prefix` (or equals it,
        without the `$`, when it ends with `$`) and, if given, have `method`; `times`
        times or until `clear_failures()`. With `after`, the request is carried out
        first and only its reply is replaced (a reply lost after the work)."""
        with self._lock:
            self._failures.append(_Failure(method, prefix, status, times, body, after))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def _injected(self, after: bool = False) -> Response | None:
        with self._lock:
            for f in self._failures:
                if f.after != after:
                    continue
                if f.prefix.endswith("$"):
                    matched = request.path == f.prefix[:-1]
                else:
                    matched = request.path.startswith(f.prefix)
                if matched and f.method in (None, request.method):
                    if f.remaining is not None:
                        f.remaining -= 1
                        if f.remaining <= 0:
                            self._failures.remove(f)
                    body = f.body if f.body is not None else {"detail": f"injected {f.status}"}
                    return Response(json.dumps(body), f.status, mimetype="application/json")
        return None

    # ------------------------------------------------------------------ app
    def _make_app(self) -> Flask:
        app = Flask("fake_studio")
        studio = self

        @app.before_request
        def _before():
            try:
                payload = request.get_json(silent=True)
            except Exception:  # pragma: no cover
                payload = None
            studio.requests.append(
                RecordedRequest(request.method, request.path, request.args.to_dict(), payload,
                                sent=len(request.get_data()))
            )
            injected = studio._injected()
            if injected is not None:
                return injected
            if request.headers.get("Authorization") != f"Token {studio.api_key}":
                return jsonify(detail="Authentication credentials were not provided."), 401
            return None

        @app.after_request
        def _after(response):
            if 200 <= response.status_code < 300:
                injected = studio._injected(after=True)
                if injected is not None:
                    response = injected
            if studio.requests:
                studio.requests[-1].status = response.status_code
                if not response.direct_passthrough:
                    studio.requests[-1].received = len(response.get_data())
            return response

        def project_or_404(pid: int) -> dict:
            project = studio.projects.get(pid)
            if project is None:
                body = json.dumps({"detail": "Not found."})
                abort(Response(body, 404, mimetype="application/json"))
            return project

        @app.get("/api/projects/<int:pid>/")
        def get_project(pid):
            with studio._lock:
                project = dict(project_or_404(pid))
                project["task_number"] = len(studio.project_tasks(pid))
                return jsonify(project)

        @app.patch("/api/projects/<int:pid>/")
        def patch_project(pid):
            with studio._lock:
                project = project_or_404(pid)
                body = request.get_json(force=True) or {}
                for key in ("model_version", "title", "label_config"):
                    if key in body and body[key] is not None:
                        project[key] = body[key]
                return jsonify(project)

        @app.get("/api/tasks/")
        def list_tasks():
            args = request.args
            pid = args.get("project", type=int)
            page = args.get("page", default=1, type=int)
            page_size = min(args.get("page_size", default=100, type=int), studio.page_size_max)
            full = args.get("fields") == "all"
            with studio._lock:
                tasks = sorted(
                    (t for t in studio.tasks.values() if pid is None or t["project"] == pid),
                    key=lambda t: t["id"],
                )
                pages = max(1, -(-len(tasks) // page_size))
                if page < 1 or page > pages:
                    return jsonify(detail="Invalid page."), 404
                chunk = tasks[(page - 1) * page_size : page * page_size]
                include = [f for f in args.get("include", "").split(",") if f]
                out = [_task_view(t, full, include) for t in chunk]
                return jsonify(
                    tasks=out,
                    total=len(tasks),
                    total_annotations=sum(t["total_annotations"] for t in tasks),
                    total_predictions=sum(t["total_predictions"] for t in tasks),
                )

        @app.get("/api/projects/<int:pid>/model-versions/")
        def model_versions(pid):
            with studio._lock:
                project_or_404(pid)
                counts: dict[str, int] = {}
                for task in studio.project_tasks(pid):
                    for pred in task["predictions"]:
                        counts[pred["model_version"]] = counts.get(pred["model_version"], 0) + 1
                return jsonify(counts)

        @app.delete("/api/projects/<int:pid>/model-versions/")
        def delete_model_version(pid):
            with studio._lock:
                project_or_404(pid)
                version = (request.get_json(silent=True) or {}).get("model_version")
                if not version:
                    return jsonify(["model_version param is required"]), 400
                count = 0
                for task in studio.project_tasks(pid):
                    kept = [p for p in task["predictions"] if p["model_version"] != version]
                    count += len(task["predictions"]) - len(kept)
                    task["predictions"] = kept
                    studio._recount(task)
                return jsonify(deleted_predictions=count)

        @app.get("/api/tasks/<int:tid>/")
        def get_task(tid):
            with studio._lock:
                task = studio.tasks.get(tid)
                if task is None:
                    return jsonify(detail="Not found."), 404
                return jsonify(task)

        @app.post("/api/projects/<int:pid>/import")
        def import_tasks(pid):
            with studio._lock:
                project = project_or_404(pid)
                body = request.get_json(force=True)
                items = body if isinstance(body, list) else [body]
                keys = _data_keys(project["label_config"])
                for i, item in enumerate(items):
                    data = item.get("data", item) if isinstance(item, dict) else None
                    if not isinstance(data, dict):
                        return jsonify(detail=f"Task {i}: data must be a dict"), 400
                    missing = [k for k in keys if k not in data]
                    if missing:
                        return (
                            jsonify(
                                validation_errors={
                                    "non_field_errors": [f"Task {i}: missing data keys {missing}"]
                                }
                            ),
                            400,
                        )
                errors = _prediction_errors(
                    project["label_config"],
                    [p for item in items for p in (item.get("predictions") or [])],
                )
                if errors:
                    return jsonify(predictions=[f"Prediction validation failed: {errors}"]), 400
                ids, n_pred = [], 0
                for item in items:
                    data = item.get("data", item)
                    tid = studio.add_task(pid, data)
                    for pred in item.get("predictions", []) or []:
                        studio.add_prediction(tid, pred)
                        n_pred += 1
                    ids.append(tid)
                response = {
                    "task_count": len(ids),
                    "annotation_count": 0,
                    "prediction_count": n_pred,
                    "duration": 0.001,
                    "file_upload_ids": [],
                    "could_be_tasks_list": False,
                    "found_formats": [],
                    "data_columns": [],
                }
                if request.args.get("return_task_ids") in ("true", "True", "1"):
                    response["task_ids"] = ids
                return jsonify(response), 201

        @app.post("/api/projects/<int:pid>/import/predictions")
        def import_predictions(pid):
            with studio._lock:
                project_or_404(pid)
                items = request.get_json(force=True)
                errors = _prediction_errors(project_or_404(pid)["label_config"], items)
                if errors:
                    return jsonify(predictions=[f"Prediction validation failed: {errors}"]), 400
                for item in items:
                    task = studio.tasks.get(item.get("task"))
                    if task is None or task["project"] != pid:
                        return (
                            jsonify(detail=f"task ID {item.get('task')} not found in project"),
                            400,
                        )
                for item in items:
                    studio.add_prediction(item["task"], item)
                return jsonify(created=len(items)), 201

        @app.post("/api/predictions/")
        def create_prediction():
            with studio._lock:
                item = request.get_json(force=True)
                if item.get("task") not in studio.tasks:
                    return jsonify(task=["Invalid pk - object does not exist."]), 400
                return jsonify(studio.add_prediction(item["task"], item)), 201

        @app.get("/data/upload/<int:pid>/<path:name>")
        def upload(pid, name):
            content = studio.files.get(f"/data/upload/{pid}/{name}")
            if content is None:
                return jsonify(detail="Not found."), 404
            mimetype = "image/png" if name.endswith(".png") else "application/octet-stream"
            return Response(content, 200, mimetype=mimetype)

        return app


def _task_view(task: dict, full: bool, include: list[str]) -> dict:
    """A task as the list shows it (see the module docstring)."""
    item = json.loads(json.dumps(task))
    if full:
        item["predictions_model_versions"] = ",".join(
            sorted({p["model_version"] for p in task["predictions"]}))
    else:
        item.pop("annotations")
        item.pop("predictions")
    if include:
        item = {k: v for k, v in item.items() if k in include}
        if "annotations" in item:
            item["annotations"] = [{k: v for k, v in a.items() if k in include}
                                   for a in item["annotations"]]
    return item


def _prediction_errors(label_config: str, predictions: list) -> list[str]:
    """What Label Studio 1.23 checks on import (label_studio_sdk's label interface)."""
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(label_config)
    errors: list[str] = []
    for i, prediction in enumerate(predictions):
        found = interface.validate_prediction(
            {k: prediction.get(k) for k in ("result", "score", "model_version")},
            return_errors=True,
        )
        errors.extend(f"prediction {i}: {e}" for e in found or [])
    return errors[:10]


def _data_keys(label_config: str) -> list[str]:
    """The `$variables` an import must carry (Label Studio checks them the same way)."""
    import re

    return sorted(set(re.findall(r'value="\$([A-Za-z_][A-Za-z0-9_]*)"', label_config)))


# --------------------------------------------------------------------------- CamVid fixture
def camvid_label_config(classes: Iterable[str], region: bool = True) -> str:
    """The recommended config: an image, one BrushLabels with the classes, and a plain
    Rectangle named `region` reserved for the acquisition regions."""
    labels = "\n".join(f'    <Label value="{name}"/>' for name in classes)
    rect = '  <Rectangle name="region" toName="image" readonly="true"/>\n' if region else ""
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        '  <BrushLabels name="tag" toName="image">\n'
        f"{labels}\n"
        "  </BrushLabels>\n"
        f"{rect}"
        "</View>\n"
    )


def camvid_project(
    studio: FakeStudio,
    root: Path,
    annotated: Iterable[str] = (),
    split: str = "train",
    region: bool = True,
) -> tuple[int, dict[str, int], list]:
    """A project with one task per image of `root/split` (the PNG bytes served as uploads),
    the images named in `annotated` carrying their ground truth as a brush annotation.
    Returns (project id, {image name: task id}, samples)."""
    from model.data import load_folder, read_classes
    from s4al_backend.labels import LabelMap, mask_to_results

    classes = read_classes(root)
    config = camvid_label_config(classes, region)
    label_map = LabelMap.from_config(config)
    pid = studio.add_project(config, title=f"camvid {split}")
    samples = load_folder(root, split)
    annotated = set(annotated)
    ids = {}
    for sample in samples:
        url = studio.add_file(pid, sample.name, (Path(root) / split / sample.name).read_bytes())
        results = [mask_to_results(sample.mask, label_map)] if sample.name in annotated else []
        ids[sample.name] = studio.add_task(pid, {"image": url}, annotations=results)
    return pid, ids, samples
