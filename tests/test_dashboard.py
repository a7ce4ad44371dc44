"""The dashboard through HTTP (Flask's test client) over a real store and history, with
the fake Label Studio (tests/fake_studio.py) serving the region tasks and their images:
the history file, the page with no project / a broken store / Label Studio down, basic
auth, thumbnails only for region tasks, no secret on the page, and the cycle's hook
appending to the history. The page in a real browser: test_dashboard_browser.py."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from model.data import read_classes
from s4al_backend import history, jobs
from s4al_backend.app import create_app
from s4al_backend.charts import class_bars, nice_ticks
from s4al_backend.cycle import run_cycle
from s4al_backend.dashboard_view import training_view
from s4al_backend.settings import Settings
from s4al_backend.store import project_store
from tests.dashboard_helpers import add_region_tasks, seed_history
from tests.fake_studio import FakeStudio, camvid_project
from tests.service_helpers import make_settings
from tests.test_cycle import TINY

CAMVID = Path(__file__).parent / "fixtures" / "camvid"
CLASSES = read_classes(CAMVID)
AUTH = ("watcher", "pw-dashboard-7f3a")


@pytest.fixture
def studio():
    with FakeStudio() as fake:
        yield fake


@pytest.fixture
def project(studio):
    pid, ids, _ = camvid_project(studio, CAMVID)
    return pid, list(ids.values())


def settings_for(studio, tmp_path, **overrides) -> Settings:
    return make_settings(tmp_path, None, label_studio_url=studio.url,
                         label_studio_api_key=studio.api_key, keep_versions=2, **overrides)


def page(client, **kwargs) -> str:
    reply = client.get("/dashboard", **kwargs)
    assert reply.status_code == 200, reply.data[:300]
    assert reply.mimetype == "text/html"
    return reply.get_data(as_text=True)


def count(pattern: str, html: str) -> int:
    return len(re.findall(pattern, html))


# --------------------------------------------------------------------------- history file
def test_history_appends_atomically_and_moves_a_broken_file_aside(tmp_path):
    root = tmp_path / "store"
    assert history.read(root) == []
    history.append(root, {"version": "v0001-20260101-000000"})
    history.append(root, {"version": "v0002-20260101-000100"})
    assert [r["version"] for r in history.read(root)] == ["v0001-20260101-000000",
                                                          "v0002-20260101-000100"]
    assert sorted(p.name for p in root.iterdir()) == ["history.json"]  # no temp file left

    (root / "history.json").write_text('[{"version": "v0001"', encoding="utf-8")
    with pytest.raises(history.HistoryError, match="not valid JSON"):
        history.read(root)
    history.append(root, {"version": "v0003-20260101-000200"})
    assert [r["version"] for r in history.read(root)] == ["v0003-20260101-000200"]
    (aside,) = root.glob("history.json.broken-*")
    assert aside.read_text(encoding="utf-8") == '[{"version": "v0001"'  # nothing lost


def test_only_cycles_that_trained_add_a_record(tmp_path):
    settings = make_settings(tmp_path)
    for result in ({"status": "no-labels", "version": None},
                   {"status": "done", "trained": False, "version": "v0001-20260101-000000"}):
        history.record_cycle(settings, 3, result)
    assert history.read(project_store(settings.model_dir, 3).root) == []


def test_a_real_cycle_appends_its_record(studio, tmp_path):
    pid, ids, _ = camvid_project(studio, CAMVID, annotated=sorted(
        p.name for p in (CAMVID / "train").iterdir())[:5])
    settings = Settings.from_env({"LABEL_STUDIO_URL": studio.url,
                                  "LABEL_STUDIO_API_KEY": studio.api_key,
                                  "MODEL_DIR": str(tmp_path / "models"), **TINY})
    result = run_cycle(settings, pid, reason="test")
    (record,) = history.read(project_store(settings.model_dir, pid).root)
    assert record["version"] == result["version"] and record["method"] == "s4al"
    assert record["teacher"]["miou"] == pytest.approx(result["metrics"]["teacher"]["miou"])
    assert record["teacher"]["iou"] == result["metrics"]["teacher"]["iou"]
    assert record["labelled_fraction"] == result["labelled_fraction"]
    assert record["classes"] == CLASSES and record["regions_created"] == 5
    again = run_cycle(settings, pid, reason="nothing changed")  # reuses the version
    assert again["trained"] is False
    assert len(history.read(project_store(settings.model_dir, pid).root)) == 1


# --------------------------------------------------------------------------- charts
def test_nice_ticks_cover_the_range_with_round_steps():
    assert nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(3.7, 14.2) == [2.5, 5.0, 7.5, 10.0, 12.5, 15.0]
    bars = class_bars(["a", "b", "c"], [0.5, None, 0.2], [0.4, 0.3, 0.25])
    assert [(b.value, b.delta, b.trend) for b in bars] == [
        (50.0, 10.0, "up"), (None, None, "flat"), (20.0, -5.0, "down")]


# --------------------------------------------------------------------------- the page
def test_no_project_yet_says_what_to_do(tmp_path, studio):
    html = page(create_app(settings_for(studio, tmp_path)).test_client())
    assert "No project yet" in html and "Connect Model" in html
    assert 'data-project=' not in html


def test_page_shows_history_bars_training_and_regions(tmp_path, studio, project):
    pid, sources = project
    settings = settings_for(studio, tmp_path)
    seeded = seed_history(settings, pid, CLASSES, cycles=4)
    regions = add_region_tasks(studio, pid, sources, [c.version for c in seeded])
    html = page(create_app(settings).test_client())

    # the curves: one teacher point per cycle, though the store keeps only 2 checkpoints
    assert len(project_store(settings.model_dir, pid).versions()) == 2
    curve = html.split('id="curve-fraction"')[1].split("</svg>")[0]
    assert count(r'class="point teacher"[^>]*data-version', curve) == 4
    for cycle in seeded:
        assert f'data-version="{cycle.version}" data-x="{100 * cycle.fraction:.4f}"' in curve
    # per-class bars of the current version against the previous one
    assert count(r'<li class="bar" data-class=', html) == len(CLASSES)
    last, before = seeded[-1], seeded[-2]
    assert f'{last.version} vs {before.version}' in html
    assert "&#9660; -10.0" in html  # class 0 dropped from the previous version
    # region tasks: open / done per cycle, the most uncertain open ones linked
    assert count(r'data-open="2" data-done="1"', html) == 4
    links = re.findall(r'href="([^"]+)"[^>]*data-task="(\d+)"', html)
    open_by_score = sorted((t for t, d in regions.items() if not studio.tasks[t]["annotations"]),
                           key=lambda t: -regions[t]["uncertainty"])
    assert [int(t) for _, t in links] == open_by_score[:8]
    for href, task in links:
        assert href == f"{studio.url}/projects/{pid}/data?task={task}"
    assert "idle" in html and "0 annotation change(s) since the last cycle" in html


def test_thumbnail_is_the_region_crop_outlined(tmp_path, studio, project):
    pid, sources = project
    settings = settings_for(studio, tmp_path)
    seeded = seed_history(settings, pid, CLASSES, cycles=1)
    regions = add_region_tasks(studio, pid, sources, [seeded[0].version])
    client = create_app(settings).test_client()
    task = next(t for t in regions if not studio.tasks[t]["annotations"])
    reply = client.get(f"/dashboard/projects/{pid}/regions/{task}.png")
    assert reply.status_code == 200 and reply.mimetype == "image/png"
    image = cv2.imdecode(np.frombuffer(reply.data, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (168, 168, 3)
    yellow = (image[..., 0] < 40) & (image[..., 1] > 180) & (image[..., 2] > 230)  # BGR
    assert yellow.sum() > 4 * 30  # the outline is drawn
    source = sources[0]  # an image task, not a region task: no thumbnail
    assert client.get(f"/dashboard/projects/{pid}/regions/{source}.png").status_code == 404
    assert client.get("/dashboard/projects/x..y/regions/1.png").status_code == 404
    assert client.get(f"/dashboard/projects/{pid + 50}/regions/{task}.png").status_code == 404


def test_broken_store_and_history_are_reported_not_500(tmp_path, studio, project):
    pid, _ = project
    settings = settings_for(studio, tmp_path)
    seeded = seed_history(settings, pid, CLASSES, cycles=2)
    store = project_store(settings.model_dir, pid)
    (store.root / "history.json").write_text("{not json", encoding="utf-8")
    store.meta_path(seeded[-1].version).unlink()  # the current version's side file
    broken = project_store(settings.model_dir, pid + 1)
    broken.root.mkdir(parents=True)
    broken.pointer.write_text("v0009-20260101-000000\n", encoding="utf-8")  # no checkpoint
    html = page(create_app(settings).test_client())
    assert "the learning history is broken: history.json is not valid JSON" in html
    assert f"{seeded[-1].version} has no readable side file" in html
    assert "names no stored checkpoint" in html
    assert f'data-project="{pid + 1}"' in html  # listed, with what is wrong


def test_label_studio_down_is_said_on_the_page(tmp_path, studio, project):
    pid, _ = project
    settings = settings_for(studio, tmp_path)
    seed_history(settings, pid, CLASSES, cycles=1)
    studio.fail(502, "/api/tasks")
    html = page(create_app(settings).test_client())
    assert "Label Studio could not be read" in html and "502" in html
    assert count(r'class="point teacher"', html) >= 1  # the rest still shows


def test_project_without_a_store_is_shown_when_asked(tmp_path, studio):
    client = create_app(settings_for(studio, tmp_path)).test_client()
    html = page(client, query_string={"project": "42"})
    assert 'data-project="42"' in html and "No model trained for this project yet" in html
    assert client.get("/dashboard", query_string={"project": "../etc"}).status_code == 404


def test_auth_and_no_secret_on_the_page(tmp_path, studio, project, caplog):
    pid, sources = project
    redis_password = "redis-secret-91c"
    settings = settings_for(studio, tmp_path, basic_auth_user=AUTH[0],
                            basic_auth_pass=AUTH[1], queue_name="s4altest-dashboard",
                            redis_url=f"redis://:{redis_password}@127.0.0.1:6379/13")
    seeded = seed_history(settings, pid, CLASSES, cycles=1)
    add_region_tasks(studio, pid, sources, [seeded[0].version])
    client = create_app(settings).test_client()
    assert client.get("/dashboard").status_code == 401
    assert client.get(f"/dashboard/projects/{pid}/regions/1.png").status_code == 401
    html = page(client, auth=AUTH)
    for secret in (studio.api_key, AUTH[1], redis_password):
        assert secret not in html
    assert "(set: legacy token)" in html and "(set)" in html  # said to be set, not shown
    assert "redis://:***@127.0.0.1:6379/13" in html
    assert "a secret reached the page" not in caplog.text  # none needed the last guard
    jobs.reset_jobs()


def test_a_secret_in_an_error_message_is_replaced_on_the_page(tmp_path, studio, project,
                                                               caplog):
    pid, _ = project
    settings = settings_for(studio, tmp_path)
    seed_history(settings, pid, CLASSES, cycles=1)
    studio.fail(500, "/api/tasks", body={"detail": f"token {studio.api_key} refused"})
    html = page(create_app(settings).test_client())
    assert "Label Studio could not be read" in html and "token *** refused" in html
    assert studio.api_key not in html
    assert "a secret reached the page; replaced" in caplog.text


def test_a_browser_asking_for_the_root_goes_to_the_dashboard(tmp_path, studio):
    client = create_app(settings_for(studio, tmp_path)).test_client()
    reply = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert reply.status_code == 302 and reply.headers["Location"] == "/dashboard"
    assert client.get("/", headers={"Accept": "*/*"}).get_json()["status"] == "UP"


# --------------------------------------------------------------------------- training panel
def test_training_view_in_words():
    running = training_view({"pending_annotations": 0, "train_after_annotations": 5,
                             "running": {"progress": {"phase": "s4al", "iteration": 50,
                                                      "total": 200, "eta_s": 30.0,
                                                      "loss": 0.7}}})
    assert (running.state, running.phase, running.percent) == ("running", "training (s4al)",
                                                               25.0)
    assert running.rate == pytest.approx(5.0) and running.eta_text == "30 s"
    failed = training_view({"last": {"status": "failed", "error": "StudioError: 401",
                                     "finished_at": 0.0, "will_retry": True}})
    assert failed.last_failed and "StudioError: 401 (it will be retried)" in failed.last
    assert training_view({"queued": {"reason": "START_TRAINING"}}).state == "queued"
    assert training_view({"error": "Redis unavailable"}).state == "unavailable"


def test_settings_in_force_are_the_public_ones(tmp_path, studio):
    settings = replace(settings_for(studio, tmp_path), label_studio_public_url="https://ls.example")
    html = page(create_app(settings).test_client(), query_string={"project": "7"})
    assert "LABEL_STUDIO_PUBLIC_URL" in html and "DASHBOARD_REFRESH" in html
    assert 'href="https://ls.example/projects/7/data"' in html
    table = html.split('id="settings"')[1].split("</table>")[0]
    names = re.findall(r"<th>([A-Z_]+)</th>", table)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert len(names) == len(settings.public()) - 1  # api_key_kind is shown with the key
    for name in names:  # every row is a variable the README documents
        assert re.search(rf"^\| [A-Z_ /]*\b{name}\b[A-Z_ /]* \|", readme, re.M), name


def test_a_project_label_studio_set_up_is_listed_before_its_first_model(tmp_path, studio):
    client = create_app(settings_for(studio, tmp_path)).test_client()
    config = studio.projects[camvid_project(studio, CAMVID)[0]]["label_config"]
    assert client.post("/setup", json={"project": "9.1700000000", "schema": config}
                       ).status_code == 200
    html = page(client)
    assert 'data-project="9"' in html and "No model trained for this project yet" in html


def test_an_unreadable_store_is_said_on_the_page(tmp_path, studio, project):
    pid, _ = project
    settings = settings_for(studio, tmp_path)
    seed_history(settings, pid, CLASSES, cycles=1)
    odd = project_store(settings.model_dir, pid + 1)
    (odd.root / "current").mkdir(parents=True)  # a folder where the pointer file should be
    (Path(settings.model_dir) / "current").mkdir()  # and in the shared store
    html = page(create_app(settings).test_client())
    assert f'data-project="{pid + 1}"' in html
    assert "the store cannot be read (IsADirectoryError" in html
    assert f'data-project="{pid}"' in html and 'class="point teacher"' in html


def test_the_tile_says_which_network_the_version_serves(tmp_path, studio, project):
    pid, _ = project
    settings = settings_for(studio, tmp_path)
    seed_history(settings, pid, CLASSES, cycles=1)
    client = create_app(settings).test_client()
    assert "the served model</div>" in page(client)  # versions before `published`: teacher
    store = project_store(settings.model_dir, pid)
    version = store.current()
    store.write_meta(version, {**store.meta(version), "published": "student"})
    html = page(client)
    assert "the served model: it beat the teacher on the holdout" in html
    assert "the served model</div>" not in html
