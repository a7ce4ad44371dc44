"""The dashboard: a page to watch the model learn, behind the app's basic auth.

- ``GET /dashboard`` (``?project=<id>`` also shows a project that has no store yet):
  every project under MODEL_DIR (and those Label Studio set up in this process) with its
  current version, learning curves, per-class IoU, training progress and region tasks,
  and the public settings. HTML from Jinja templates (``templates/dashboard/``), charts
  as inline SVG: no CDN, no JavaScript build. A few lines of inline script re-fetch the
  page every DASHBOARD_REFRESH seconds while a cycle is queued or runs (``IDLE_FACTOR``
  times as long otherwise) and swap its content in; without script a meta refresh does
  the same.
- ``GET /dashboard/projects/<id>/regions/<task>.png``: the thumbnail of an open region
  task (its image cropped around the region, the region outlined), for region tasks of
  that project only.

Secrets never reach the page: settings go through ``Settings.public()``, and the rendered
HTML is checked for the API key, the basic-auth password and a Redis password as a last
guard (replaced by ``***``, logged as a bug).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, render_template, request

from . import jobs
from .dashboard_view import known_projects, project_view, public_settings
from .region_board import RegionBoard, task_link, thumbnail
from .store import project_key, shared_store

__all__ = ["create_blueprint"]

log = logging.getLogger(__name__)

IDLE_FACTOR = 6  # when nothing is queued or running, refresh this many times slower
THUMB_CACHE = 256  # thumbnails kept in memory (~20 kB each)
MIN_SECRET = 4  # shorter "secrets" would match ordinary text of the page


def create_blueprint(runtime) -> Blueprint:
    """The dashboard's routes over the process's `backend.Runtime`."""
    settings = runtime.settings
    page = Blueprint("dashboard", __name__, template_folder="templates")
    board = RegionBoard(lambda: _studio(settings))
    thumbs = _ThumbCache(THUMB_CACHE)

    @page.get("/dashboard")
    def dashboard():
        asked = _asked_project()
        keys = known_projects(settings.model_dir, runtime.known_projects() + asked)
        views = [project_view(settings, key, board, _status_for(settings)) for key in keys]
        busy = any(view.busy for view in views)
        html = render_template(
            "dashboard/page.html", projects=views, settings=public_settings(settings),
            shared=_shared_version(settings),
            refresh_s=settings.dashboard_refresh * (1 if busy else IDLE_FACTOR), busy=busy,
            train_after=settings.train_after_annotations,
            task_link=task_link, generated=time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                         time.gmtime()))
        return Response(_without_secrets(html, settings), mimetype="text/html")

    @page.get("/dashboard/projects/<project>/regions/<int:task_id>.png")
    def region_thumbnail(project: str, task_id: int):
        key = _key_or_404(project)
        task = board.task(int(key), task_id)
        if task is None:
            abort(404, description=f"task {task_id} is not a region task of project {key}")
        cache_key = (key, task.id, task.x, task.y, task.w, task.h, task.image)
        data = thumbs.get(cache_key)
        if data is None:
            from .images import ImageError

            try:
                image = runtime.fetcher.load(task.image, task.id)
            except ImageError as exc:
                log.warning("dashboard: region task %s: image not loaded: %s", task.id, exc)
                abort(exc.status if 400 <= exc.status < 600 else 502, description=str(exc))
            data = thumbnail(image, task)
            thumbs.put(cache_key, data)
        return Response(data, mimetype="image/png",
                        headers={"Cache-Control": "private, max-age=300"})

    return page


def _asked_project() -> list[str]:
    value = request.args.get("project")
    if not value:
        return []
    return [_key_or_404(value)]


def _key_or_404(value: str) -> str:
    try:
        key = project_key(value)
    except ValueError:
        key = None
    if key is None or not key.isdigit():
        abort(404, description=f"no project {value[:40]!r}")
    return key


def _shared_version(settings) -> str | None:
    try:
        return shared_store(settings.model_dir).current()
    except OSError as exc:  # said where it matters: /setup and /predict log it
        log.warning("dashboard: the shared store cannot be read: %s", exc)
        return None


def _status_for(settings):
    return lambda project: jobs.project_status(settings, project)


def _studio(settings):
    from .studio import Studio

    return Studio.from_settings(settings)


def _without_secrets(html: str, settings) -> str:
    secrets = [settings.label_studio_api_key, settings.basic_auth_pass,
               urlsplit(settings.redis_url).password if settings.redis_url else None]
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET and secret in html:
            log.error("dashboard: a secret reached the page; replaced (a bug: report it)")
            html = html.replace(secret, "***")
    return html


class _ThumbCache:
    """A small thread-safe LRU of PNG bytes."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.size:
                self._items.popitem(last=False)
