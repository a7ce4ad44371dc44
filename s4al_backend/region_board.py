"""The region tasks of a project as the dashboard shows them: read from Label Studio,
counted open / done per cycle, the most uncertain open ones with a thumbnail.

Region tasks are the ones `cycle.py` imports (data `{image, source_task, x, y, w, h,
region_id, uncertainty, cycle_version}`); a task is *done* once it holds an annotation.
Label Studio is read at most every `ttl` seconds per project (the page refreshes every
few seconds while a cycle runs) and again when the project's version changes, tasks
only, without annotations or predictions.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .cycle import is_region_task

__all__ = ["CycleRegions", "RegionBoard", "RegionTask", "Regions", "task_link", "thumbnail"]

THUMB_SIDE = 168  # px of the square thumbnail
CONTEXT = 3.0  # the crop spans this many region sides, so the region sits in its scene
MIN_CROP = 64
OWN_KEYS = ("source_task", "x", "y", "w", "h", "region_id", "uncertainty", "cycle_version")


@dataclass(frozen=True)
class RegionTask:
    id: int
    source_task: int
    x: int
    y: int
    w: int
    h: int
    uncertainty: float | None
    cycle_version: str
    done: bool
    image: str  # the image URL as Label Studio stores it


@dataclass(frozen=True)
class CycleRegions:
    version: str
    open: int
    done: int

    @property
    def total(self) -> int:
        return self.open + self.done


@dataclass(frozen=True)
class Regions:
    tasks: list[RegionTask]
    error: str | None = None  # Label Studio could not be read

    @property
    def per_cycle(self) -> list[CycleRegions]:
        counts: dict[str, list[int]] = {}
        for task in self.tasks:
            entry = counts.setdefault(task.cycle_version, [0, 0])
            entry[1 if task.done else 0] += 1
        return [CycleRegions(version, *counts[version]) for version in sorted(counts)]

    def most_uncertain(self, count: int) -> list[RegionTask]:
        waiting = [t for t in self.tasks if not t.done]
        waiting.sort(key=lambda t: (t.uncertainty is None, -(t.uncertainty or 0.0), t.id))
        return waiting[:count]

    def find(self, task_id: int) -> RegionTask | None:
        return next((t for t in self.tasks if t.id == task_id), None)


def parse_region_task(task: dict) -> RegionTask | None:
    """A Label Studio task as a RegionTask; None when it is not a usable region task."""
    if not is_region_task(task):
        return None
    data = task.get("data") or {}
    try:
        x, y, w, h = (int(data[k]) for k in ("x", "y", "w", "h"))
        source = int(data["source_task"])
        uncertainty = data.get("uncertainty")
        uncertainty = float(uncertainty) if uncertainty is not None else None
    except (KeyError, TypeError, ValueError):
        return None
    # the image is the one data field cycle.py does not add (its key is the config's)
    image = next((v for k, v in data.items() if k not in OWN_KEYS and isinstance(v, str)), "")
    done = bool(task.get("is_labeled")) or int(task.get("total_annotations") or 0) > 0
    return RegionTask(int(task["id"]), source, x, y, w, h, uncertainty,
                      str(data.get("cycle_version") or "?"), done, image)


class RegionBoard:
    """Per-project region tasks, cached for `ttl` seconds. `studio_factory()` builds the
    Label Studio client (called lazily: no key, no reads)."""

    def __init__(self, studio_factory, ttl: float = 10.0, max_projects: int = 32):
        self.studio_factory = studio_factory
        self.ttl = ttl
        self.max_projects = max_projects
        self._cache: OrderedDict[int, tuple[float, str | None, Regions]] = OrderedDict()
        self._lock = threading.Lock()

    def regions(self, project: int, stamp: str | None = None) -> Regions:
        """The project's region tasks; read again after `ttl` seconds or as soon as
        `stamp` changes (the caller's sign that regions may have changed: a new version,
        a cycle that finished)."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(project)
            if cached and cached[1] == stamp and now - cached[0] < self.ttl:
                return cached[2]
        regions = self._read(project)
        with self._lock:
            self._cache[project] = (now, stamp, regions)
            self._cache.move_to_end(project)
            while len(self._cache) > self.max_projects:
                self._cache.popitem(last=False)
        return regions

    def task(self, project: int, task_id: int) -> RegionTask | None:
        """One region task of the project: from the last read when it is there (the
        page's thumbnails), else from a fresh one."""
        with self._lock:
            cached = self._cache.get(project)
        found = cached[2].find(task_id) if cached else None
        if found is None:
            found = self._read(project).find(task_id)
        return found

    def _read(self, project: int) -> Regions:
        from .studio import StudioError

        try:
            studio = self.studio_factory()
            tasks = [parse_region_task(t) for t in studio.iter_tasks(project, full=False)]
        except StudioError as exc:
            return Regions([], f"Label Studio could not be read: {exc}")
        except Exception as exc:  # an unreachable or misconfigured Label Studio: say so
            return Regions([], f"Label Studio could not be read ({type(exc).__name__}: {exc})")
        return Regions([t for t in tasks if t is not None])


def task_link(base_url: str, project: int, task_id: int) -> str:
    """Label Studio's page that opens one task of a project."""
    return f"{base_url.rstrip('/')}/projects/{int(project)}/data?task={int(task_id)}"


def thumbnail(image: np.ndarray, task: RegionTask, side: int = THUMB_SIDE) -> bytes:
    """PNG: the region in its surroundings (a crop CONTEXT times its size, clamped to the
    image), scaled to `side` x `side`, the region outlined."""
    height, width = image.shape[:2]
    span = int(max(MIN_CROP, CONTEXT * max(task.w, task.h)))
    span = min(span, height, width)
    cx, cy = task.x + task.w / 2, task.y + task.h / 2
    left = int(min(max(0, round(cx - span / 2)), width - span))
    top = int(min(max(0, round(cy - span / 2)), height - span))
    crop = np.ascontiguousarray(image[top:top + span, left:left + span])
    scale = side / span
    big = cv2.resize(crop, (side, side), interpolation=cv2.INTER_LINEAR)
    x0, y0 = round((task.x - left) * scale), round((task.y - top) * scale)
    x1, y1 = round((task.x + task.w - left) * scale), round((task.y + task.h - top) * scale)
    cv2.rectangle(big, (x0 - 1, y0 - 1), (x1 + 1, y1 + 1), (0, 0, 0), 3)  # dark halo
    cv2.rectangle(big, (x0, y0), (x1, y1), (255, 214, 0), 2)
    ok, data = cv2.imencode(".png", cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("the thumbnail could not be encoded")
    return data.tobytes()


def region_summary(regions: Regions, count: int) -> dict[str, Any]:
    """What the page template needs: per-cycle counts and the top open tasks."""
    return {"error": regions.error, "per_cycle": regions.per_cycle,
            "open": sum(1 for t in regions.tasks if not t.done),
            "done": sum(1 for t in regions.tasks if t.done),
            "top": regions.most_uncertain(count)}
