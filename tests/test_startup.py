"""The start-up log: where the server listens, which Label Studio, whether a key is set
(never the key), and a warning when training cannot reach Label Studio."""

import logging
import signal
import subprocess
import sys

import pytest

from s4al_backend.cycle import run_cycle
from s4al_backend.studio import Studio, StudioError
from tests.service_helpers import LEGACY_KEY, make_settings
from tests.test_app import ROOT, free_port, service_env, wait_health


def _start_log(tmp_path, **env) -> str:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "_wsgi.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
        env=service_env(tmp_path, **env), text=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        wait_health(port, process)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
    return err.replace(str(port), "PORT")


def test_start_log_says_where_it_listens_and_which_studio(tmp_path):
    err = _start_log(tmp_path, LABEL_STUDIO_URL="http://studio.example:8080",
                     LABEL_STUDIO_API_KEY=LEGACY_KEY)
    assert "listening on http://127.0.0.1:PORT" in err
    assert "Label Studio: http://studio.example:8080, API key set (legacy)" in err
    assert LEGACY_KEY not in err
    assert "LABEL_STUDIO_API_KEY is not set" not in err


def test_start_log_warns_without_a_key(tmp_path):
    err = _start_log(tmp_path)
    assert "Label Studio: http://localhost:8080, no API key" in err
    assert "[WARNING]" in err and "LABEL_STUDIO_API_KEY is not set" in err


def test_training_that_cannot_reach_studio_warns(tmp_path, caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = make_settings(tmp_path, label_studio_url=url)
    studio = Studio(url, LEGACY_KEY, timeout=5, max_retries=0)
    with caplog.at_level(logging.WARNING, "s4al_backend.cycle"), pytest.raises(StudioError):
        run_cycle(settings, 3, studio=studio, fetcher=object())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("project 3: training could not reach Label Studio" in w and url in w
               for w in warnings)
