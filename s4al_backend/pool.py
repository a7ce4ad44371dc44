"""A project's image tasks as a cycle sees them (`PoolItem`), and the rules every step
reads them by: which annotation counts, which task is a region task and its id, which
tasks are held out."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .labels import IGNORE_INDEX


@dataclass
class PoolItem:
    """One image task of the project and what the cycle knows about it. Shaped like
    `model.data.Sample` (`name`, `image`, `mask`), so training and scoring take it as is.

    The decoded image is not kept: `image` asks `reader` (`pool_images.PoolImages`: the
    disk cache, a few recent images in memory) each time, so a pool of any size costs
    memory per batch, not per task. `held` is an image kept in memory instead (tests)."""

    task: dict
    url: str
    held: np.ndarray | None = None
    mask: np.ndarray | None = None  # merged labels, 255 = unlabelled
    full: bool = False  # has a usable whole-image annotation
    holdout: bool = False
    regions: list[dict] = field(default_factory=list)  # region tasks on this image
    fingerprint: list = field(default_factory=list)
    shape: tuple[int, int] | None = None  # (height, width), known once the image loaded
    reader: Callable[[PoolItem], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.held is not None and self.shape is None:
            self.shape = tuple(self.held.shape[:2])

    @property
    def id(self) -> int:
        return int(self.task["id"])

    @property
    def name(self) -> str:
        return str(self.id)

    @property
    def image(self) -> np.ndarray:
        """uint8 H x W x 3, read when asked (see the class)."""
        if self.held is not None:
            return self.held
        if self.reader is None:
            raise RuntimeError(f"task {self.id}: image not loaded")
        return self.reader(self)

    @property
    def labelled(self) -> bool:
        return self.mask is not None and bool((self.mask != IGNORE_INDEX).any())


def region_id(source_task: int, x: int, y: int, w: int, h: int) -> str:
    return f"t{int(source_task)}-x{int(x)}-y{int(y)}-w{int(w)}-h{int(h)}"


def is_region_task(task: dict) -> bool:
    data = task.get("data") or {}
    return "region_id" in data and "source_task" in data


def holdout_score(project: int, task_id: int) -> float:
    """A stable number in [0, 1) per task: held out when below HOLDOUT_FRACTION."""
    digest = hashlib.sha256(f"{project}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_annotation(task: dict) -> dict | None:
    """The annotation that counts: not cancelled, with results; ground truth first, then
    the most recently updated."""
    candidates = [
        a for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled") and a.get("result")
        and integer_id(a)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda a: (bool(a.get("ground_truth")),
                                          str(a.get("updated_at") or ""), int(a["id"])))


def integer_id(annotation: dict) -> bool:
    """Label Studio's annotation ids are integers; anything else is skipped (logged as
    such) rather than failing the cycle."""
    value = annotation.get("id")
    return isinstance(value, int) and not isinstance(value, bool)
