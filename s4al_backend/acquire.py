"""Steps 5-6 of a cycle (s4al_backend.cycle describes them): one pass over the pool with
`model.acquisition.score_pool`, in chunks of SCORE_CHUNK images (`pool_chunks`), pushes
the served model's predictions to Label Studio while it scores blocks for acquisition;
then the best blocks of all chunks become region tasks with their pre-labels. The chunks
run in this process (`LocalChunks`) or, in worker mode, also on free workers
(`chunk_jobs.RedisChunks`): the same `ChunkScorer` either way."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .labels import IGNORE_INDEX, LabelMap, mask_to_results
from .pool import PoolItem, pick_annotation, region_id
from .pool_chunks import ChunkResult, chunk_ranges, item_spec, label_map_spec, merge_candidates
from .settings import Settings
from .studio import Studio

log = logging.getLogger(__name__)
PREDICTION_CHUNK = 50  # predictions per import request
# what a helping worker takes from the cycle's settings rather than its own environment
SHARED_SETTINGS = ("acquisition", "acquire_with", "region_size", "regions_per_image",
                   "regions_per_cycle")


def acquisition_settings(settings: Settings) -> dict:
    return {name: getattr(settings, name) for name in SHARED_SETTINGS}


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


def region_prediction(task_id: int, label_map: LabelMap, classes: np.ndarray,
                      confidence: np.ndarray, region: dict, version: str) -> dict:
    """The served model's pre-labels inside one region (a region task's prediction), with
    the region as a rectangle when the config reserves a control for it."""
    x, y, w, h = region["x"], region["y"], region["w"], region["h"]
    inside = np.full(classes.shape, IGNORE_INDEX, dtype=np.int64)
    inside[y:y + h, x:x + w] = classes[y:y + h, x:x + w]
    result = mask_to_results(inside, label_map, confidence)
    if label_map.region_control:
        result.append(rectangle(label_map, classes.shape, x, y, w, h))
    return {"task": task_id, "result": result,
            "score": round(float(confidence[y:y + h, x:x + w].mean()), 4),
            "model_version": version}


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


class Tally:
    """The score and push steps' done / total over every chunk, sent on as progress;
    `remote` adds the counts of chunks other workers run (chunk_jobs)."""

    def __init__(self, progress: Callable[[dict], None], images: int, predictions: int):
        self.progress, self.images, self.predictions = progress, images, predictions
        self.scored = self.pushed = 0
        self.others = (0, 0)

    def add(self, scored: int = 0, pushed: int = 0, tasks: Sequence[int] = ()) -> None:
        """`tasks`: those just pushed to (what chunk_jobs.RemoteTally records)."""
        self.scored += scored
        self.pushed += pushed
        self.report(score=bool(scored), push=bool(pushed))

    def remote(self, scored: int, pushed: int) -> None:
        if (scored, pushed) != self.others:
            self.others = (scored, pushed)
            self.report()

    def report(self, score: bool = True, push: bool = True) -> None:
        scored, pushed = self.scored + self.others[0], self.pushed + self.others[1]
        if score:
            self.progress({"phase": "predict", "iteration": scored, "total": self.images,
                           "step": {"name": "score", "done": scored, "total": self.images}})
        if push:
            self.progress({"step": {"name": "push", "done": pushed,
                                    "total": self.predictions}})


class Outbox:
    """Predictions on their way to Label Studio, imported in chunks of PREDICTION_CHUNK;
    tasks in `have` already hold one of this version and are not sent again."""

    def __init__(self, studio: Studio, project: int, have: set[int] | frozenset,
                 tally: Tally):
        self.studio, self.project, self.have, self.tally = studio, project, have, tally
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
            pushed = self.studio.import_predictions(self.project, self.pending)
            self.pushed += pushed
            self.tally.add(pushed=pushed, tasks=[p["task"] for p in self.pending])
            self.pending.clear()


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
    """The pixels a tsf version queues for manual labelling (`model.refinement`), per image
    of a chunk outside its taken pixels, counted as they are computed."""

    def __init__(self, refinement, items: list[PoolItem], taken: PerImage):
        self.refinement, self.items, self.taken = refinement, items, taken
        self.pixels = 0
        self.maps = PerImage(len(items), self.queued)

    def queued(self, index: int) -> np.ndarray:
        item = self.items[index]
        queued = self.refinement(item.image, item.mask).queued[0].cpu().numpy()
        queued &= ~self.taken[index]
        self.pixels += int(queued.sum())
        return queued


class ChunkScorer:
    """Scores and predicts chunks of one version's pool (`pool_chunks`): the same work in
    the cycle's own process and in a worker helping it (`chunk_jobs`)."""

    def __init__(self, settings: Settings, studio: Studio, project: int, label_map: LabelMap,
                 student, teacher, version: str, selecting: bool, state: dict | None):
        from model.acquisition import get_heuristic
        from model.refinement import queue_refinement

        s = self.settings = settings
        self.studio, self.project, self.label_map = studio, project, label_map
        self.version, self.selecting = version, selecting
        self.device = s.resolve_device()
        self.heuristic = get_heuristic(s.acquisition)
        # without a selection only the served model runs
        use_student = selecting and s.acquire_with != "teacher"
        self.served = teacher.to(self.device)
        self.scorer = student.to(self.device) if use_student else self.served
        self.refinement = queue_refinement(state, self.device) if selecting else None

    def score(self, items: list[PoolItem], offset: int, have: set[int] | frozenset,
              tally: Tally) -> ChunkResult:
        """`items` (pool images `offset`...): predictions pushed (tasks in `have` already
        hold one), block scores, and the chunk's best region candidates."""
        from model.acquisition import score_pool, select_blocks
        from model.inference import predict_probabilities

        s = self.settings
        batch, amp = max(1, int(s.predict_batch_size)), s.amp
        served = None  # the teacher's own stream, when the scorer's probabilities are not its
        if self.scorer is not self.served or not self.heuristic.needs_model:
            served = predict_probabilities(self.served, (i.image for i in items), batch,
                                           self.device, amp=amp)
        outbox = Outbox(self.studio, self.project, have, tally)

        def on_image(index: int, probs) -> None:
            probs = next(served) if served is not None else probs
            self.predict_item(items[index], probs, outbox)
            tally.add(scored=1)

        taken = PerImage(len(items), lambda i: Acquisition.taken(items[i], self.selecting))
        queued = QueuedPixels(self.refinement, items, taken) if self.refinement else None
        scores = score_pool(
            self.scorer, items, self.heuristic,
            PerImage(len(items), lambda i: s.region_size_for(items[i].shape[0])),
            taken, batch, self.device, amp=amp, on_image=on_image, progress=False,
            log=log.debug, priority_maps=queued.maps if queued is not None else None,
            # entropy's range: queued first
            priority_weight=math.log(len(self.label_map.classes)),
        )
        outbox.flush()
        candidates = []
        if self.selecting:
            grids = [(offset + i, grid) for i, grid in enumerate(scores.grids)]
            candidates = select_blocks(grids, per_image=int(s.regions_per_image))
        return ChunkResult(candidates[:int(s.regions_per_cycle)], outbox.made, outbox.pushed,
                           queued.pixels if queued is not None else 0, len(items))

    def predict_item(self, item: PoolItem, probs, outbox: Outbox) -> None:
        """The served model's prediction for an image task without a full annotation and
        for its open region tasks (`prediction_targets`)."""
        confidence, classes = probs.max(dim=0)
        confidence, classes = confidence.numpy(), classes.numpy()
        if not item.full:
            outbox.add({
                "task": item.id,
                "result": mask_to_results(classes, self.label_map, confidence),
                "score": round(float(confidence.mean()), 4),
                "model_version": self.version,
            })
        for region in open_regions(item):
            outbox.add(region_prediction(int(region["task"]["id"]), self.label_map, classes,
                                         confidence, region, self.version))


class LocalChunks:
    """Every chunk in this process, in order: the embedded queue, and a cycle without
    workers to help it."""

    def run(self, ranges: list[tuple[int, int]], work: Callable[[int], ChunkResult],
            spec: Callable[[int], dict], header: dict, tally: Tally) -> list[ChunkResult]:
        return [work(index) for index in range(len(ranges))]


class Acquisition:
    """Predictions and region selection of one version over a project's pool, chunk by
    chunk (`chunks`: `LocalChunks`, or `chunk_jobs.RedisChunks` spreading them over free
    workers)."""

    def __init__(self, settings: Settings, studio: Studio, project: int,
                 progress: Callable[[dict], None], chunks=None):
        self.settings, self.studio, self.project = settings, studio, project
        self.progress = progress
        self.chunks = chunks or LocalChunks()

    def run(self, label_map: LabelMap, pool: dict[int, PoolItem], student, teacher,
                version: str, select: bool = True, have: set[int] | frozenset = frozenset(),
                state: dict | None = None) -> tuple[list[dict], int, int]:
        """One pass over the pool in chunks of SCORE_CHUNK images: a prediction of the
        served model (the teacher) for every task, pushed to Label Studio as it goes (tasks
        in `have` already hold one), and block scores (ACQUIRE_WITH's network) for the
        acquisition pool, queued pixels first when `state` (the version's train state) is
        a tsf method's. Returns the region tasks to import, the number of predictions
        pushed and of queued pixels in the acquisition pool."""
        s = self.settings
        # fully annotated images offer no block and need no pre-label: not run at all
        items = [item for item in pool.values() if not item.full or open_regions(item)]
        selecting = int(s.regions_per_cycle) > 0 and select
        if not select:
            log.info("project %s: no regions for %s (already in Label Studio, or a first "
                     "version)", self.project, version)
        scorer = ChunkScorer(s, self.studio, self.project, label_map, student, teacher,
                             version, selecting, state)
        tally = Tally(self.progress, len(items), len(prediction_targets(pool) - set(have)))
        tally.report(score=False)
        self.progress({"phase": "predict", "message": f"{len(items)} images"})
        ranges = chunk_ranges(len(items), int(s.score_chunk))

        def work(index: int, pushed: set[int] | frozenset = frozenset()) -> ChunkResult:
            start, end = ranges[index]  # pushed: tasks a failed worker pushed to already
            return scorer.score(items[start:end], start, set(have) | pushed, tally)

        def spec(index: int) -> dict:
            start, end = ranges[index]
            return {"items": [item_spec(item) for item in items[start:end]], "offset": start,
                    "have": sorted(set(have) & self.chunk_tasks(items[start:end]))}

        header = {"project": self.project, "version": version, "selecting": selecting,
                  "label_map": label_map_spec(label_map), "settings": acquisition_settings(s)}
        results = self.chunks.run(ranges, work, spec, header, tally)
        chosen = merge_candidates(results, int(s.regions_per_cycle)) if selecting else []
        regions = self.region_tasks(label_map, items, chosen, scorer.served, version)
        made, pushed = sum(r.made for r in results), sum(r.pushed for r in results)
        queued_pixels = sum(r.queued_pixels for r in results)
        log.info("project %s: %d predictions made, %d pushed in %d chunks; %d regions "
                 "selected (%s with the %s)", self.project, made, pushed, len(ranges),
                 len(regions), s.acquisition, s.acquire_with)
        if scorer.refinement is not None:
            log.info("project %s: %d pixels queued by %s labelled first", self.project,
                     queued_pixels, scorer.refinement.config.method)
        return regions, pushed, queued_pixels

    @staticmethod
    def chunk_tasks(items: list[PoolItem]) -> set[int]:
        """The tasks a chunk's predictions go to (image tasks and their open regions)."""
        tasks = {item.id for item in items}
        tasks.update(int(r["task"]["id"]) for item in items for r in open_regions(item))
        return tasks

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
            prediction = region_prediction(0, label_map, classes, confidence, box, version)
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
