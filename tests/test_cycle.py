"""One active-learning cycle against a real local HTTP server playing Label Studio
(tests/fake_studio.py) on the CamVid fixture (8 train images, 120x160), with tiny training
settings: the new version, its metrics, the region tasks and the predictions; the
in-process queue; bad annotations; Label Studio refusing; a SIGKILLed worker."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from s4al_backend import jobs
from s4al_backend.acquire import rectangle
from s4al_backend.cycle import Cycle, run_cycle
from s4al_backend.labels import IGNORE_INDEX, LabelMap, mask_to_results
from s4al_backend.pool import region_id
from s4al_backend.settings import Settings
from s4al_backend.store import project_store
from s4al_backend.studio import StudioError
from tests import test_jobs
from tests.fake_studio import FakeStudio, camvid_project
from tests.test_jobs import Worker, _require_redis, wait_for

redis_env = test_jobs.redis_env  # the fixture: a fresh queue name and key prefix

CAMVID = Path(__file__).parent / "fixtures" / "camvid"
NAMES = sorted(p.name for p in (CAMVID / "train").iterdir())
ANNOTATED = NAMES[:5]
REGIONS_PER_CYCLE = 5
TINY = {
    "TRAIN_ITERATIONS": "4",
    "COLD_START_ITERATIONS": "2",
    "TRAIN_CROP": "64",
    "TRAIN_BATCH_SIZE": "2",
    "HOLDOUT_FRACTION": "0.3",
    "REGIONS_PER_IMAGE": "2",
    "REGIONS_PER_CYCLE": str(REGIONS_PER_CYCLE),
    "DEVICE": "cpu",
    "BACKBONE_WEIGHTS": "none",
    "TORCH_THREADS": "1",
    "FIRST_VERSION": "false",  # one version per cycle (tests/test_first_version.py)
}


@pytest.fixture
def studio():
    with FakeStudio() as fake:
        yield fake


def env_for(studio: FakeStudio, tmp_path: Path, **extra) -> dict:
    return {
        "LABEL_STUDIO_URL": studio.url,
        "LABEL_STUDIO_API_KEY": studio.api_key,
        "MODEL_DIR": str(tmp_path / "models"),
        "IMAGE_CACHE_DIR": str(tmp_path / "cache"),
        **TINY,
        **extra,
    }


def region_tasks(studio: FakeStudio, project: int) -> list[dict]:
    return [t for t in studio.project_tasks(project) if "region_id" in t["data"]]


def labelled_pixels(mask: np.ndarray) -> int:
    return int((mask != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------- end to end
def test_one_cycle_end_to_end(studio, tmp_path):
    from s4al_backend.app import create_app

    project, ids, samples = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    settings = Settings.from_env(env_for(studio, tmp_path))
    label_map = LabelMap.from_config(studio.projects[project]["label_config"])
    updates: list[dict] = []

    started = time.monotonic()
    result = run_cycle(settings, project, reason="test", progress=updates.append)
    seconds = time.monotonic() - started
    print(f"cycle 1: {seconds:.1f} s, timings {result['timings']}")

    store = project_store(settings.model_dir, project, settings.keep_versions)
    version = result["version"]
    assert result["status"] == "done" and result["trained"] is True
    assert re.fullmatch(r"v0001-\d{8}-\d{6}", version) and store.current() == version
    assert result["labelled_tasks"] == len(ANNOTATED)
    # metrics on the held-out annotated tasks, also in the checkpoint's metadata
    assert result["holdout_tasks"] >= 1
    assert 0.0 <= result["metrics"]["teacher"]["miou"] <= 1.0
    assert len(result["metrics"]["teacher"]["iou"]) == len(label_map.classes)
    served, meta = store.load(version)
    assert meta["metrics"] == result["metrics"] and meta["version"] == version
    # the version serves whichever network scored higher on the holdout
    scores = {name: meta["metrics"][name]["miou"] for name in ("teacher", "student")}
    winner = "student" if scores["student"] > scores["teacher"] else "teacher"
    assert meta["published"] == winner
    state = meta["train_state"]
    weights = state["student"] if winner == "student" else state["teacher"]["model"]
    assert all(torch.equal(served.state_dict()[k].cpu(), v.cpu()) for k, v in weights.items())
    assert meta["classes"] == list(label_map.classes) and meta["train_state"]
    assert 0 < meta["labelled_fraction"] < 1
    phases = {u.get("phase") for u in updates}
    assert {"read", "images", "cold-start", "s4al", "save", "predict"} <= phases

    # region tasks: the chosen blocks of images without a full annotation
    regions = region_tasks(studio, project)
    assert len(regions) == result["regions_created"] == REGIONS_PER_CYCLE
    unannotated = {ids[name] for name in NAMES if name not in ANNOTATED}
    block = settings.region_size_for(120)
    for task in regions:
        data = task["data"]
        assert data["source_task"] in unannotated
        source = studio.tasks[data["source_task"]]
        assert data["image"] == source["data"]["image"]
        assert data["region_id"] == region_id(data["source_task"], data["x"], data["y"],
                                              data["w"], data["h"])
        assert (data["w"], data["h"]) == (block, block)
        assert 0 <= data["x"] <= 160 - block and 0 <= data["y"] <= 120 - block
        assert data["cycle_version"] == version
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == version and 0 <= prediction["score"] <= 1
        brush = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        rects = [r for r in prediction["result"] if r["type"] == "rectangle"]
        assert brush and len(rects) == 1 and rects[0]["from_name"] == "region"
        assert rects[0]["value"]["x"] == pytest.approx(100 * data["x"] / 160)
        painted = LabelMap.from_config(studio.projects[project]["label_config"])
        from s4al_backend.labels import annotation_to_mask

        mask = annotation_to_mask(brush, painted, 120, 160)
        inside = np.zeros((120, 160), bool)
        inside[data["y"]:data["y"] + data["h"], data["x"]:data["x"] + data["w"]] = True
        assert (mask[~inside] == IGNORE_INDEX).all() and (mask[inside] != IGNORE_INDEX).all()
    assert len({t["data"]["region_id"] for t in regions}) == len(regions)

    # a prediction of the new version on every image task without a full annotation
    for name, tid in ids.items():
        versions = [p["model_version"] for p in studio.tasks[tid]["predictions"]]
        assert versions == ([] if name in ANNOTATED else [version])
        if name not in ANNOTATED:
            assert studio.tasks[tid]["predictions"][0]["score"] is not None
    assert result["predictions_pushed"] == len(ids) - len(ANNOTATED)

    # the service shows the new version in /setup (what makes Label Studio use it)
    client = create_app(settings).test_client()
    setup = client.post("/setup", json={"project": f"{project}.1700000000",
                                        "schema": studio.projects[project]["label_config"]})
    assert setup.get_json()["model_version"] == version

    # annotate two region tasks with the whole ground truth: only the regions count
    by_name = {s.name: s for s in samples}
    name_of = {tid: name for name, tid in ids.items()}
    expected = 0
    for task in regions[:2]:
        data = task["data"]
        truth = by_name[name_of[data["source_task"]]].mask
        studio.add_annotation(task["id"], mask_to_results(truth, label_map))
        expected += labelled_pixels(
            truth[data["y"]:data["y"] + data["h"], data["x"]:data["x"] + data["w"]])
    # the Data Manager scores only the project's model_version: it follows each version
    assert studio.projects[project]["model_version"] == version
    result2 = run_cycle(settings, project, reason="two regions annotated")
    assert studio.projects[project]["model_version"] == result2["version"]
    print(f"cycle 2: timings {result2['timings']}")
    assert result2["version"] != version and store.current() == result2["version"]
    assert result2["previous_version"] == version and result2["trained"]
    _, meta2 = store.load(result2["version"])
    assert meta2["config"]["cold_start_iterations"] == 0  # warm start
    train_pixels = sum(120 * 160 for name in NAMES) - 120 * 160 * result["holdout_tasks"]
    gained = (meta2["labelled_fraction"] - meta["labelled_fraction"]) * train_pixels
    assert gained == pytest.approx(expected, abs=1)
    regions2 = region_tasks(studio, project)
    assert len(regions2) == 2 * REGIONS_PER_CYCLE
    assert len({t["data"]["region_id"] for t in regions2}) == len(regions2)
    # open region tasks of the first cycle got the new version's prediction
    for task in regions[2:]:
        assert [p["model_version"] for p in studio.tasks[task["id"]]["predictions"]] == \
            [version, result2["version"]]


def test_bad_annotations_are_skipped_and_the_rest_train(studio, tmp_path):
    project, ids, samples = camvid_project(studio, CAMVID, annotated=ANNOTATED[:2])
    label_map = LabelMap.from_config(studio.projects[project]["label_config"])
    good = mask_to_results(samples[0].mask, label_map)
    unknown = [dict(good[0], value={**good[0]["value"], "brushlabels": ["Unicorn"]})]
    small = np.zeros((60, 80), dtype=np.int64)
    wrong_size = mask_to_results(small, label_map)
    studio.add_annotation(ids[NAMES[2]], unknown)
    studio.add_annotation(ids[NAMES[3]], [])
    studio.add_annotation(ids[NAMES[4]], wrong_size)
    url = studio.tasks[ids[NAMES[5]]]["data"]["image"]
    outside = studio.add_task(project, {"image": url, "source_task": ids[NAMES[5]], "x": 150,
                                        "y": 0, "w": 30, "h": 10, "region_id": "bad"})
    orphan = studio.add_task(project, {"image": url, "source_task": 999, "x": 0, "y": 0,
                                       "w": 10, "h": 10, "region_id": "orphan"})
    settings = Settings.from_env(env_for(studio, tmp_path))
    cycle = Cycle(settings, project)
    tasks = cycle.studio.tasks(project)
    pool, regions = cycle.split(tasks, label_map)
    pool = cycle.images(pool)
    cycle.build_labels(pool, regions, label_map)

    assert sorted(i.id for i in pool.values() if i.labelled) == [ids[n] for n in ANNOTATED[:2]]
    result = {"skipped": cycle.skipped}
    reasons = {(s["task"], s["reason"]) for s in result["skipped"]}
    text = json.dumps(result["skipped"])
    assert "unknown label 'Unicorn'" in text
    assert (ids[NAMES[3]], "empty result") in reasons
    assert "does not match the image's 160x120" in text
    assert any(t == outside and "outside" in r for t, r in reasons)
    assert any(t == orphan and "source task 999" in r for t, r in reasons)


def test_no_annotation_yet_trains_nothing(studio, tmp_path):
    project, _, _ = camvid_project(studio, CAMVID)
    settings = Settings.from_env(env_for(studio, tmp_path))
    result = run_cycle(settings, project)
    assert result["status"] == "no-labels" and result["version"] is None
    assert not region_tasks(studio, project)


def test_project_model_version_naming_foreign_predictions_is_left_alone(studio, tmp_path):
    """The user chose another source's predictions in the Data Manager: keep showing them."""
    project, ids, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    foreign = next(tid for name, tid in ids.items() if name not in ANNOTATED)
    studio.add_prediction(foreign, {"result": [], "score": 0.5, "model_version": "sam-1"})
    studio.projects[project]["model_version"] = "sam-1"
    settings = Settings.from_env(env_for(studio, tmp_path))
    result = run_cycle(settings, project)
    assert result["status"] == "done"
    assert result["project_model_version"] == "sam-1"
    assert studio.projects[project]["model_version"] == "sam-1"
    versions = [p["model_version"] for p in studio.tasks[foreign]["predictions"]]
    assert versions == ["sam-1", result["version"]]  # ours pushed beside it


# --------------------------------------------------------------------------- Label Studio failing
def test_label_studio_refusing_fails_with_its_message(studio, tmp_path):
    project, _, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    settings = Settings.from_env(env_for(studio, tmp_path))
    studio.fail(401, prefix="/api/")
    with pytest.raises(StudioError, match=r"refused GET api/projects/\d+/ \(401\)"):
        run_cycle(settings, project)
    studio.clear_failures()
    studio.fail(502, prefix="/api/tasks/")
    with pytest.raises(StudioError, match=r"\(502\).*injected 502"):
        run_cycle(settings, project)
    studio.clear_failures()
    studio.stop()
    with pytest.raises(StudioError, match="unreachable"):
        run_cycle(settings, project)


def test_retry_after_a_lost_import_reply_does_not_duplicate_regions(studio, tmp_path):
    project, ids, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    settings = Settings.from_env(env_for(studio, tmp_path))
    # Label Studio creates the region tasks but the reply is lost
    studio.fail(500, prefix=f"/api/projects/{project}/import$", method="POST", times=1,
                after=True)
    with pytest.raises(StudioError, match=r"\(500\)"):
        run_cycle(settings, project)
    store = project_store(settings.model_dir, project)
    version = store.current()
    assert version is not None  # saved before the push
    assert len(region_tasks(studio, project)) == REGIONS_PER_CYCLE

    retry = run_cycle(settings, project, reason="retry")

    assert retry["version"] == version and retry["trained"] is False  # nothing retrained
    assert retry["regions_created"] == 0
    assert len(region_tasks(studio, project)) == REGIONS_PER_CYCLE  # no duplicates
    for name, tid in ids.items():  # the predictions the failed attempt never pushed
        assert [p["model_version"] for p in studio.tasks[tid]["predictions"]] == \
            ([] if name in ANNOTATED else [version])


# --------------------------------------------------------------------------- the queues
def test_in_process_queue_runs_the_same_cycle_and_retries(studio, tmp_path):
    """No REDIS_URL: the webhook queues the real cycle in a background thread. The first
    attempt meets a 401 from Label Studio, fails with that message, and is retried."""
    from s4al_backend.app import create_app

    project, _, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    settings = Settings.from_env(env_for(studio, tmp_path, TRAIN_AFTER_ANNOTATIONS="2"))
    jobs.reset_jobs()
    local = jobs.LocalJobs(settings, retry_intervals=(0.3,))
    jobs._instances[(settings.redis_url or "", settings.queue_name,
                     str(settings.model_dir))] = local
    try:
        client = create_app(settings).test_client()
        studio.fail(401, prefix="/api/", times=1)
        body = {"action": "ANNOTATION_CREATED", "project": {"id": project},
                "annotation": {"id": 1}, "task": {"id": 1}}
        assert client.post("/webhook", json=body).get_json()["status"] == "counted"
        reply = client.post("/webhook", json=body).get_json()
        assert reply["status"] == "queued"
        failed = wait_for(lambda: (local.status(project)["last"] or {}).get("status") ==
                          "failed" and local.status(project)["last"], 30, "the 401 failure")
        assert "(401)" in failed["error"] and failed["will_retry"]
        assert local.wait_idle(120)
        status = client.get(f"/status?project={project}").get_json()
        last = status["training"]["last"]
        assert last["status"] == "done", last
        assert status["model_version"] == last["version"]
        assert status["metrics"]["teacher"]["miou"] >= 0
        assert status["training"]["queue"] == "in-process"
        assert len(region_tasks(studio, project)) == REGIONS_PER_CYCLE
    finally:
        jobs.reset_jobs()


def test_sigkilled_worker_leaves_the_version_unchanged(studio, tmp_path, redis_env,
                                                       monkeypatch):
    """A worker killed mid-training: the current version stays (no half-written checkpoint
    is ever current), the killed job ends up failed, the next cycle runs."""
    from rq import Queue
    from rq.job import Job
    from rq.registry import StartedJobRegistry
    from rq.worker import SimpleWorker

    from model.network import DeepLabV3Plus

    project, _, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED[:3])
    env = {**env_for(studio, tmp_path), **redis_env}
    settings = Settings.from_env(env)
    store = project_store(settings.model_dir, project, settings.keep_versions)
    label_map = LabelMap.from_config(studio.projects[project]["label_config"])
    first = store.save(DeepLabV3Plus(len(label_map.classes)), list(label_map.classes),
                       {"metrics": {}})

    redis_jobs = jobs.RedisJobs(settings, lock_ttl=2.0, retry_intervals=())
    killed_id = redis_jobs.request_cycle(project, "long")["job_id"]
    long_run = Worker(env, f"{settings.queue_name}-long", tmp_path / "long.log",
                      extra_env={"TRAIN_ITERATIONS": "100000"})
    try:
        def training() -> bool:
            running = redis_jobs.status(project)["running"] or {}
            progress = running.get("progress") or {}
            return progress.get("phase") in ("cold-start", "s4al") and \
                progress.get("iteration", 0) >= 1

        wait_for(training, 120, "the job to train", interval=0.2)
    finally:
        long_run.stop(signal.SIGKILL)
    assert store.current() == first and store.versions() == [first]
    store.load(first)  # still a whole checkpoint
    # nothing of the killed cycle on disk: no other version, no temp file
    assert not [p for p in (store.root / "versions").iterdir()
                if not p.name.startswith(f"{first}.")]

    # the lock dies with the worker; the next cycle is queued and runs (here in a
    # SimpleWorker inside the test process, which has torch imported already)
    wait_for(lambda: redis_jobs.status(project)["running"] is None, 10, "the lock to expire")
    assert redis_jobs.request_cycle(project, "after the kill")["status"] == "queued"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    connection = _require_redis()
    queue = Queue(settings.queue_name, connection=connection)
    SimpleWorker([queue], connection=connection, name=f"{settings.queue_name}-next").work(
        burst=True, with_scheduler=False)
    last = redis_jobs.status(project)["last"]
    assert last["status"] == "done", last
    assert store.current() == last["version"] != first

    # RQ marks the killed job failed once its execution has expired
    StartedJobRegistry(settings.queue_name, connection=connection).cleanup(
        timestamp=time.time() + 10**6)
    status = Job.fetch(killed_id, connection=connection).get_status()
    assert getattr(status, "value", status) == "failed"


def test_cycle_region_ids_are_deterministic():
    assert region_id(12, 30, 60, 10, 10) == "t12-x30-y60-w10-h10"
    assert rectangle(LabelMap.from_config(
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        '<Label value="A"/></BrushLabels><RectangleLabels name="region" toName="image">'
        '<Label value="Region"/></RectangleLabels></View>'), (120, 160), 16, 12, 8, 6)[
        "value"] == {"x": 10.0, "y": 10.0, "width": 5.0, "height": 5.0, "rotation": 0,
                     "rectanglelabels": ["Region"]}


def test_tsf_plar_cycle_acquires_queued_pixels_first(studio, tmp_path):
    """METHOD=tsf-plar: the version keeps its EMD and PLAR, and the regions it pushes cover
    the pixels PLAR queues (recomputed here from the saved train state)."""
    from model.data import read_image
    from model.refinement import PoolRefinement

    project, ids, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    settings = Settings.from_env(env_for(studio, tmp_path, METHOD="tsf-plar"))
    result = run_cycle(settings, project, reason="test")
    assert result["status"] == "done" and result["trained"]
    _, meta = project_store(settings.model_dir, project).load(result["version"])
    assert meta["method"] == "tsf-plar" and meta["train_state"]["step"]["refiner"]

    refinement = PoolRefinement(meta["train_state"])
    queued = {tid: refinement(read_image(CAMVID / "train" / name)).queued[0].numpy()
              for name, tid in ids.items() if name not in ANNOTATED}
    assert result["queued_pixels"] == sum(int(q.sum()) for q in queued.values()) > 0
    log_c = np.log(len(LabelMap.from_config(studio.projects[project]["label_config"]).classes))
    shares = []
    for task in region_tasks(studio, project):
        d = task["data"]
        share = queued[d["source_task"]][d["y"]:d["y"] + d["h"], d["x"]:d["x"] + d["w"]].mean()
        # the block's score is its mean entropy plus log C per queued pixel
        assert d["uncertainty"] >= log_c * share - 1e-5
        shares.append(share)
    everywhere = np.mean([q.mean() for q in queued.values()])
    assert max(shares) > 0 and np.mean(shares) > everywhere


def test_cycle_never_sends_the_key_to_a_host_hidden_in_task_data(studio, tmp_path):
    from tests.service_helpers import FileServer

    project, ids, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED[:2])
    host = studio.url.split("://", 1)[1]
    with FileServer() as foreign:
        url = f"http://{foreign.host}\\@{host}" + studio.tasks[ids[NAMES[0]]]["data"]["image"]
        task = studio.add_task(project, {"image": url})
        cycle = Cycle(Settings.from_env(env_for(studio, tmp_path)), project)
        pool, _ = cycle.split(cycle.studio.tasks(project), LabelMap.from_config(
            studio.projects[project]["label_config"]))
        pool = cycle.images(pool)
        assert foreign.requests == []
    assert any(s["task"] == task and "ambiguously" in s["reason"] for s in cycle.skipped)


def test_an_annotation_with_a_non_integer_id_is_skipped(studio, tmp_path):
    project, ids, samples = camvid_project(studio, CAMVID, annotated=ANNOTATED[:3])
    label_map = LabelMap.from_config(studio.projects[project]["label_config"])
    odd = ids[ANNOTATED[0]]
    studio.tasks[odd]["annotations"][0]["id"] = "not-a-number"
    twice = ids[ANNOTATED[1]]  # a second, broken annotation beside a good one
    studio.add_annotation(twice, mask_to_results(samples[1].mask, label_map))
    studio.tasks[twice]["annotations"][-1]["id"] = {"id": 5}
    cycle = Cycle(Settings.from_env(env_for(studio, tmp_path)), project)
    pool, regions = cycle.split(cycle.studio.tasks(project), label_map)
    pool = cycle.images(pool)
    cycle.build_labels(pool, regions, label_map)
    cycle.fingerprint(label_map, pool)
    labelled = sorted(i.id for i in pool.values() if i.labelled)
    assert labelled == sorted([ids[ANNOTATED[1]], ids[ANNOTATED[2]]])
    assert any(s["task"] == odd and "not an integer annotation id" in s["reason"]
               for s in cycle.skipped)
