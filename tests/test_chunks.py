"""Issue 17: pool scoring and prediction pushing in chunks, in this process or spread over
free RQ workers (s4al_backend.pool_chunks, acquire.ChunkScorer, chunk_jobs). Chunks must
select exactly what one pass selects and push each prediction once, wherever they run."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

from model.acquisition import BlockGrid, Region, select_blocks
from model.network import DeepLabV3Plus
from s4al_backend import chunk_jobs
from s4al_backend.acquire import Acquisition, Tally
from s4al_backend.chunk_jobs import RedisChunks, claim_next, worker_queues
from s4al_backend.labels import IGNORE_INDEX, LabelMap
from s4al_backend.pool import PoolItem
from s4al_backend.pool_chunks import (
    ChunkResult,
    chunk_ranges,
    item_spec,
    label_map_spec,
    merge_candidates,
    spec_item,
    spec_label_map,
)
from s4al_backend.settings import Settings
from s4al_backend.studio import Studio
from tests.fake_studio import camvid_project
from tests.test_cycle import CAMVID, env_for, studio  # noqa: F401
from tests.test_jobs import _require_redis, redis_env  # noqa: F401


def random_grid(rng, rows: int, cols: int, block: int = 10) -> BlockGrid:
    scores = rng.random((rows, cols)).round(2)  # rounded: ties between images happen
    scores[rng.random((rows, cols)) < 0.2] = -np.inf
    costs = np.full((rows, cols), block * block, dtype=np.int64)
    return BlockGrid(scores, costs, block, rows * block, cols * block)


@pytest.mark.parametrize("size", [1, 3, 7, 50])
def test_chunked_candidates_merge_into_the_one_pass_selection(size):
    rng = np.random.default_rng(size)
    grids = [random_grid(rng, 3, 4) for _ in range(23)]
    limit, per_image = 9, 2
    one_pass = select_blocks(grids, per_image=per_image)[:limit]
    chunks = [ChunkResult(select_blocks([(i, grids[i]) for i in range(a, b)],
                                        per_image=per_image)[:limit])
              for a, b in chunk_ranges(len(grids), size)]
    assert merge_candidates(chunks, limit) == one_pass
    assert len(one_pass) == limit


def test_chunk_ranges_cover_the_pool_once():
    assert chunk_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_ranges(0, 3) == []
    with pytest.raises(ValueError):
        chunk_ranges(5, 0)


def test_a_chunk_result_survives_json():
    result = ChunkResult([Region(4, 10, 20, 30, 30, 0.5, 900)], made=3, pushed=2,
                         queued_pixels=7, scored=3)
    assert ChunkResult.from_json(result.to_json()) == result


def test_an_item_spec_carries_what_scoring_reads():
    mask = np.full((6, 8), IGNORE_INDEX, dtype=np.int64)
    mask[1:3, 2:5] = 1
    open_region = {"task": {"id": 21, "annotations": []}, "x": 0, "y": 0, "w": 2, "h": 2}
    done_region = {"task": {"id": 22}, "x": 4, "y": 2, "w": 2, "h": 2, "labelled": True}
    item = PoolItem({"id": 5, "annotations": []}, "/data/a.png", mask=mask, shape=(6, 8),
                    regions=[open_region, done_region])
    back = spec_item(item_spec(item))
    assert back.id == 5 and back.url == "/data/a.png" and back.shape == (6, 8)
    assert back.mask.dtype == np.int64 and np.array_equal(back.mask, mask)
    assert [r.get("labelled", False) for r in back.regions] == [False, True]
    assert [(r["x"], r["y"]) for r in back.regions] == [(0, 0), (4, 2)]
    assert Acquisition.chunk_tasks([back]) == {5, 21}
    assert Acquisition.taken(back, True).sum() == Acquisition.taken(item, True).sum()
    assert "mask" not in item_spec(PoolItem({"id": 6}, "u", shape=(6, 8)))


def test_a_label_map_survives_json(studio):  # noqa: F811
    import json

    project, _, _ = camvid_project(studio, CAMVID)
    label_map = LabelMap.from_config(studio.projects[project]["label_config"])
    back = spec_label_map(json.loads(json.dumps(label_map_spec(label_map))))
    assert back == label_map and back.index == label_map.index and back.region_control


def camvid_pool(studio, project: int, samples) -> dict[int, PoolItem]:  # noqa: F811
    """Pool items of the fixture's tasks, images held: two partly labelled, one full."""
    tasks = studio.project_tasks(project)
    pool = {}
    for index, (task, sample) in enumerate(zip(tasks, samples, strict=True)):
        item = PoolItem({"id": task["id"], "annotations": []}, task["data"]["image"],
                        held=sample.image)
        if index in (1, 4):  # a labelled block
            item.mask = np.full(sample.mask.shape, IGNORE_INDEX, dtype=np.int64)
            item.mask[:60, :60] = sample.mask[:60, :60]
        if index == 2:
            item.mask, item.full = sample.mask.astype(np.int64), True
        pool[item.id] = item
    return pool


def acquire(studio, tmp_path, project, pool, version, chunks=None, **env):  # noqa: F811
    settings = Settings.from_env(env_for(studio, tmp_path, **{"SCORE_CHUNK": "1000", **env}))
    label_map = LabelMap.from_config(studio.projects[project]["label_config"])
    torch.manual_seed(0)
    student = DeepLabV3Plus(len(label_map.classes)).eval()
    teacher = DeepLabV3Plus(len(label_map.classes)).eval()
    updates = []
    acquisition = Acquisition(settings, Studio(studio.url, studio.api_key), project,
                              updates.append, chunks)
    out = acquisition.run(label_map, pool, student, teacher, version)
    return out, updates


def pushed(studio, project, version) -> dict[int, tuple]:  # noqa: F811
    out = {}
    for task in studio.project_tasks(project):
        mine = [p for p in task.get("predictions", []) if p["model_version"] == version]
        assert len(mine) <= 1, task["id"]
        if mine:  # result ids are random: the rest must match
            result = [{k: v for k, v in r.items() if k != "id"} for r in mine[0]["result"]]
            out[task["id"]] = (mine[0]["score"], str(result))
    return out


def test_chunks_of_three_push_and_select_what_one_pass_does(studio, tmp_path):  # noqa: F811
    project, _, samples = camvid_project(studio, CAMVID)
    pool = camvid_pool(studio, project, samples)
    (one_regions, one_pushed, _), _ = acquire(studio, tmp_path / "a", project, pool, "v1")
    (regions, count, _), updates = acquire(studio, tmp_path / "b", project, pool, "v2",
                                           SCORE_CHUNK="3")
    assert count == one_pushed == len(pool) - 1  # the full one gets none
    assert [r["data"] for r in regions] == [
        {**r["data"], "cycle_version": "v2"} for r in one_regions]
    assert len(regions) == 5  # REGIONS_PER_CYCLE of the test schedule
    assert pushed(studio, project, "v2") == pushed(studio, project, "v1")
    steps = [u["step"] for u in updates if "step" in u]
    assert steps[-1] == {"name": "push", "done": count, "total": count}
    assert {"name": "score", "done": len(pool) - 1, "total": len(pool) - 1} in steps


def test_a_dead_helpers_chunk_is_run_by_the_cycle(redis_env, monkeypatch, caplog):  # noqa: F811
    connection = _require_redis()
    monkeypatch.setattr(chunk_jobs, "CLAIM_TTL", 0.5)
    settings = Settings.from_env(redis_env)
    chunks = RedisChunks(connection, settings, 7, "job-1")
    monkeypatch.setattr(chunks, "helper_queues", lambda most: ["nobody-listens"])

    def dead_helper(queues) -> None:  # takes chunk 0 and dies; chunk 1 fails on another
        assert claim_next(connection, chunks.keys, "dead") == 0
        connection.sadd(chunks.keys.pushed, 41, 42)  # it pushed two predictions first
        assert claim_next(connection, chunks.keys, "failing") == 1
        connection.set(chunks.keys.one("error", 1), "RuntimeError: no GPU memory")
        connection.delete(chunks.keys.one("claim", 1))

    monkeypatch.setattr(chunks, "call_helpers", dead_helper)
    ran, skipped = [], {}

    def work(index: int, pushed=frozenset()) -> ChunkResult:
        ran.append(index)
        skipped[index] = set(pushed)
        return ChunkResult([Region(index, 0, 0, 4, 4, float(index), 16)], scored=1)

    updates = []
    with caplog.at_level(logging.WARNING, logger="s4al_backend.chunk_jobs"):
        results = chunks.run(chunk_ranges(4, 1), work, lambda i: {"i": i}, {}, Tally(
            updates.append, 4, 0))
    assert sorted(ran) == [0, 1, 2, 3] and ran[:2] == [2, 3]
    assert skipped == {0: {41, 42}, 1: {41, 42}, 2: set(), 3: set()}  # not pushed twice
    assert [r.candidates[0].image_index for r in results] == [0, 1, 2, 3]
    assert "chunk 0 lost its worker" in caplog.text
    assert "chunk 1 failed on a helper (RuntimeError: no GPU memory)" in caplog.text
    assert not list(connection.scan_iter(chunks.keys.prefix + "*"))  # nothing left behind


def test_without_other_workers_the_cycle_runs_its_chunks_itself(redis_env, monkeypatch):  # noqa: F811
    connection = _require_redis()
    chunks = RedisChunks(connection, Settings.from_env(redis_env), 7, "job-2")
    assert chunks.helper_queues(10) == []  # no worker registered on this queue
    results = chunks.run(chunk_ranges(3, 1), lambda i: ChunkResult(scored=i), lambda i: {},
                         {}, Tally(lambda u: None, 3, 0))
    assert [r.scored for r in results] == [0, 1, 2]
    assert not list(connection.scan_iter(chunks.keys.prefix + "*"))


def test_gpu_workers_listen_to_their_chunk_queue_first():
    assert worker_queues("s4al", "cuda:0") == ["s4al-chunks-gpu", "s4al-chunks", "s4al"]
    assert worker_queues("s4al", "cpu") == ["s4al-chunks", "s4al"]


def test_a_free_worker_takes_chunks_of_a_running_cycle(studio, tmp_path, redis_env,  # noqa: F811
                                                        monkeypatch):
    """A cycle in worker mode with one other worker: that worker helps (its helper job
    runs chunks), and every prediction target still gets exactly one prediction."""
    from rq import Queue
    from rq.job import Job
    from rq.worker import SimpleWorker

    from s4al_backend.acquire import ChunkScorer
    from s4al_backend.jobs_base import DEFAULT_RUNNER
    from s4al_backend.redis_jobs import enqueue_cycle
    from tests.test_cycle import ANNOTATED, REGIONS_PER_CYCLE
    from tests.test_jobs import Worker, wait_for

    project, _, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED[:3])
    env = {**env_for(studio, tmp_path, SCORE_CHUNK="1", FIRST_VERSION="false"), **redis_env}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env(env)
    own = ChunkScorer.score

    def paced(self, *args, **kwargs):  # the cycle's own chunks take a second each, so
        time.sleep(1.0)  # the helper, which needs a moment to load the version, finds some
        return own(self, *args, **kwargs)

    monkeypatch.setattr(ChunkScorer, "score", paced)
    helper = Worker(env, f"{settings.queue_name}-helper", tmp_path / "helper.log")
    connection = _require_redis()
    chunk_queue = Queue(f"{settings.queue_name}-chunks", connection=connection)
    try:
        wait_for(lambda: "Listening on" in helper.output(), 60, "the helper worker")
        # the cycle goes to a queue only this test's worker takes (the helper, which
        # listens to QUEUE_NAME too, would take it from there)
        own_queue = Queue(f"{settings.queue_name}-own", connection=connection)
        job = enqueue_cycle(own_queue, project, "chunks", "cycle-1", runner=DEFAULT_RUNNER,
                            lock_ttl=10.0, lock_wait=1.0, retry_intervals=(), timeout=300,
                            description="test cycle")
        SimpleWorker([own_queue], connection=connection).work(burst=True)
        last = Job.fetch(job.id, connection=connection).return_value()
        wait_for(lambda: chunk_queue.finished_job_registry.get_job_ids(), 30,
                 "the helper job to end")
    finally:
        helper.stop()
    assert last["status"] == "done", last
    helped = [Job.fetch(i, connection=connection).return_value()["chunks"]
              for i in chunk_queue.finished_job_registry.get_job_ids()]
    assert sum(helped) >= 1, helper.output()[-3000:]
    assert "helping project" in helper.output()
    version = last["version"]
    image_tasks = [t for t in studio.project_tasks(project) if "region_id" not in t["data"]]
    targets = [t for t in image_tasks if not t.get("annotations")]
    assert last["predictions_pushed"] == len(targets) == 5
    for task in targets:
        assert [p["model_version"] for p in task["predictions"]].count(version) == 1
    assert len(set(last["region_ids"])) == len(last["region_ids"]) == REGIONS_PER_CYCLE
