"""One active-learning cycle of a Label Studio project, stateless: Label Studio is the truth.

`run_cycle(settings, project)`:

1. **Read** the project (label config) and every task with its annotations, paged. Nothing
   is kept between cycles, so missed webhooks lose nothing.
2. **Labels.** Image tasks are the pool. A task's newest usable annotation (ground truth
   first) is its mask (255 where nobody painted). A *region task* (data carries
   `region_id`, `source_task`, `x`, `y`, `w`, `h`) counts only inside its region and is
   merged onto its source task's mask. Unknown labels, empty results, masks of the wrong
   size, regions outside the image: skipped with a logged reason (`skipped` in the result),
   the rest train. A stable per-task hash holds out HOLDOUT_FRACTION of the fully
   annotated tasks for evaluation (never trained on, never acquired from).
3. **Train** (`model.train.train_cycle`, METHOD) on the labelled masks, with every pool
   image as unlabelled data (its labelled pixels replace pseudo-labels). Warm start from
   the project's current checkpoint when its classes equal the config's; otherwise from
   the backbone weights with COLD_START_ITERATIONS supervised first. When nothing changed
   since the current version (same annotations, classes, method; e.g. a retry after a
   failed push), training is skipped and the current version is reused.
4. **Save** the served network atomically as a new version: the teacher, or the student
   when it scores higher on the holdout (`published_network`; meta `published`)
   (`store.ModelStore.save`: version,
   classes, config, metrics, labelled-pixel fraction, time, train state), make it current,
   keep KEEP_VERSIONS. `/setup` now answers the new version, so Label Studio knows it.
5. **Acquire**: ACQUISITION (entropy, ...) with ACQUIRE_WITH (student/teacher) over the
   pool images without a full annotation; REGION_SIZE blocks (0 = 30 px per 360 px of
   height), never a block already labelled or already pushed, REGIONS_PER_IMAGE per image,
   REGIONS_PER_CYCLE in all. With METHOD tsf-plar (or an ablation that masks errors), the
   pixels PLAR queues for manual labelling (its votes disagree) rank first
   (`model.acquisition.prioritise`), the heuristic orders the rest. Each becomes a task:
   the same image URL, data
   `{image, source_task, x, y, w, h, region_id, uncertainty, cycle_version}` (pixels of
   the original image; `uncertainty` = the block's mean score, a sortable Data Manager
   column; `cycle_version` = the version that chose it: a version acquires once), and a
   prediction with the pre-labels inside the region (plus the region as a rectangle when
   the config has a rectangle control reserved for it). Region ids are deterministic
   (`t<task>-x<x>-y<y>-w<w>-h<h>`) and the project's existing ids are reread just before
   the import, so a region is never pushed twice, retries included.
6. **Predictions are pushed**, not left for Label Studio to fetch: every pool task and
   every open region task gets a prediction of the new version (result + score = mean
   confidence), sent in chunks of PREDICTION_CHUNK while the pool is scored (memory stays
   bounded; a retry skips the tasks that already hold one). Why push: the cycle computes
   these probabilities anyway to score the pool; Label Studio asks `/predict` only lazily
   (a task opened, or a manual "retrieve predictions"); and the Data Manager's sort by
   prediction score (uncertainty order) needs a score of the current version on every
   task. Because the version pushed equals the one `/setup` answers, Label Studio does not
   ask `/predict` again for these tasks. The project's own `model_version` then moves to
   the new version (the Data Manager scores and sorts only that version's predictions),
   unless it names predictions another source stored in the project.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from . import history
from . import store as store_module
from .first_version import FirstVersion
from .labels import IGNORE_INDEX, LabelMap, annotation_to_mask, mask_to_results
from .studio import Studio, StudioError

log = logging.getLogger(__name__)

REGION_KEYS = ("region_id", "source_task", "x", "y", "w", "h")
MAX_SKIPPED_REPORTED = 50
PREDICTION_CHUNK = 50  # predictions per import request
VERSION_NAME = re.compile(r"v\d+-\d{8}-\d{6}")  # store.ModelStore's version names


class CycleError(RuntimeError):
    """The cycle cannot go on (the message says why); the job fails and is retried."""


@dataclass
class PoolItem:
    """One image task of the project and what the cycle knows about it."""

    task: dict
    url: str
    image: np.ndarray | None = None
    mask: np.ndarray | None = None  # merged labels, 255 = unlabelled
    full: bool = False  # has a usable whole-image annotation
    holdout: bool = False
    regions: list[dict] = field(default_factory=list)  # region tasks on this image
    fingerprint: list = field(default_factory=list)

    @property
    def id(self) -> int:
        return int(self.task["id"])

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
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda a: (bool(a.get("ground_truth")),
                                          str(a.get("updated_at") or ""), int(a.get("id") or 0)))


class Cycle:
    """One cycle; `run()` does steps 1-6. Built by `run_cycle`; tests may inject the
    Label Studio client and the image fetcher."""

    def __init__(self, settings: Any, project: int, *, reason: str = "",
                 progress: Callable[[dict], None] | None = None,
                 studio: Studio | None = None, fetcher=None):
        self.settings = settings
        self.project = int(project)
        self.reason = reason
        self.progress = progress or (lambda update: None)
        self.studio = studio or Studio.from_settings(settings)
        if fetcher is None:
            from .images import ImageFetcher

            fetcher = ImageFetcher(settings)
        self.fetcher = fetcher
        self.store = store_module.project_store(settings.model_dir, self.project,
                                                settings.keep_versions)
        self.skipped: list[dict] = []
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def phase(self, name: str, **extra) -> None:
        self.progress({"phase": name, **extra})

    def skip(self, task_id, reason: str, annotation=None) -> None:
        entry = {"task": task_id, "reason": reason}
        if annotation is not None:
            entry["annotation"] = annotation
        log.warning("project %s: task %s%s skipped: %s", self.project, task_id,
                    f" annotation {annotation}" if annotation is not None else "", reason)
        self.skipped.append(entry)

    def timed(self, name: str, started: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - started, 3)

    # ------------------------------------------------------------------ the cycle
    def run(self) -> dict:
        t0 = time.monotonic()
        self.phase("read", message="reading the project from Label Studio")
        info = self.studio.project(self.project)
        try:
            label_map = LabelMap.from_config(info.get("label_config") or "")
        except ValueError as exc:
            raise CycleError(f"project {self.project}: {exc}") from exc
        tasks = list(self.studio.iter_tasks(self.project))
        pool, region_tasks = self.split(tasks, label_map)
        self.timed("read_s", t0)

        t0 = time.monotonic()
        self.phase("images", message=f"{len(pool)} images")
        self.load_images(pool)
        pool = {tid: item for tid, item in pool.items() if item.image is not None}
        if not pool:
            raise CycleError(f"project {self.project}: no task image could be loaded")
        self.timed("images_s", t0)

        self.build_labels(pool, region_tasks, label_map)
        labelled = [item for item in pool.values() if item.labelled]
        summary = {
            "project": self.project,
            "reason": self.reason,
            "tasks": len(tasks),
            "image_tasks": len(pool),
            "region_tasks": len(region_tasks),
            "labelled_tasks": len(labelled),
        }
        previous = self.store.current()
        if not labelled:
            log.info("project %s: no usable annotation yet; nothing to train", self.project)
            return {**summary, "status": "no-labels", "version": previous,
                    "message": "no usable annotation yet", "skipped": self.skipped[:50],
                    "timings": self.timings}
        self.assign_holdout(pool)
        train_items = [item for item in pool.values() if not item.holdout]
        holdout = [item for item in pool.values() if item.holdout and item.labelled]

        fingerprint = self.fingerprint(label_map, pool)
        current_meta = self.current_meta(previous) if previous else None
        if current_meta is not None:
            current_meta = {**current_meta, "version": previous}
        reuse = (current_meta is not None and current_meta.get("fingerprint") == fingerprint
                 and tuple(current_meta.get("classes") or ()) == label_map.classes)
        if reuse:
            log.info("project %s: nothing changed since %s; reusing it", self.project, previous)
            version = previous
            student = served = state = None  # loaded only if there is work for them
            metrics = current_meta.get("metrics") or {}
            labelled_fraction = current_meta.get("labelled_fraction")
            trained = False
        else:
            t0 = time.monotonic()
            early = FirstVersion(self, label_map, pool, info, tasks, {
                "labelled_fraction": self.labelled_fraction(train_items),
                "project": self.project, "method": self.settings.method,
                "labelled_tasks": len([i for i in train_items if i.labelled]),
                "holdout_tasks": len(holdout)}) if self.settings.first_version else None
            student, teacher, metrics, state, config = self.train(
                label_map, train_items, holdout, current_meta, early)
            self.timed("train_s", t0)
            t0 = time.monotonic()
            self.phase("save")
            labelled_fraction = self.labelled_fraction(train_items)
            published = published_network(metrics)
            served = student if published == "student" else teacher
            version = self.store.save(served, list(label_map.classes), {
                "config": config.to_dict(),
                "metrics": metrics,
                "labelled_fraction": labelled_fraction,
                "train_state": state,
                "fingerprint": fingerprint,
                "project": self.project,
                "labelled_tasks": len([i for i in train_items if i.labelled]),
                "holdout_tasks": len(holdout),
                "method": config.method,
                "published": published,
            })
            self.timed("save_s", t0)
            log.info("project %s: saved %s (previous %s), the %s, holdout mIoU %s",
                     self.project, version, previous, published, _miou(metrics, published))
            trained = True

        t0 = time.monotonic()
        # a version acquires once: a retry (or a rerun with nothing new) adds no regions
        acquired = any((t.get("data") or {}).get("cycle_version") == version
                       for t in region_tasks)
        have = {int(t["id"]) for t in tasks if any(
            (p or {}).get("model_version") == version for p in t.get("predictions") or [])}
        open_regions = [int(r["task"]["id"]) for item in pool.values() for r in item.regions
                        if not r.get("labelled") and pick_annotation(r["task"]) is None]
        pushed = queued = 0
        if acquired and have.issuperset(list(pool) + open_regions):
            log.info("project %s: every task has a %s prediction and its regions are pushed; "
                     "nothing to do", self.project, version)
            regions = []
        else:
            if served is None:
                student, served, state = self.load_models(version)
            regions, pushed, queued = self.acquire(label_map, pool, student, served, version,
                                                   select=not acquired, have=have, state=state)
        self.timed("acquire_s", t0)
        t0 = time.monotonic()
        created = self.push_regions(label_map, regions, version)
        followed = self.follow_version(info, version, tasks)
        self.timed("push_s", t0)
        return {
            **summary,
            "status": "done",
            "version": version,
            "previous_version": previous,
            "trained": trained,
            "metrics": metrics,
            "labelled_fraction": labelled_fraction,
            "holdout_tasks": len(holdout),
            "regions_selected": len(regions),
            "regions_created": len(created),
            "region_ids": [r["data"]["region_id"] for r in regions],
            "predictions_pushed": pushed,
            "queued_pixels": queued,
            "project_model_version": followed,
            "skipped": self.skipped[:MAX_SKIPPED_REPORTED],
            "skipped_count": len(self.skipped),
            "timings": self.timings,
        }

    # ------------------------------------------------------------------ 1-2: tasks -> labels
    def split(self, tasks: list[dict], label_map: LabelMap):
        pool: dict[int, PoolItem] = {}
        regions: list[dict] = []
        for task in tasks:
            if is_region_task(task):
                regions.append(task)
                continue
            try:
                url = label_map.image_url(task)
            except KeyError as exc:
                self.skip(task.get("id"), str(exc).strip("'\""))
                continue
            pool[int(task["id"])] = PoolItem(task, url)
        return pool, regions

    def load_images(self, pool: dict[int, PoolItem]) -> None:
        def load(item: PoolItem):
            return self.fetcher.load(item.url, item.id)

        errors = []
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="s4al-cycle-img") as ex:
            futures = {ex.submit(load, item): item for item in pool.values()}
            for future, item in futures.items():
                try:
                    item.image = future.result()
                except Exception as exc:
                    errors.append(str(exc))
                    self.skip(item.id, f"image not loaded: {exc}")
        if errors and len(errors) == len(pool):
            raise CycleError(f"no task image could be loaded; first error: {errors[0]}")

    def build_labels(self, pool: dict[int, PoolItem], region_tasks: list[dict],
                     label_map: LabelMap) -> None:
        for item in pool.values():
            annotation = pick_annotation(item.task)
            if annotation is None:
                self.skip_unusable(item.task)
                continue
            mask = self.annotation_mask(item.id, annotation, label_map, item.image.shape[:2])
            if mask is None:
                continue
            item.mask, item.full = mask, True
            item.fingerprint.append(("a", item.id, annotation.get("id"),
                                     str(annotation.get("updated_at"))))
        for task in region_tasks:
            data = task.get("data") or {}
            try:
                source = int(data["source_task"])
                x, y, w, h = (int(data[k]) for k in ("x", "y", "w", "h"))
            except (KeyError, TypeError, ValueError):
                self.skip(task.get("id"), "region task data lacks integer source_task/x/y/w/h")
                continue
            item = pool.get(source)
            if item is None:
                self.skip(task.get("id"), f"source task {source} is not an image task of the "
                          "project (deleted?)")
                continue
            height, width = item.image.shape[:2]
            if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
                self.skip(task.get("id"), f"region {x},{y} {w}x{h} is outside the "
                          f"{width}x{height} image of task {source}")
                continue
            item.regions.append({"task": task, "x": x, "y": y, "w": w, "h": h})
            annotation = pick_annotation(task)
            if annotation is None:
                self.skip_unusable(task)
                continue
            mask = self.annotation_mask(task.get("id"), annotation, label_map, (height, width))
            if mask is None:
                continue
            inside = mask[y:y + h, x:x + w]
            if not (inside != IGNORE_INDEX).any():
                self.skip(task.get("id"), "nothing labelled inside the region",
                          annotation.get("id"))
                continue
            if item.mask is None:
                item.mask = np.full((height, width), IGNORE_INDEX, dtype=np.int64)
            target = item.mask[y:y + h, x:x + w]
            painted = inside != IGNORE_INDEX
            target[painted] = inside[painted]
            item.regions[-1]["labelled"] = True
            item.fingerprint.append(("r", int(task["id"]), annotation.get("id"),
                                     str(annotation.get("updated_at"))))

    def skip_unusable(self, task: dict) -> None:
        """Log annotations that exist but cannot count (cancelled / empty)."""
        for annotation in task.get("annotations") or []:
            if not isinstance(annotation, dict):
                continue
            reason = "cancelled (skipped)" if annotation.get("was_cancelled") else \
                "empty result" if not annotation.get("result") else None
            if reason:
                self.skip(task.get("id"), reason, annotation.get("id"))

    def annotation_mask(self, task_id, annotation: dict, label_map: LabelMap,
                        shape: tuple[int, int]) -> np.ndarray | None:
        problems: list[str] = []
        try:
            mask = annotation_to_mask(annotation.get("result") or [], label_map,
                                      shape[0], shape[1], problems)
        except Exception as exc:
            self.skip(task_id, f"annotation unreadable: {exc}", annotation.get("id"))
            return None
        for problem in problems:
            self.skipped.append({"task": task_id, "annotation": annotation.get("id"),
                                 "reason": problem})
        if not (mask != IGNORE_INDEX).any():
            self.skip(task_id, "no usable labelled pixel"
                      + (f" ({problems[0]})" if problems else " (empty result)"),
                      annotation.get("id"))
            return None
        return mask

    def assign_holdout(self, pool: dict[int, PoolItem]) -> None:
        fraction = float(self.settings.holdout_fraction)
        full = [item for item in pool.values() if item.full]
        if fraction <= 0 or len(full) < 2:
            return
        for item in full:
            item.holdout = holdout_score(self.project, item.id) < fraction
        if all(item.holdout for item in full):  # keep at least one to train on
            max(full, key=lambda i: holdout_score(self.project, i.id)).holdout = False

    def fingerprint(self, label_map: LabelMap, pool: dict[int, PoolItem]) -> str:
        parts = [label_map.classes, self.settings.method, self.settings.train_iterations,
                 self.settings.train_crop, float(self.settings.holdout_fraction)]
        for tid in sorted(pool):
            parts.append(sorted(pool[tid].fingerprint))
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    @staticmethod
    def labelled_fraction(items: list[PoolItem]) -> float:
        total = sum(i.image.shape[0] * i.image.shape[1] for i in items)
        done = sum(int((i.mask != IGNORE_INDEX).sum()) for i in items if i.mask is not None)
        return round(done / total, 6) if total else 0.0

    # ------------------------------------------------------------------ 3: training
    def current_meta(self, version: str) -> dict | None:
        """The current version's metadata: the store's JSON side file (cheap), else the
        checkpoint's own (a checkpoint copied in by hand)."""
        meta = self.store.meta(version)
        if meta is not None:
            return meta
        return self.checkpoint_meta(version)

    def checkpoint_meta(self, version: str) -> dict | None:
        """The metadata inside the checkpoint, `train_state` included."""
        try:
            import torch

            payload = torch.load(self.store.path(version), map_location="cpu",
                                 weights_only=True)
            return {**payload["meta"], "classes": payload["classes"]}
        except Exception as exc:
            log.warning("project %s: checkpoint %s unreadable (%s): training from the "
                        "backbone", self.project, version, exc)
            return None

    def load_models(self, version: str):
        model, meta = self.store.load(version, self.settings.resolve_device())
        state = meta.get("train_state") or {}
        student = model
        if state.get("student"):
            from model.network import DeepLabV3Plus

            student = DeepLabV3Plus(len(meta["classes"]), backbone_weights=None)
            student.load_state_dict(state["student"])
            student = student.to(self.settings.resolve_device()).eval()
        return student, model, state

    def train_config(self, warm: bool):
        from model.config import TrainConfig
        from model.precision import resolve_precision

        s = self.settings
        iterations = int(s.train_iterations)
        cold = 0 if warm else min(int(s.cold_start_iterations), iterations)
        backbone = None if s.backbone_weights == "none" else s.backbone_weights
        return TrainConfig(
            method=s.method,
            iterations=iterations,
            cold_start_iterations=cold,
            batch_labelled=int(s.train_batch_size),
            batch_unlabelled=int(s.train_batch_size),
            crop_size=(int(s.train_crop), int(s.train_crop)),
            eval_every=iterations,
            device=s.resolve_device(),
            backbone_weights=backbone,
            amp=s.amp,  # bf16 on CPUs with native bf16 and on recent GPUs (AMP=auto)
            channels_last=resolve_precision(s.amp, s.resolve_device()).enabled,
            time_budget_s=float(s.cycle_budget),  # iterations cut to fit (model.budget)
            cold_start_budget_s=float(s.cold_start_budget),
            # Balanced ClassMix starts after the first cycle (S4AL supplement S1)
            balanced_classmix=warm,
        )

    def train(self, label_map: LabelMap, train_items: list[PoolItem],
              holdout: list[PoolItem], current_meta: dict | None,
              early: Callable | None = None):
        from model.data import Sample
        from model.train import train_cycle

        classes = list(label_map.classes)
        init_state = None
        if current_meta is not None:
            if list(current_meta.get("classes") or []) == classes:
                state = current_meta.get("train_state")
                if state is None:  # not in the JSON side file: read the checkpoint
                    state = (self.checkpoint_meta(current_meta["version"]) or {}).get(
                        "train_state")
                init_state = state or None
            else:
                log.info("project %s: the label config's classes changed (%s -> %s): "
                         "training from the backbone", self.project,
                         current_meta.get("classes"), classes)
        config = self.train_config(warm=init_state is not None)
        labelled = [Sample(str(i.id), i.image, i.mask) for i in train_items if i.labelled]
        unlabelled = [Sample(str(i.id), i.image, i.mask) for i in train_items]
        val = [Sample(str(i.id), i.image, i.mask) for i in holdout]
        log.info("project %s: training %s, %d labelled / %d images, %d held out, %d "
                 "iterations (%d cold start), crop %d, %s", self.project, config.method,
                 len(labelled), len(unlabelled), len(val), config.iterations,
                 config.cold_start_iterations, self.settings.train_crop,
                 "warm start" if init_state else "from the backbone")
        self.phase("train", message=f"{len(labelled)} labelled, {len(unlabelled)} images")
        run = partial(train_cycle, on_cold_start_end=early)  # a first version, published early
        gpus = int(getattr(self.settings, "num_gpus", 1) or 1)
        if gpus > 1:  # NUM_GPUS: torchrun on this machine's GPUs (docs/DISTRIBUTED.md)
            from model.distributed import launch_train_cycle

            log.info("project %s: training on %d processes (torchrun)", self.project, gpus)
            run = partial(launch_train_cycle, gpus, log=log.info,
                          timeout_s=getattr(self.settings, "job_timeout", None))
        result = run(config, labelled, unlabelled, len(classes), val or None, init_state,
                     progress=self.progress)
        metrics = dict(result.metrics or {})
        if metrics:
            metrics["holdout_tasks"] = len(val)
        # the iterations that ran: CYCLE_BUDGET / COLD_START_BUDGET may have cut them
        # (a torchrun launch has no budget and keeps its state to itself)
        if (result.state or {}).get("config"):
            config = type(config).from_dict(result.state["config"])
        return result.student, result.teacher, metrics, result.state, config

    # ------------------------------------------------------------------ 5-6: acquire, predict
    def acquire(self, label_map: LabelMap, pool: dict[int, PoolItem], student, teacher,
                version: str, select: bool = True, have: set[int] | frozenset = frozenset(),
                state: dict | None = None) -> tuple[list[dict], int, int]:
        """One pass over the pool: a prediction of the served model (the teacher) for every
        task, pushed to Label Studio in chunks as it goes (tasks in `have` already hold
        one), and block scores (ACQUIRE_WITH's network) for the acquisition pool, queued
        pixels first when `state` (the version's train state) is a tsf method's. Returns
        the region tasks to import, the number of predictions pushed and of queued pixels
        in the acquisition pool."""
        from model.acquisition import BlockSelector, block_scores, get_heuristic, prioritise
        from model.inference import predict_probabilities
        from model.tsf import queue_refinement

        s = self.settings
        device = s.resolve_device()
        heuristic = get_heuristic(s.acquisition)
        scorer = teacher if s.acquire_with == "teacher" else student
        items = list(pool.values())
        per_cycle = int(s.regions_per_cycle)
        selector = None
        if per_cycle > 0 and select:
            selector = BlockSelector(per_image=int(s.regions_per_image))
        elif not select:
            log.info("project %s: no regions for %s (already in Label Studio, or a first "
                     "version)", self.project, version)
        outbox: list[dict] = []
        pushed = made = queued_pixels = 0
        refinement = queue_refinement(state, device) if selector is not None else None
        queue_weight = math.log(len(label_map.classes))  # entropy's range: queued first

        def send(prediction: dict, final: bool = False) -> None:
            nonlocal pushed
            if prediction and prediction["task"] not in have:
                outbox.append(prediction)
            if outbox and (final or len(outbox) >= PREDICTION_CHUNK):
                pushed += self.studio.import_predictions(self.project, outbox)
                outbox.clear()

        self.phase("predict", message=f"{len(items)} images")
        batch = max(1, int(s.predict_batch_size))
        amp = s.amp
        served = predict_probabilities(teacher.to(device), (i.image for i in items), batch,
                                       device, amp=amp)
        scored = served
        if scorer is not teacher and heuristic.needs_model and selector is not None:
            scored = predict_probabilities(scorer.to(device), (i.image for i in items), batch,
                                           device, amp=amp)
        for index, (item, probs) in enumerate(zip(items, served, strict=True)):
            score_probs = probs if scored is served else next(scored)
            confidence, classes = probs.max(dim=0)
            confidence, classes = confidence.numpy(), classes.numpy()
            send({
                "task": item.id,
                "result": mask_to_results(classes, label_map, confidence),
                "score": round(float(confidence.mean()), 4),
                "model_version": version,
            })
            made += 1
            for region in item.regions:
                if region.get("labelled") or pick_annotation(region["task"]) is not None:
                    continue
                send(self.region_prediction(int(region["task"]["id"]), label_map, classes,
                                            confidence, region, version))
                made += 1
            self.progress({"phase": "predict", "iteration": index + 1, "total": len(items)})
            if selector is None or item.full or item.holdout:
                continue
            block = s.region_size_for(item.image.shape[0])
            taken = np.zeros(item.image.shape[:2], dtype=bool)
            if item.mask is not None:
                taken |= item.mask != IGNORE_INDEX
            for region in item.regions:  # pushed before, annotated or not
                taken[region["y"]:region["y"] + region["h"],
                      region["x"]:region["x"] + region["w"]] = True
            if heuristic.needs_model:
                score_map = heuristic.compute_score(score_probs)
            else:
                score_map = heuristic.random_map(*item.image.shape[:2])
            if refinement is not None:
                queued = refinement(item.image, item.mask).queued[0].cpu().numpy() & ~taken
                queued_pixels += int(queued.sum())
                score_map = prioritise(score_map, queued, queue_weight)
            selector.add(index, block_scores(score_map, block, taken))
        send({}, final=True)
        chosen = selector.regions()[:per_cycle] if selector is not None else []
        regions = self.region_tasks(label_map, items, chosen, teacher, version)
        log.info("project %s: %d predictions made, %d pushed; %d regions selected (%s with "
                 "the %s)", self.project, made, pushed, len(regions), s.acquisition,
                 s.acquire_with)
        if refinement is not None:
            log.info("project %s: %d pixels queued by %s labelled first", self.project,
                     queued_pixels, refinement.config.method)
        return regions, pushed, queued_pixels

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

    def follow_version(self, info: dict, version: str, tasks: list[dict]) -> str | None:
        """Point the project's `model_version` at the new version. Label Studio's Data
        Manager shows and sorts by a prediction score only for predictions of that version
        (uncertainty order), and on connect it sets it to the backend's title, which no
        stored prediction carries. Leave it alone only when it names predictions that some
        other source stored in the project (the user chose those)."""
        current = info.get("model_version")
        if current == version:
            return current
        foreign = not _is_our_version(current) and any(
            (p or {}).get("model_version") == current
            for t in tasks for p in t.get("predictions") or [])
        if current and foreign:
            return current
        self.studio.set_model_version(self.project, version)
        log.info("project %s: project model_version %s -> %s", self.project, current, version)
        return version

    def push_regions(self, label_map: LabelMap, regions: list[dict], version: str) -> list[int]:
        if not regions:
            return []
        self.phase("push-regions", message=f"{len(regions)} regions")
        existing = {
            str((t.get("data") or {}).get("region_id"))
            for t in self.studio.iter_tasks(self.project, full=False) if is_region_task(t)
        }
        fresh = [r for r in regions if r["data"]["region_id"] not in existing]
        if len(fresh) < len(regions):
            log.info("project %s: %d of %d regions already in Label Studio (a retry?)",
                     self.project, len(regions) - len(fresh), len(regions))
        ids = self.studio.import_tasks(self.project, fresh)
        log.info("project %s: imported %d region tasks", self.project, len(fresh))
        return ids or [0] * len(fresh)


def _is_our_version(value: Any) -> bool:
    return isinstance(value, str) and bool(VERSION_NAME.fullmatch(value))


def published_network(metrics: dict) -> str:
    """The network a version serves: the student when it beats the teacher on the holdout,
    else the teacher (also with no holdout). Short or warm-started cycles can end with the
    EMA teacher behind its student (issue 12), so the holdout decides per version."""
    try:
        better = metrics["student"]["miou"] > metrics["teacher"]["miou"]
    except (KeyError, TypeError):
        return "teacher"
    return "student" if better else "teacher"


def _miou(metrics: dict, network: str = "teacher") -> str:
    try:
        return f"{metrics[network]['miou']:.3f}"
    except (KeyError, TypeError):
        return "n/a (no holdout)"


def run_cycle(settings: Any, project: int, *, reason: str = "",
              progress: Callable[[dict], None] | None = None, studio: Studio | None = None,
              fetcher=None) -> dict:
    """Run one active-learning cycle for `project`; returns a JSON-ready summary (status,
    version, metrics, regions created, predictions pushed, skipped annotations, timings)."""
    try:
        result = Cycle(settings, project, reason=reason, progress=progress, studio=studio,
                       fetcher=fetcher).run()
    except StudioError as exc:  # the job fails and retries; say plainly why
        log.warning("project %s: training could not reach Label Studio: %s", project, exc)
        raise
    history.record_cycle(settings, project, result)  # the dashboard's learning curve
    return result
