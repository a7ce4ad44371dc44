"""Issue 17: a cycle whose Label Studio traffic and memory stay bounded as a project grows,
against the fake Label Studio (tests/fake_studio.py) on the CamVid fixture: the read does
not carry old predictions, old versions' predictions are deleted, images are read per use,
and /status's progress names every step."""

from __future__ import annotations

import numpy as np

from s4al_backend.cycle import STEPS, run_cycle
from s4al_backend.jobs_base import ProgressReporter
from s4al_backend.labels import LabelMap, mask_to_results
from s4al_backend.pool import PoolItem
from s4al_backend.pool_images import PoolImages
from s4al_backend.prune import stale_versions
from s4al_backend.settings import Settings
from s4al_backend.studio import Studio
from tests.fake_studio import camvid_project
from tests.test_cycle import ANNOTATED, CAMVID, env_for, studio  # noqa: F401

OLD = [f"v{seq:04d}-20260101-00000{seq}" for seq in range(1, 6)]


def tasks_bytes(studio, since: int = 0) -> int:  # noqa: F811
    return sum(r.received for r in studio.requests[since:]
               if r.method == "GET" and r.path == "/api/tasks/")


def add_old_predictions(studio, project, versions) -> None:  # noqa: F811
    label_map = LabelMap.from_config(studio.projects[project]["label_config"])
    noisy = np.random.default_rng(0).integers(0, len(label_map.classes), (120, 160))
    result = mask_to_results(noisy, label_map)  # ~100 KB of RLE, like a real prediction
    for task in studio.project_tasks(project):
        for version in versions:
            studio.add_prediction(task["id"], {"result": result, "model_version": version})


def test_the_read_does_not_grow_with_old_versions_of_predictions(studio, tmp_path):  # noqa: F811
    project, _, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    reader = Studio(studio.url, studio.api_key)
    list(reader.iter_tasks(project))
    bare = tasks_bytes(studio)
    add_old_predictions(studio, project, OLD)
    mark = len(studio.requests)

    tasks = list(reader.iter_tasks(project))

    grown = tasks_bytes(studio, mark) - bare
    assert grown <= len(tasks) * (len(",".join(OLD)) + 40), grown  # the version names only
    assert all("predictions" not in t for t in tasks)
    assert {len(t["annotations"]) for t in tasks} == {0, 1}
    assert all(t["annotations"][0]["result"] for t in tasks if t["annotations"])


def test_a_cycle_deletes_its_versions_beyond_prediction_versions(studio, tmp_path):  # noqa: F811
    project, _, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    add_old_predictions(studio, project, [*OLD[:2], "sam-1"])
    settings = Settings.from_env(env_for(studio, tmp_path, PREDICTION_VERSIONS="2"))

    result = run_cycle(settings, project, reason="test")

    versions = {p["model_version"] for t in studio.project_tasks(project)
                for p in t["predictions"]}
    assert versions == {OLD[1], result["version"], "sam-1"}  # foreign ones stay
    assert result["prediction_versions_deleted"] == [OLD[0]]


def test_a_refused_prune_is_logged_and_the_cycle_still_ends_done(studio, tmp_path,  # noqa: F811
                                                                 caplog):
    project, _, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    add_old_predictions(studio, project, OLD[:3])
    studio.fail(404, prefix=f"/api/projects/{project}/model-versions/", method="DELETE")
    settings = Settings.from_env(env_for(studio, tmp_path, PREDICTION_VERSIONS="1"))

    result = run_cycle(settings, project, reason="test")

    assert result["status"] == "done" and result["prediction_versions_deleted"] == []
    assert "old predictions not deleted" in caplog.text and "(404)" in caplog.text
    versions = {p["model_version"] for t in studio.project_tasks(project)
                for p in t["predictions"]}
    assert versions == {*OLD[:3], result["version"]}


def test_prediction_versions_zero_keeps_every_version(studio, tmp_path):  # noqa: F811
    project, _, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    add_old_predictions(studio, project, OLD[:3])
    settings = Settings.from_env(env_for(studio, tmp_path, PREDICTION_VERSIONS="0"))
    result = run_cycle(settings, project, reason="test")
    versions = {p["model_version"] for t in studio.project_tasks(project)
                for p in t["predictions"]}
    assert versions == {*OLD[:3], result["version"]}
    assert not any(r.method == "DELETE" for r in studio.requests)


def test_stale_versions_keeps_the_newest_by_time_and_the_protected():
    versions = ["v0010-20260101-000000", "v0002-20260301-000000", "v0009-20260101-000000",
                "sam-1", "v0001-20250101-000000"]
    assert stale_versions(versions, 2, set()) == ["v0009-20260101-000000",
                                                  "v0001-20250101-000000"]
    assert stale_versions(versions, 2, {"v0001-20250101-000000"}) == ["v0009-20260101-000000"]
    assert stale_versions(versions, 0, set())[0] == "v0002-20260301-000000"


class CountingFetcher:
    def __init__(self, fail: set[str] = frozenset()):
        self.loads, self.fail = 0, fail

    def load(self, url: str, task_id=None) -> np.ndarray:
        self.loads += 1
        if url in self.fail:
            raise OSError(f"{url} broken")
        return np.full((12, 16, 3), len(url), np.uint8)


def test_pool_images_hold_a_few_recent_images_not_the_pool():
    fetcher = CountingFetcher(fail={"u3"})
    reader = PoolImages(fetcher, recent=4)
    items = [PoolItem({"id": i}, f"u{i}") for i in range(200)]
    failed = []
    reader.prepare(items, lambda item, exc: failed.append(item.id))
    assert failed == [3] and fetcher.loads == 200
    assert len(reader.recent) == 0  # the images phase keeps none
    assert items[0].shape == (12, 16) and items[3].shape is None
    assert items[0].held is None
    for item in items[4:]:
        assert item.image.shape == (12, 16, 3)
    assert len(reader.recent) == 4 and fetcher.loads == 396
    items[-1].image  # noqa: B018  (a recent one: no fetch)
    assert fetcher.loads == 396


def test_status_progress_shows_every_step_done(studio, tmp_path):  # noqa: F811
    project, ids, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    settings = Settings.from_env(env_for(studio, tmp_path))
    reporter = ProgressReporter(project)

    run_cycle(settings, project, reason="test", progress=reporter)

    steps = reporter.latest["steps"]
    assert set(steps) == set(STEPS)
    assert steps["read"] == {"done": len(ids), "total": len(ids)}
    assert steps["images"] == {"done": len(ids), "total": len(ids)}
    assert steps["train"]["done"] == steps["train"]["total"] > 0
    assert steps["score"]["done"] == steps["score"]["total"] == len(ids) - len(ANNOTATED)
    assert steps["push"]["done"] == steps["push"]["total"] == len(ids) - len(ANNOTATED)
