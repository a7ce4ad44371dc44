"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromium-driver,
`make browser-deps`) driven by selenium, over the backend served on a real port, a store
with a few cycles of history and the fake Label Studio (tests/fake_studio.py).

What a person sees: one curve point per cycle, a bar per class, region links to the right
tasks with their thumbnails loaded, no secret anywhere, and, while a real cycle runs, the
page refreshing itself and its progress bar moving. Screenshots go to test-artifacts/
(gitignored). Never skipped: without Chromium the tests fail and say how to install it.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
import requests

from model.data import read_classes
from s4al_backend import jobs
from s4al_backend.app import create_app
from s4al_backend.settings import Settings
from tests.dashboard_helpers import add_region_tasks, seed_history, serve
from tests.fake_studio import FakeStudio, camvid_project
from tests.service_helpers import make_settings
from tests.test_cycle import TINY

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CAMVID = Path(__file__).parent / "fixtures" / "camvid"
CLASSES = read_classes(CAMVID)
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
AUTH = ("watcher", "pw-browser-5d1c")
WIDTH = 1360
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--hide-scrollbars",
                f"--window-size={WIDTH},1000")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    assert not missing, (f"headless Chromium is missing ({', '.join(missing)}): run `make "
                         "browser-deps` (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # an explicit driver path: selenium-manager never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    driver.execute_cdp_cmd("Network.enable", {})
    yield driver
    driver.quit()


@pytest.fixture
def studio():
    with FakeStudio() as fake:
        yield fake


def basic_auth(driver, user: str, password: str) -> None:
    """Every request of the browser carries the credentials, as after a login prompt."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                           {"headers": {"Authorization": f"Basic {token}"}})


def wait_for(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def screenshot(driver, name: str) -> Path:
    """The whole page (the window grown to its height) as test-artifacts/<name>."""
    ARTIFACTS.mkdir(exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WIDTH, height + 90)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    driver.set_window_size(WIDTH, 1000)
    return path


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_what_a_person_sees(browser, studio, tmp_path):
    pid, ids, _ = camvid_project(studio, CAMVID)
    settings = make_settings(tmp_path, None, label_studio_url=studio.url,
                             label_studio_api_key=studio.api_key, keep_versions=2,
                             basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    seeded = seed_history(settings, pid, CLASSES, cycles=4)
    regions = add_region_tasks(studio, pid, list(ids.values()), [c.version for c in seeded])
    with serve(create_app(settings)) as url:
        basic_auth(browser, *AUTH)
        browser.get(url + "/")  # a browser at the root is sent to the dashboard
        wait_for(lambda: css(browser, f'[data-project="{pid}"]'), 30, "the project card")
        assert browser.current_url == url + "/dashboard"

        points = css(browser, "#curve-fraction circle.point.teacher[data-version]")
        assert [p.get_attribute("data-version") for p in points] == [c.version for c in seeded]
        assert all(p.is_displayed() for p in points)
        assert len(css(browser, "#curve-time circle.point.teacher[data-version]")) == 4

        names = [e.text for e in css(browser, f"#bars-{pid} .bar .name")]
        assert names == CLASSES
        widths = [e.size["width"] for e in css(browser, f"#bars-{pid} .bar .fill")]
        assert all(w > 0 for w in widths) and widths[1] < widths[-1]  # IoU grows per class

        links = css(browser, "a.region[data-task]")
        open_tasks = sorted((t for t in regions if not studio.tasks[t]["annotations"]),
                            key=lambda t: -regions[t]["uncertainty"])
        assert [int(a.get_attribute("data-task")) for a in links] == open_tasks[:8]
        for link in links:
            task = link.get_attribute("data-task")
            assert link.get_attribute("href") == f"{studio.url}/projects/{pid}/data?task={task}"
        wait_for(lambda: browser.execute_script(
            "return [...document.querySelectorAll('a.region img')]"
            ".every(i => i.complete && i.naturalWidth === 168)"), 30, "the thumbnails")

        source = browser.page_source
        for secret in (studio.api_key, AUTH[1]):
            assert secret not in source
        screenshot(browser, "dashboard.png")


def test_progress_bar_moves_while_a_cycle_runs(browser, studio, tmp_path):
    names = sorted(p.name for p in (CAMVID / "train").iterdir())
    pid, ids, _ = camvid_project(studio, CAMVID, annotated=names[:5])
    env = {**TINY, "LABEL_STUDIO_URL": studio.url, "LABEL_STUDIO_API_KEY": studio.api_key,
           # long enough to be watched: CI trains ~10 it/s, and the page showed the first
           # running bar only ~8 s after the webhook here (a 60-iteration cycle was missed)
           "MODEL_DIR": str(tmp_path / "models"), "TRAIN_ITERATIONS": "240",
           "COLD_START_ITERATIONS": "20", "DASHBOARD_REFRESH": "1", "KEEP_VERSIONS": "2"}
    settings = Settings.from_env(env)
    seeded = seed_history(settings, pid, CLASSES, cycles=3)
    add_region_tasks(studio, pid, [ids[n] for n in names[5:]], [c.version for c in seeded])
    try:
        with serve(create_app(settings)) as url:
            browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
            browser.get(url + "/dashboard")
            wait_for(lambda: css(browser, f"#training-{pid}[data-state=idle]"), 30, "idle")
            reply = requests.post(url + "/webhook", json={"action": "START_TRAINING",
                                                          "project": {"id": pid}}, timeout=10)
            assert reply.json()["status"] == "queued"
            readings = watch_progress(browser, pid)
            assert len(css(browser, "#curve-fraction circle.point.teacher[data-version]")) == 4
            new = css(browser, f'#project-{pid} .chip.version')[0].get_attribute("data-version")
            assert new not in {c.version for c in seeded} and new.startswith("v0004-")
            assert css(browser, f'#region-cycles-{pid} tr[data-version="{new}"]')
    finally:
        jobs.reset_jobs()
    moved = [(phase, a, b) for phase, a, b in zip_phases(readings) if b[0] > a[0]]
    assert moved, f"the progress bar never moved: {readings}"
    phase, before, after = moved[0]
    assert after[1] > before[1], f"{phase}: the bar's drawn width did not grow"


def watch_progress(driver, pid: int) -> list[tuple[str, int, float]]:
    """(phase, iteration, drawn bar width) as the self-refreshing page shows them, until
    the cycle is over; a screenshot while training."""
    readings: list[tuple[str, int, float]] = []
    shot = False

    def over() -> bool:
        nonlocal shot
        bars = css(driver, f"#training-{pid} .progress[data-iteration]")
        try:
            if bars and bars[0].get_attribute("data-iteration"):
                fill = bars[0].find_element("css selector", ".fill")
                reading = (bars[0].get_attribute("data-phase"),
                           int(bars[0].get_attribute("data-iteration")), fill.size["width"])
                if not readings or readings[-1] != reading:
                    readings.append(reading)
                if not shot and reading[1] >= 30:
                    screenshot(driver, "dashboard-training.png")
                    shot = True
            last = css(driver, f"#training-{pid}[data-state=idle] .last.ok")
            return bool(last) and "trained v0004" in last[0].text
        except Exception as exc:  # the element was swapped out by a refresh: read again
            if "stale" in type(exc).__name__.lower():
                return False
            raise

    wait_for(over, 300, "the cycle to finish on the page", poll=0.25)
    return readings


def zip_phases(readings):
    """Consecutive readings of the same phase: (phase, (iteration, width), (...))."""
    for a, b in zip(readings, readings[1:], strict=False):
        if a[0] == b[0]:
            yield a[0], (a[1], a[2]), (b[1], b[2])
