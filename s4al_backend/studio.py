"""Label Studio through label-studio-sdk 2.x: the few calls an active-learning cycle needs.

- `Studio.project(id)`: the project (label config, model version).
- `Studio.iter_tasks(id)`: every task with its annotations and predictions, paged
  (`GET /api/tasks/?project=&fields=all&page=`; a page past the end is Label Studio's 404,
  which the SDK's pager takes as the end).
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
        `annotations` and `predictions` (Label Studio's own JSON). `full=False` asks for
        the tasks without annotations and predictions (lighter)."""
        what = f"GET api/tasks/?project={project_id}"
        try:
            pager = self.client.tasks.list(
                project=project_id, fields="all" if full else "task_only",
                page_size=self.page_size,
            )
            for task in pager:
                item = _plain(task)
                item.setdefault("annotations", [])
                item.setdefault("predictions", [])
                yield item
        except (ApiError, httpx.HTTPError) as exc:
            raise self._error(what, exc) from exc

    def tasks(self, project_id: int, full: bool = True) -> list[dict]:
        return list(self.iter_tasks(project_id, full))

    # ------------------------------------------------------------------ writes
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
