"""FIRST_VERSION: the cold start's network published (and its pre-labels pushed) before the
cycle ends, against the fake Label Studio on the CamVid fixture."""

from __future__ import annotations

from s4al_backend.cycle import run_cycle
from s4al_backend.settings import Settings
from s4al_backend.store import project_store
from tests.fake_studio import camvid_project
from tests.test_cycle import ANNOTATED, CAMVID, env_for, studio  # noqa: F401


def test_the_cold_start_is_published_before_the_cycle_ends(studio, tmp_path):  # noqa: F811
    project, ids, _ = camvid_project(studio, CAMVID, annotated=ANNOTATED)
    settings = Settings.from_env(env_for(studio, tmp_path, FIRST_VERSION="true",
                                         TRAIN_ITERATIONS="6", COLD_START_ITERATIONS="3"))
    phases: list[str] = []
    result = run_cycle(settings, project, reason="test",
                       progress=lambda u: phases.append(u.get("phase")))
    store = project_store(settings.model_dir, project, settings.keep_versions)
    first, final = store.versions()
    assert result["version"] == final == store.current()
    meta = store.meta(first)
    assert meta["first_version"] is True and meta["fingerprint"] is None
    assert meta["config"]["iterations"] == 3  # the cold start's iterations: a finished state
    assert meta["published"] in ("student", "teacher")
    # its pre-labels reached every image task without a full annotation while the method
    # still had to train (annotated tasks get none: acquire.prediction_targets)
    assert phases.index("first-version") < len(phases) - phases[::-1].index("s4al") - 1
    annotated = {ids[name] for name in ANNOTATED}
    for task in studio.project_tasks(project):
        if "region_id" in task["data"] or task["id"] in annotated:
            assert not task["predictions"] or "region_id" in task["data"]
            continue
        versions = [p["model_version"] for p in task["predictions"]]
        assert versions.count(first) == 1 and versions.count(final) == 1, versions
        early = next(p for p in task["predictions"] if p["model_version"] == first)
        assert early["result"], "a first-version pre-label is not empty"
    assert studio.projects[project]["model_version"] == final
    assert "first_version_s" in result["timings"]
    # no regions from the first version: only the cycle's version acquires
    assert {t["data"]["cycle_version"] for t in studio.project_tasks(project)
            if "region_id" in t["data"]} == {final}
