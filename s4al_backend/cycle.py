"""One active-learning cycle of a Label Studio project, stateless: Label Studio is the truth.

`run_cycle(settings, project)`:

1. **Read** the project (label config) and every task with its annotations and the versions
   of its predictions (never the predictions: `studio.Studio.iter_tasks`), paged. Nothing
   is kept between cycles, so missed webhooks lose nothing. **Images**: each task image is
   fetched once into the disk cache and checked; afterwards every step reads it from
   there per batch (`pool_images`), so memory does not grow with the pool.
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
6. **Predictions are pushed**, not left for Label Studio to fetch: every pool task without
   a full annotation and every open region task gets a prediction of the new version
   (result + score = mean confidence; `acquire.prediction_targets`: fully annotated tasks
   need no pre-label), sent in chunks (acquire.PREDICTION_CHUNK) while the pool is scored
   (memory stays bounded; a retry skips the tasks that already hold one). Scoring and
   pushing go chunk by chunk (SCORE_CHUNK images), in worker mode also on other free
   workers (`chunk_jobs`). Why push: the
   cycle computes these probabilities anyway to score the pool; Label Studio asks
   `/predict` only lazily (a task opened, or a manual "retrieve predictions"); and the Data
   Manager's sort by prediction score (uncertainty order) needs a score of the current
   version on every task. Because the version pushed equals the one `/setup` answers,
   Label Studio does not ask `/predict` again for these tasks. The project's own
   `model_version` then moves to the new version (the Data Manager scores and sorts only
   that version's predictions), unless it names predictions another source stored in the
   project. Last, this backend's versions beyond the newest PREDICTION_VERSIONS lose their
   predictions (`prune`), so Label Studio's database holds at most that many per task.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from . import history
from . import store as store_module
from .acquire import Acquisition, prediction_targets
from .chunk_jobs import chunk_runner
from .first_version import FirstVersion
from .labels import IGNORE_INDEX, LabelMap, annotation_to_mask
from .pool import PoolItem, holdout_score, integer_id, is_region_task, pick_annotation
from .pool_images import PoolImages
from .prune import is_our_version, prune_predictions
from .settings import Settings
from .studio import Studio, StudioError, task_model_versions

if TYPE_CHECKING:  # images.py is imported when a cycle fetches
    from .images import ImageFetcher

log = logging.getLogger(__name__)

MAX_SKIPPED_REPORTED = 50
STEPS = ("read", "images", "train", "score", "push")  # done / total of each in /status
READ_STEP_EVERY = 500  # tasks between two progress updates of the read step


class CycleError(RuntimeError):
    """The cycle cannot go on (the message says why); the job fails and is retried."""


@dataclass
class Outcome:
    """The version a cycle serves: trained now (with its networks and train state) or the
    current one reused (networks loaded later, if needed)."""

    version: str
    metrics: dict
    labelled_fraction: float | None
    holdout_tasks: int
    trained: bool
    student: Any = None
    served: Any = None  # the network the version serves (published_network)
    state: dict | None = None


class Cycle:
    """One cycle; `run()` does steps 1-6. Built by `run_cycle`; tests may inject the
    Label Studio client and the image fetcher."""

    def __init__(self, settings: Settings, project: int, *, reason: str = "",
                 progress: Callable[[dict], None] | None = None,
                 studio: Studio | None = None, fetcher: ImageFetcher | None = None):
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

    def step(self, name: str, done: int, total: int | None) -> None:
        """One of STEPS moved on (jobs_base.ProgressReporter keeps them for /status)."""
        self.progress({"step": {"name": name, "done": done, "total": total}})

    def train_progress(self, update: dict) -> None:
        """Training's progress, with the train step's iteration / total beside it."""
        if isinstance(update.get("iteration"), int) and isinstance(update.get("total"), int):
            update = {**update, "step": {"name": "train", "done": update["iteration"],
                                         "total": update["total"]}}
        self.progress(update)

    def skip(self, task_id, reason: str, annotation=None) -> None:
        entry = {"task": task_id, "reason": reason}
        if annotation is not None:
            entry["annotation"] = annotation
        log.warning("project %s: task %s%s skipped: %s", self.project, task_id,
                    f" annotation {annotation}" if annotation is not None else "", reason)
        self.skipped.append(entry)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to `timings[name]` (seconds, rounded to ms)."""
        started = time.monotonic()
        try:
            yield
        finally:
            elapsed = self.timings.get(name, 0.0) + time.monotonic() - started
            self.timings[name] = round(elapsed, 3)

    # ------------------------------------------------------------------ the cycle
    def run(self) -> dict:
        with self.timed("read_s"):
            info, label_map, tasks, pool, region_tasks = self.read()
        with self.timed("images_s"):
            pool = self.images(pool)
        self.build_labels(pool, region_tasks, label_map)
        summary = {
            "project": self.project,
            "reason": self.reason,
            "tasks": len(tasks),
            "image_tasks": len(pool),
            "region_tasks": len(region_tasks),
            "labelled_tasks": sum(item.labelled for item in pool.values()),
        }
        previous = self.store.current()
        if not summary["labelled_tasks"]:
            log.info("project %s: no usable annotation yet; nothing to train", self.project)
            return {**summary, "status": "no-labels", "version": previous,
                    "message": "no usable annotation yet", "skipped": self.skipped[:50],
                    "timings": self.timings}
        self.assign_holdout(pool)
        outcome = self.train_or_reuse(label_map, pool, previous, info, tasks)
        with self.timed("acquire_s"):
            regions, pushed, queued = self.predict_and_acquire(label_map, pool, tasks,
                                                               region_tasks, outcome)
        with self.timed("push_s"):
            created = self.push_regions(label_map, regions, outcome.version)
            followed = self.follow_version(info, outcome.version, tasks)
            pruned = prune_predictions(self.studio, self.project,
                                       int(self.settings.prediction_versions),
                                       {outcome.version, followed or outcome.version})
        return {
            **summary,
            "status": "done",
            "version": outcome.version,
            "previous_version": previous,
            "trained": outcome.trained,
            "metrics": outcome.metrics,
            "labelled_fraction": outcome.labelled_fraction,
            "holdout_tasks": outcome.holdout_tasks,
            "regions_selected": len(regions),
            "regions_created": len(created),
            "region_ids": [r["data"]["region_id"] for r in regions],
            "predictions_pushed": pushed,
            "queued_pixels": queued,
            "project_model_version": followed,
            "prediction_versions_deleted": pruned,
            "skipped": self.skipped[:MAX_SKIPPED_REPORTED],
            "skipped_count": len(self.skipped),
            "timings": self.timings,
        }

    def read(self) -> tuple[dict, LabelMap, list[dict], dict[int, PoolItem], list[dict]]:
        """1: the project, its label config and every task, split into image tasks (the
        pool) and region tasks."""
        self.phase("read", message="reading the project from Label Studio")
        info = self.studio.project(self.project)
        try:
            label_map = LabelMap.from_config(info.get("label_config") or "")
        except ValueError as exc:
            raise CycleError(f"project {self.project}: {exc}") from exc
        tasks = []
        for task in self.studio.iter_tasks(self.project):
            tasks.append(task)
            if len(tasks) % READ_STEP_EVERY == 0:
                self.step("read", len(tasks), None)
        self.step("read", len(tasks), len(tasks))
        pool, region_tasks = self.split(tasks, label_map)
        return info, label_map, tasks, pool, region_tasks

    def images(self, pool: dict[int, PoolItem]) -> dict[int, PoolItem]:
        """The pool items whose image loaded (into the disk cache: `pool_images`)."""
        self.phase("images", message=f"{len(pool)} images")
        self.step("images", 0, len(pool))
        errors: list[str] = []

        def failed(item: PoolItem, exc: Exception) -> None:
            errors.append(str(exc))
            self.skip(item.id, f"image not loaded: {exc}")

        PoolImages(self.fetcher).prepare(pool.values(), failed, lambda done: self.step(
            "images", done, len(pool)))
        if errors and len(errors) == len(pool):
            raise CycleError(f"no task image could be loaded; first error: {errors[0]}")
        pool = {tid: item for tid, item in pool.items() if item.shape is not None}
        if not pool:
            raise CycleError(f"project {self.project}: no task image could be loaded")
        return pool

    def train_or_reuse(self, label_map: LabelMap, pool: dict[int, PoolItem],
                       previous: str | None, info: dict, tasks: list[dict]) -> Outcome:
        """3-4: train and save a new version, or reuse the current one when nothing
        changed since it (same annotations, classes, method; e.g. a retry after a failed
        push). With FIRST_VERSION, the cold start's network is published as a version as
        soon as the cold start ends (`first_version.FirstVersion`; project and tasks for
        pointing the project at it)."""
        train_items = [item for item in pool.values() if not item.holdout]
        holdout = [item for item in pool.values() if item.holdout and item.labelled]
        fingerprint = self.fingerprint(label_map, pool)
        current_meta = self.current_meta(previous) if previous else None
        if current_meta is not None:
            current_meta = {**current_meta, "version": previous}
        if (current_meta is not None and current_meta.get("fingerprint") == fingerprint
                and tuple(current_meta.get("classes") or ()) == label_map.classes):
            log.info("project %s: nothing changed since %s; reusing it", self.project, previous)
            # networks loaded only if there is work for them
            return Outcome(previous, current_meta.get("metrics") or {},
                           current_meta.get("labelled_fraction"), len(holdout), trained=False)
        early = FirstVersion(self, label_map, pool, info, tasks, {
            "labelled_fraction": self.labelled_fraction(train_items),
            "project": self.project, "method": self.settings.method,
            "labelled_tasks": len([i for i in train_items if i.labelled]),
            "holdout_tasks": len(holdout)}) if self.settings.first_version else None
        with self.timed("train_s"):
            student, teacher, metrics, state, config = self.train(
                label_map, train_items, holdout, current_meta, early)
        with self.timed("save_s"):
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
        log.info("project %s: saved %s (previous %s), the %s, holdout mIoU %s", self.project,
                 version, previous, published, _miou(metrics, published))
        return Outcome(version, metrics, labelled_fraction, len(holdout), trained=True,
                       student=student, served=served, state=state)

    def predict_and_acquire(self, label_map: LabelMap, pool: dict[int, PoolItem],
                            tasks: list[dict], region_tasks: list[dict],
                            outcome: Outcome) -> tuple[list[dict], int, int]:
        """5-6, unless done already: a version acquires once (a retry, or a rerun with
        nothing new, adds no regions) and predicts each task once."""
        version = outcome.version
        acquired = any((t.get("data") or {}).get("cycle_version") == version
                       for t in region_tasks)
        have = {int(t["id"]) for t in tasks if version in task_model_versions(t)}
        if acquired and have.issuperset(prediction_targets(pool)):
            log.info("project %s: every task has a %s prediction and its regions are pushed; "
                     "nothing to do", self.project, version)
            return [], 0, 0
        student, served, state = outcome.student, outcome.served, outcome.state
        if served is None:
            student, served, state = self.store.networks(version, self.settings.resolve_device())
        acquisition = Acquisition(self.settings, self.studio, self.project, self.progress,
                                  chunk_runner(self.settings, self.project))
        return acquisition.run(label_map, pool, student, served, version, select=not acquired,
                               have=have, state=state)

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

    def build_labels(self, pool: dict[int, PoolItem], region_tasks: list[dict],
                     label_map: LabelMap) -> None:
        for item in pool.values():
            annotation = pick_annotation(item.task)
            if annotation is None:
                self.skip_unusable(item.task)
                continue
            mask = self.annotation_mask(item.id, annotation, label_map, item.shape)
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
            height, width = item.shape
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
                "empty result" if not annotation.get("result") else \
                "not an integer annotation id (skipped)" if not integer_id(annotation) \
                else None
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
        total = sum(i.shape[0] * i.shape[1] for i in items)
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
        # pool items are samples whose image is read per batch (pool_images)
        labelled = [i for i in train_items if i.labelled]
        unlabelled, val = list(train_items), list(holdout)
        log.info("project %s: training %s, %d labelled / %d images, %d held out, %d "
                 "iterations (%d cold start), crop %d, %s", self.project, config.method,
                 len(labelled), len(unlabelled), len(val), config.iterations,
                 config.cold_start_iterations, self.settings.train_crop,
                 "warm start" if init_state else "from the backbone")
        self.phase("train", message=f"{len(labelled)} labelled, {len(unlabelled)} images")
        run = partial(train_cycle, on_cold_start_end=early)  # a first version, published early
        gpus = int(getattr(self.settings, "num_gpus", 1) or 1)
        if gpus > 1:  # NUM_GPUS: torchrun on this machine's GPUs (docs/DISTRIBUTED.md)
            from model.data import Sample
            from model.launch import launch_train_cycle

            log.info("project %s: training on %d processes (torchrun)", self.project, gpus)
            # the launch hands the ranks a payload file of plain samples, images decoded
            labelled, unlabelled, val = ([Sample(i.name, i.image, i.mask) for i in part]
                                         for part in (labelled, unlabelled, val))
            run = partial(launch_train_cycle, gpus, log=log.info,
                          timeout_s=getattr(self.settings, "job_timeout", None))
        result = run(config, labelled, unlabelled, len(classes), val or None, init_state,
                     progress=self.train_progress)
        metrics = dict(result.metrics or {})
        if metrics:
            metrics["holdout_tasks"] = len(val)
        # the iterations that ran: CYCLE_BUDGET / COLD_START_BUDGET may have cut them
        # (a torchrun launch has no budget and keeps its state to itself)
        if (result.state or {}).get("config"):
            config = type(config).from_dict(result.state["config"])
        return result.student, result.teacher, metrics, result.state, config

    def follow_version(self, info: dict, version: str, tasks: list[dict]) -> str | None:
        """Point the project's `model_version` at the new version. Label Studio's Data
        Manager shows and sorts by a prediction score only for predictions of that version
        (uncertainty order), and on connect it sets it to the backend's title, which no
        stored prediction carries. Leave it alone only when it names predictions that some
        other source stored in the project (the user chose those)."""
        current = info.get("model_version")
        if current == version:
            return current
        foreign = not is_our_version(current) and any(
            current in task_model_versions(t) for t in tasks)
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


def run_cycle(settings: Settings, project: int, *, reason: str = "",
              progress: Callable[[dict], None] | None = None, studio: Studio | None = None,
              fetcher: ImageFetcher | None = None) -> dict:
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
