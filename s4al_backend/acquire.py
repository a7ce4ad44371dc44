"""Steps 5-6 of a cycle (s4al_backend.cycle describes them): one pass over the pool with
`model.acquisition.score_pool` pushes the served model's predictions to Label Studio while
it scores blocks for acquisition, then the chosen blocks become region tasks with their
pre-labels."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .labels import IGNORE_INDEX, LabelMap, mask_to_results
from .pool import PoolItem, pick_annotation, region_id
from .settings import Settings
from .studio import Studio

log = logging.getLogger(__name__)
PREDICTION_CHUNK = 50  # predictions per import request


def open_regions(item: PoolItem) -> list[dict]:
    """The item's region tasks nobody annotated yet."""
    return [r for r in item.regions
            if not r.get("labelled") and pick_annotation(r["task"]) is None]


def prediction_targets(pool: dict[int, PoolItem]) -> set[int]:
    """The tasks a version pushes a prediction to: image tasks without a full annotation
    (fully annotated ones, the holdout among them, need no pre-label: the prune.py module
    explains why their old ones go too) and open region tasks."""
    targets = {tid for tid, item in pool.items() if not item.full}
    targets.update(int(r["task"]["id"]) for item in pool.values() for r in open_regions(item))
    return targets


class Outbox:
    """Predictions on their way to Label Studio, imported in chunks of PREDICTION_CHUNK;
    tasks in `have` already hold one of this version and are not sent again."""

    def __init__(self, studio: Studio, project: int, have: set[int] | frozenset,
                 expected: int = 0, progress: Callable[[dict], None] = lambda update: None):
        self.studio, self.project, self.have = studio, project, have
        self.expected, self.progress = expected, progress  # the push step's total
        self.pending: list[dict] = []
        self.made = self.pushed = 0

    def add(self, prediction: dict) -> None:
        self.made += 1
        if prediction["task"] not in self.have:
            self.pending.append(prediction)
        if len(self.pending) >= PREDICTION_CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.pushed += self.studio.import_predictions(self.project, self.pending)
            self.pending.clear()
            self.progress({"step": {"name": "push", "done": self.pushed,
                                    "total": self.expected}})


class PerImage(Sequence):
    """Per-image values computed when asked (`value(index)`), the last one kept: what
    `score_pool` reads of a pool too large to hold every mask at once."""

    def __init__(self, length: int, value: Callable[[int], Any]):
        self.length, self.value = length, value
        self.last: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        if self.last is None or self.last[0] != index:
            self.last = (index, self.value(index))
        return self.last[1]


class QueuedPixels:
    """The pixels a tsf version queues for manual labelling (`model.refinement`), per pool
    image outside its taken pixels, counted as they are computed; none for a state that
    queues nothing."""

    def __init__(self, state: dict | None, device: str, items: list[PoolItem],
                 taken: PerImage):
        from model.refinement import queue_refinement

        self.refinement = queue_refinement(state, device)
        self.items, self.taken = items, taken
        self.pixels = 0
        self.maps = PerImage(len(items), self.queued) if self.refinement else None

    def queued(self, index: int) -> np.ndarray:
        item = self.items[index]
        queued = self.refinement(item.image, item.mask).queued[0].cpu().numpy()
        queued &= ~self.taken[index]
        self.pixels += int(queued.sum())
        return queued


class Acquisition:
    """Predictions and region selection of one version over a project's pool."""

    def __init__(self, settings: Settings, studio: Studio, project: int,
                 progress: Callable[[dict], None]):
        self.settings, self.studio, self.project = settings, studio, project
        self.progress = progress

    def run(self, label_map: LabelMap, pool: dict[int, PoolItem], student, teacher,
                version: str, select: bool = True, have: set[int] | frozenset = frozenset(),
                state: dict | None = None) -> tuple[list[dict], int, int]:
        """One pass over the pool (`model.acquisition.score_pool`): a prediction of the
        served model (the teacher) for every task, pushed to Label Studio in chunks as it
        goes (tasks in `have` already hold one), and block scores (ACQUIRE_WITH's network)
        for the acquisition pool, queued pixels first when `state` (the version's train
        state) is a tsf method's. Returns the region tasks to import, the number of
        predictions pushed and of queued pixels in the acquisition pool."""
        from model.acquisition import get_heuristic, score_pool, select_blocks
        from model.inference import predict_probabilities

        s = self.settings
        device = s.resolve_device()
        # fully annotated images offer no block and need no pre-label: not run at all
        items = [item for item in pool.values() if not item.full or open_regions(item)]
        selecting = int(s.regions_per_cycle) > 0 and select
        if not select:
            log.info("project %s: no regions for %s (already in Label Studio, or a first "
                     "version)",
                     self.project, version)
        heuristic = get_heuristic(s.acquisition)
        # without a selection only the served model runs
        scorer = (student if selecting and s.acquire_with != "teacher" else teacher).to(device)
        teacher = teacher.to(device)
        batch, amp = max(1, int(s.predict_batch_size)), s.amp
        served = None  # the teacher's own stream, when the scorer's probabilities are not its
        if scorer is not teacher or not heuristic.needs_model:
            served = predict_probabilities(teacher, (i.image for i in items), batch, device,
                                           amp=amp)
        expected = len(prediction_targets(pool) - set(have))
        outbox = Outbox(self.studio, self.project, have, expected, self.progress)
        self.progress({"step": {"name": "push", "done": 0, "total": expected}})

        def on_image(index: int, probs) -> None:
            probs = next(served) if served is not None else probs
            self.predict_item(items[index], probs, label_map, version, outbox)
            self.progress({"phase": "predict", "iteration": index + 1, "total": len(items),
                           "step": {"name": "score", "done": index + 1, "total": len(items)}})

        taken = PerImage(len(items), lambda i: self.taken(items[i], selecting))
        queued = QueuedPixels(state, device, items, taken) if selecting else None
        self.progress({"phase": "predict", "message": f"{len(items)} images"})
        scores = score_pool(
            scorer, items, heuristic,
            PerImage(len(items), lambda i: s.region_size_for(items[i].shape[0])),
            taken, batch, device, amp=amp, on_image=on_image, progress=False, log=log.info,
            priority_maps=queued.maps if queued is not None else None,
            priority_weight=math.log(len(label_map.classes)),  # entropy's range: queued first
        )
        outbox.flush()
        chosen = []
        if selecting:
            per_image = int(s.regions_per_image)
            chosen = select_blocks(scores.grids, per_image=per_image)[:int(s.regions_per_cycle)]
        regions = self.region_tasks(label_map, items, chosen, teacher, version)
        log.info("project %s: %d predictions made, %d pushed; %d regions selected (%s with "
                 "the %s)", self.project, outbox.made, outbox.pushed, len(regions),
                 s.acquisition, s.acquire_with)
        queued_pixels = queued.pixels if queued is not None else 0
        if queued is not None and queued.refinement is not None:
            log.info("project %s: %d pixels queued by %s labelled first", self.project,
                     queued_pixels, queued.refinement.config.method)
        return regions, outbox.pushed, queued_pixels

    @staticmethod
    def taken(item: PoolItem, selecting: bool) -> np.ndarray:
        """Pixels acquisition must not offer: labelled ones and regions pushed before
        (annotated or not); every pixel of a fully annotated or held-out image, and of
        every image when nothing is selected."""
        shape = item.shape
        if not selecting or item.full or item.holdout:
            return np.broadcast_to(np.True_, shape)
        taken = np.zeros(shape, dtype=bool)
        if item.mask is not None:
            taken |= item.mask != IGNORE_INDEX
        for region in item.regions:
            taken[region["y"]:region["y"] + region["h"],
                  region["x"]:region["x"] + region["w"]] = True
        return taken

    def predict_item(self, item: PoolItem, probs, label_map: LabelMap, version: str,
                     outbox: Outbox) -> None:
        """The served model's prediction for an image task without a full annotation and
        for its open region tasks (`prediction_targets`)."""
        confidence, classes = probs.max(dim=0)
        confidence, classes = confidence.numpy(), classes.numpy()
        if not item.full:
            outbox.add({
                "task": item.id,
                "result": mask_to_results(classes, label_map, confidence),
                "score": round(float(confidence.mean()), 4),
                "model_version": version,
            })
        for region in open_regions(item):
            outbox.add(self.region_prediction(int(region["task"]["id"]), label_map, classes,
                                              confidence, region, version))

    def region_prediction(self, task_id: int, label_map: LabelMap, classes: np.ndarray,
                          confidence: np.ndarray, region: dict, version: str) -> dict:
        x, y, w, h = region["x"], region["y"], region["w"], region["h"]
        inside = np.full(classes.shape, IGNORE_INDEX, dtype=np.int64)
        inside[y:y + h, x:x + w] = classes[y:y + h, x:x + w]
        result = mask_to_results(inside, label_map, confidence)
        if label_map.region_control:
            result.append(self.rectangle(label_map, classes.shape, x, y, w, h))
        return {"task": task_id, "result": result,
                "score": round(float(confidence[y:y + h, x:x + w].mean()), 4),
                "model_version": version}

    @staticmethod
    def rectangle(label_map: LabelMap, shape, x: int, y: int, w: int, h: int) -> dict:
        height, width = shape
        value = {"x": 100.0 * x / width, "y": 100.0 * y / height,
                 "width": 100.0 * w / width, "height": 100.0 * h / height, "rotation": 0}
        kind = label_map.region_type or "rectangle"
        if kind == "rectanglelabels":
            value["rectanglelabels"] = list(label_map.region_labels[:1])
        return {"id": f"region-{x}-{y}", "from_name": label_map.region_control,
                "to_name": label_map.to_name, "type": kind, "original_width": int(width),
                "original_height": int(height), "image_rotation": 0, "value": value,
                "readonly": True}

    def region_tasks(self, label_map: LabelMap, items: list[PoolItem], chosen, teacher,
                     version: str) -> list[dict]:
        """Import payloads for the chosen blocks, each with a prediction: the served model's
        pre-labels inside the region (the few chosen images are predicted again rather
        than keeping every probability map of the pool in memory)."""
        from model.inference import predict_probabilities

        if not chosen:
            return []
        s = self.settings
        device = s.resolve_device()
        order = sorted({region.image_index for region in chosen})
        maps = {}
        stream = predict_probabilities(teacher, (items[i].image for i in order),
                                       max(1, int(s.predict_batch_size)), device,
                                       amp=s.amp)
        for index, probs in zip(order, stream, strict=True):
            confidence, classes = probs.max(dim=0)
            maps[index] = (classes.numpy(), confidence.numpy())
        out = []
        for region in chosen:
            item = items[region.image_index]
            classes, confidence = maps[region.image_index]
            box = {"x": region.x, "y": region.y, "w": region.w, "h": region.h}
            prediction = self.region_prediction(0, label_map, classes, confidence, box, version)
            prediction.pop("task")
            out.append({
                "data": {
                    label_map.data_key: item.url,
                    "source_task": item.id,
                    **box,
                    "region_id": region_id(item.id, region.x, region.y, region.w, region.h),
                    "uncertainty": round(float(region.score), 6),
                    "cycle_version": version,
                },
                "predictions": [prediction],
            })
        return out
