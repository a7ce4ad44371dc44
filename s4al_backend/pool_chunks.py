"""The pool cut into chunks for scoring and prediction (`acquire.ChunkScorer`), and what
crosses between processes when other workers take chunks (`chunk_jobs`).

A chunk is a run of consecutive pool images; image indices stay the pool's, so the
region candidates of all chunks merge into exactly the selection one pass over the whole
pool makes (`merge_candidates`: per-image picks are independent of other images, and the
order is score first, then image index, then position). Each chunk sends back only its
best REGIONS_PER_CYCLE candidates, never block grids or probabilities, so what the cycle
holds does not grow with the pool.

`item_spec` / `spec_item` carry one pool item to a worker that did not read the project:
its task id, URL, size, flags, the regions pushed on it and its labelled pixels (a
zlib-compressed uint8 mask; absent when nothing is labelled).
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, field, fields

import numpy as np

from .labels import LabelMap
from .pool import PoolItem, pick_annotation


def chunk_ranges(count: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive chunks of at most `size` items covering `count`."""
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    return [(start, min(start + size, count)) for start in range(0, count, size)]


@dataclass
class ChunkResult:
    """One chunk's outcome: its best region candidates (pool image indices), predictions
    made and pushed, PLAR's queued pixels, images scored."""

    candidates: list = field(default_factory=list)  # model.acquisition.Region
    made: int = 0
    pushed: int = 0
    queued_pixels: int = 0
    scored: int = 0

    def to_json(self) -> str:
        return json.dumps({"candidates": [r.to_dict() for r in self.candidates],
                           "made": self.made, "pushed": self.pushed,
                           "queued_pixels": self.queued_pixels, "scored": self.scored})

    @classmethod
    def from_json(cls, text: str | bytes) -> ChunkResult:
        from model.acquisition import Region

        data = json.loads(text)
        return cls([Region(**r) for r in data["candidates"]], data["made"], data["pushed"],
                   data["queued_pixels"], data["scored"])


def merge_candidates(results: list[ChunkResult], limit: int) -> list:
    """The best `limit` candidates over every chunk, in the order one pass would rank
    them (model.acquisition.BlockSelector: score down, then image index, then row-major
    position)."""
    every = [r for result in results for r in result.candidates]
    every.sort(key=lambda r: (-r.score, r.image_index, r.y, r.x))
    return every[:limit]


def label_map_spec(label_map: LabelMap) -> dict:
    return {f.name: getattr(label_map, f.name) for f in fields(label_map) if f.name != "index"}


def spec_label_map(spec: dict) -> LabelMap:
    return LabelMap(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})


def item_spec(item: PoolItem) -> dict:
    """What a worker needs of a pool item to score and predict it (see the module doc)."""
    spec = {"id": item.id, "url": item.url, "shape": list(item.shape), "full": item.full,
            "holdout": item.holdout,
            "regions": [{"task": int(r["task"]["id"]), "x": r["x"], "y": r["y"], "w": r["w"],
                         "h": r["h"], "open": not r.get("labelled")
                         and pick_annotation(r["task"]) is None} for r in item.regions]}
    if item.labelled:
        packed = zlib.compress(np.asarray(item.mask, dtype=np.uint8).tobytes(), 6)
        spec["mask"] = base64.b64encode(packed).decode()
    return spec


def spec_item(spec: dict) -> PoolItem:
    """The pool item of `item_spec` (its image still to be read: set `reader`)."""
    shape = tuple(spec["shape"])
    mask = None
    if "mask" in spec:
        raw = zlib.decompress(base64.b64decode(spec["mask"]))
        # class indices and IGNORE_INDEX (255) all fit a byte
        mask = np.frombuffer(raw, dtype=np.uint8).reshape(shape).astype(np.int64)
    # a region task that is not open stands in with `labelled` (open_regions skips it)
    regions = [{"task": {"id": r["task"]}, "x": r["x"], "y": r["y"], "w": r["w"], "h": r["h"],
                **({} if r["open"] else {"labelled": True})} for r in spec["regions"]]
    return PoolItem({"id": spec["id"]}, spec["url"], mask=mask, full=spec["full"],
                    holdout=spec["holdout"], regions=regions, shape=shape)
