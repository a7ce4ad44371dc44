"""Label Studio through label-studio-sdk 2.x: the few calls an active-learning cycle needs.

- `Studio.project(id)`: the project (label config, model version).
- `Studio.iter_tasks(id)`: every task with its annotations and the model versions of its
  predictions, not the predictions themselves, paged (`GET /api/tasks/?project=&fields=all
  &include=<CYCLE_FIELDS>&page=`; a page past the end is Label Studio's 404, which the
  SDK's pager takes as the end). `fields=all` is what makes Label Studio 1.23 serialize
  annotations at all; `include` is its sparse-fields parameter (drf-flex-fields under
  another name), so the old versions' prediction results, ~70-140 KB a task each, never
  leave the server. The annotations' serializer reads the same `include` (it is built
  without a parent), so it names the annotation fields a cycle reads too.
  `predictions_model_versions` is the Data Manager's column: the distinct versions,
  comma-separated, cut at 500 characters (`task_model_versions`). Checked against the
  real server in tests/e2e/test_light_read.py.
- `Studio.model_versions(id)` / `Studio.delete_model_version(id, version)`: the project's
  prediction versions with their counts, and every prediction of one version deleted in
  one request (`GET` / `DELETE /api/projects/<id>/model-versions/`).
- `Studio.import_tasks(id, tasks)`: new tasks with their predictions in one request
  (`POST /api/projects/<id>/import?return_task_ids=true`), never retried inside the call:
  a retry after a lost reply could create the tasks twice, so retries belong to the caller,
  which first rereads the project (region ids make that idempotent, see `cycle.py`).
- `Studio.import_predictions(id, items)`: bulk predictions
  (`POST /api/projects/<id>/import/predictions`), chunked.

Every failure becomes a `StudioError` whose message says what was asked, the status and
Label Studio's own reply: "Label Studio refused GET api/tasks/ (401): {'detail': ...}" or
"Label Studio unreachable at http://...: ConnectError ...". The job layer logs it, marks
the job failed with it and retries with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from .settings import redact_url

log = logging.getLogger(__name__)

NO_RETRY = {"max_retries": 0}
# what a cycle reads of each task and of its annotations (see the module docstring)
CYCLE_FIELDS = ("id,data,annotations,predictions_model_versions,"
                "result,was_cancelled,ground_truth,updated_at")
TASK_FIELDS = "id,data,is_labeled,total_annotations"  # full=False: region ids, the board
VERSIONS_CUT = 500  # Label Studio's CHAR_LIMITS on the versions column


class StudioError(RuntimeError):
    """Label Studio could not be reached or refused a request."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _plain(value: Any) -> Any:
    """SDK pydantic models -> plain JSON-like Python values."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Studio:
    """A thin, typed-at-the-edges wrapper over `label_studio_sdk.LabelStudio`.

    `api_key` is a legacy token or a personal access token (the SDK exchanges a PAT's
    refresh token for an access token itself)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        page_size: int = 100,
    ):
        if not url:
            raise StudioError("LABEL_STUDIO_URL is not set: the cycle cannot read Label Studio")
        if not api_key:
            raise StudioError(
                "LABEL_STUDIO_API_KEY is not set: the cycle cannot read Label Studio"
            )
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.page_size = page_size
        try:
            self.client = LabelStudio(
                base_url=self.url, api_key=api_key, timeout=timeout, max_retries=max_retries
            )
        except ApiError as exc:  # an expired personal access token is refused up front
            raise self._error("use the API key", exc) from exc

    @classmethod
    def from_settings(cls, settings: Any) -> Studio:
        return cls(settings.label_studio_url, settings.label_studio_api_key)

    # ------------------------------------------------------------------ errors
    def _error(self, what: str, exc: BaseException) -> StudioError:
        if isinstance(exc, ApiError):
            status = exc.status_code
            if status is None:
                return StudioError(f"Label Studio refused {what}: {exc.body}")
            return StudioError(f"Label Studio refused {what} ({status}): {exc.body}", status)
        if isinstance(exc, httpx.HTTPError):
            return StudioError(
                f"Label Studio unreachable at {redact_url(self.url)} ({what}): "
                f"{type(exc).__name__} {exc}"
            )
        return StudioError(f"Label Studio call failed ({what}): {type(exc).__name__} {exc}")

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ApiError, httpx.HTTPError) as exc:
            raise self._error(what, exc) from exc

    # ------------------------------------------------------------------ reads
    def project(self, project_id: int) -> dict:
        """`{"id", "title", "label_config", "model_version", ...}`."""
        what = f"GET api/projects/{project_id}/"
        project = self._call(what, self.client.projects.get, project_id)
        return _plain(project)

    def iter_tasks(self, project_id: int, full: bool = True) -> Iterator[dict]:
        """Every task of the project, page by page, as dicts with `id`, `data`,
        `annotations` and `predictions_model_versions` (Label Studio's own JSON; never the
        predictions). `full=False` asks for TASK_FIELDS only (lighter)."""
        what = f"GET api/tasks/?project={project_id}"
        extra = {"fields": "all", "include": CYCLE_FIELDS} if full else {
            "fields": "task_only", "include": TASK_FIELDS}
        try:
            pager = self.client.tasks.list(project=project_id, page_size=self.page_size,
                                           **extra)
            for task in pager:
                item = _plain(task)
                if full:
                    item.setdefault("annotations", [])
                yield item
        except (ApiError, httpx.HTTPError) as exc:
            raise self._error(what, exc) from exc

    def tasks(self, project_id: int, full: bool = True) -> list[dict]:
        return list(self.iter_tasks(project_id, full))

    def model_versions(self, project_id: int) -> dict[str, int]:
        """{model_version: number of predictions} over the project's predictions."""
        reply = self._raw(f"GET api/projects/{project_id}/model-versions/", "GET",
                          f"api/projects/{project_id}/model-versions/")
        if not isinstance(reply, dict):
            raise StudioError(f"Label Studio's model-versions reply is not an object: "
                              f"{str(reply)[:200]}")
        return {str(k): int(v or 0) for k, v in reply.items()}

    # ------------------------------------------------------------------ writes
    def delete_model_version(self, project_id: int, version: str) -> int:
        """Delete every prediction of `version` in the project; returns how many."""
        if not version:  # Label Studio would refuse it; never "every prediction"
            raise ValueError("a model version to delete is required")
        reply = self._raw(f"DELETE api/projects/{project_id}/model-versions/ ({version})",
                          "DELETE", f"api/projects/{project_id}/model-versions/",
                          json={"model_version": version})
        if not isinstance(reply, dict):  # 1.23: {"deleted_predictions": n}
            raise StudioError(f"Label Studio's model-versions delete reply is not an "
                              f"object: {str(reply)[:200]}")
        return int(reply.get("deleted_predictions") or 0)

    def _raw(self, what: str, method: str, path: str, json: Any = None) -> Any:
        """A call the SDK has no method for, through its own HTTP client (auth, base URL,
        PAT refresh), never retried inside."""
        try:
            response = self.client._client_wrapper.httpx_client.request(
                path, method=method, json=json, request_options=NO_RETRY)
        except httpx.HTTPError as exc:
            raise self._error(what, exc) from exc
        if not 200 <= response.status_code < 300:
            raise StudioError(f"Label Studio refused {what} ({response.status_code}): "
                              f"{response.text[:500]}", response.status_code)
        return response.json() if response.content else None

    def import_tasks(self, project_id: int, tasks: Sequence[dict]) -> list[int]:
        """Create tasks (each `{"data": {...}, "predictions": [...]}`); returns their ids.
        One request, no retry inside (see the module docstring)."""
        if not tasks:
            return []
        response = self._call(
            f"POST api/projects/{project_id}/import ({len(tasks)} tasks)",
            self.client.projects.import_tasks,
            project_id,
            request=list(tasks),
            return_task_ids=True,
            request_options=NO_RETRY,
        )
        ids = getattr(response, "task_ids", None)
        if ids is None and hasattr(response, "model_extra"):
            ids = (response.model_extra or {}).get("task_ids")
        return [int(i) for i in ids or []]

    def import_predictions(
        self, project_id: int, predictions: Sequence[dict], chunk: int = 100
    ) -> int:
        """Bulk-create predictions (`{"task", "result", "score", "model_version"}`)."""
        created = 0
        for start in range(0, len(predictions), chunk):
            part = list(predictions[start : start + chunk])
            response = self._call(
                f"POST api/projects/{project_id}/import/predictions ({len(part)})",
                self.client.projects.import_predictions,
                project_id,
                request=part,
                request_options=NO_RETRY,
            )
            created += int(getattr(response, "created", None) or len(part))
        return created

    def set_model_version(self, project_id: int, version: str) -> None:
        """The project's `model_version`: the predictions Label Studio shows and its
        uncertainty sampling ranks (`PATCH /api/projects/<id>/`)."""
        self._call(f"PATCH api/projects/{project_id}/ (model_version)",
                   self.client.projects.update, project_id, model_version=version)

    def create_prediction(
        self, task_id: int, result: list, score: float | None, model_version: str
    ) -> int:
        prediction = self._call(
            f"POST api/predictions/ (task {task_id})",
            self.client.predictions.create,
            task=task_id,
            result=result,
            score=score,
            model_version=model_version,
            request_options=NO_RETRY,
        )
        return int(prediction.id)


def task_model_versions(task: dict) -> set[str]:
    """The model versions a task holds predictions of, from `predictions_model_versions`
    (`"v1,v2"` on SQLite, `"v1, v2"` on PostgreSQL). Label Studio cuts the column at 500
    characters: the part after the last comma of a cut column is dropped, so a version
    may be missing (its task is then pushed again), never made up."""
    text = str(task.get("predictions_model_versions") or "")
    parts = text.split(",")
    if len(text) >= VERSIONS_CUT:
        parts = parts[:-1]
    return {part.strip() for part in parts if part.strip()}
