"""The Makefile's two commands: `make run` gets every core, `make test` one thread."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# PY replaced by a program that prints the thread setting the server would start with;
# -o: never rebuild the venv from here
PRINT_THREADS = f"{sys.executable} -c 'import os; print(os.environ.get(\"OMP_NUM_THREADS\"))'"


def _make(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MAKEFLAGS")}
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def test_make_run_does_not_pin_torch_to_one_thread():
    out = _make("run", f"PY={PRINT_THREADS}")
    assert out.strip().splitlines()[-1] == "None"


def test_make_test_runs_pytest_with_one_thread():
    out = _make("-n", "test")
    pytest_line = [line for line in out.splitlines() if "-m pytest" in line]
    assert pytest_line and "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" in pytest_line[0]
