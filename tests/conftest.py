"""Shared test setup: one torch thread (2 threads on a shared 2-core machine can be 10x
slower) and paths to the bundled CamVid fixture."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
CAMVID = FIXTURES / "camvid"


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    return CAMVID
