"""The model store: versions, the atomic current pointer, pruning, per-project stores."""

from datetime import datetime, timezone

import pytest

from s4al_backend import store as store_module
from s4al_backend.store import (
    ModelStore,
    project_key,
    project_store,
    resolve_current,
    shared_store,
)
from tests.service_helpers import make_model


@pytest.fixture(scope="module")
def model():
    return make_model(3)


CLASSES = ["A", "B", "C"]


def test_empty_store(tmp_path):
    s = ModelStore(tmp_path / "m")
    assert s.versions() == [] and s.current() is None
    assert resolve_current(tmp_path / "m", "3") is None
    with pytest.raises(FileNotFoundError):
        s.load()


def test_save_makes_current_and_loads(tmp_path, model):
    s = ModelStore(tmp_path, keep=3)
    version = s.save(model, CLASSES, {"metrics": {"miou": 0.5}})
    assert version.startswith("v0001-")
    assert s.current() == version and s.versions() == [version]
    assert s.pointer.read_text().strip() == version
    loaded, meta = s.load()
    assert meta["classes"] == CLASSES and meta["version"] == version
    assert meta["metrics"] == {"miou": 0.5}
    assert loaded.num_classes == 3
    # nothing half-written left behind
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_side_file_describes_a_version_without_loading_it(tmp_path, model):
    import torch

    s = ModelStore(tmp_path, keep=1)
    version = s.save(model, CLASSES, {"metrics": {"miou": 0.4}, "train_state": {
        "step": torch.zeros(2)}, "labelled_fraction": 0.1})
    meta = s.meta()
    assert meta["version"] == version and meta["classes"] == CLASSES
    assert meta["metrics"] == {"miou": 0.4} and meta["labelled_fraction"] == 0.1
    assert "train_state" not in meta and meta["created"]
    newer = s.save(model, CLASSES)
    assert not s.meta_path(version).exists() and s.meta(newer)["version"] == newer
    s.meta_path(newer).write_text("{broken")
    assert s.meta(newer) is None  # callers fall back to loading the checkpoint


def test_versions_ordered_and_pruned_but_never_the_current(tmp_path, model):
    s = ModelStore(tmp_path, keep=2)
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    names = [s.save(model, CLASSES, version=s.new_version(when)) for _ in range(4)]
    assert [n.split("-")[0] for n in names] == ["v0001", "v0002", "v0003", "v0004"]
    assert s.versions() == names[-2:]
    assert s.current() == names[-1]
    # roll back to the older kept version: pruning keeps the newest `keep` and the current
    s.set_current(names[2])
    s.keep = 1
    assert s.prune() == [] and s.versions() == names[2:]
    assert s.current() == names[2]
    newest = s.save(model, CLASSES)
    assert s.versions() == [newest] and s.current() == newest


def test_pointer_problems_read_as_no_version(tmp_path, model):
    s = ModelStore(tmp_path)
    version = s.save(model, CLASSES)
    s.path(version).unlink()
    assert s.current() is None
    s.pointer.write_text("../../etc/passwd\n")
    assert s.current() is None
    with pytest.raises(FileNotFoundError):
        s.set_current("v0009-20260101-000000")
    with pytest.raises(ValueError):
        s.path("../x")


def test_project_key():
    assert project_key("12.1700000000") == "12"
    assert project_key({"id": 12, "title": "x"}) == "12"
    assert project_key(12) == "12"
    assert project_key(None) is None and project_key("") is None
    for bad in ("../etc", "1/2", True, "a b"):
        with pytest.raises(ValueError):
            project_key(bad)


def test_project_stores_and_shared_fallback(tmp_path, model):
    shared = shared_store(tmp_path)
    assert shared.root == tmp_path
    assert project_store(tmp_path, "7.123").root == tmp_path / "projects" / "7"
    v_shared = shared.save(model, CLASSES)
    found = resolve_current(tmp_path, "7")
    assert found[0].root == tmp_path and found[1] == v_shared
    v_own = project_store(tmp_path, 7).save(model, CLASSES)
    found = resolve_current(tmp_path, {"id": 7})
    assert found[0].root == tmp_path / "projects" / "7" and found[1] == v_own
    assert resolve_current(tmp_path, None)[1] == v_shared  # no project: the shared model


def test_adopt_and_command_line(tmp_path, model, capsys):
    source = ModelStore(tmp_path / "trained")
    version = source.save(model, CLASSES)
    model_dir = tmp_path / "model_dir"
    assert store_module.main(["--model-dir", str(model_dir), "import",
                              str(source.path(version))]) == 0
    adopted = capsys.readouterr().out.strip()
    assert shared_store(model_dir).current() == adopted
    assert store_module.main(["--model-dir", str(model_dir), "--project", "5", "import",
                              str(source.path(version))]) == 0
    capsys.readouterr()
    store_module.main(["--model-dir", str(model_dir), "--project", "5", "list"])
    assert capsys.readouterr().out.startswith("* v0001-")
    not_a_checkpoint = tmp_path / "x.pt"
    not_a_checkpoint.write_bytes(b"nope")
    with pytest.raises(Exception, match="not a readable checkpoint"):
        shared_store(model_dir).adopt(not_a_checkpoint)
    assert shared_store(model_dir).current() == adopted


def test_temp_files_of_a_killed_write_are_removed_at_the_next_save(tmp_path, model):
    import os
    import signal
    import subprocess
    import sys
    import time

    store = ModelStore(tmp_path / "m")
    store.save(model, CLASSES)
    target = store.path("v0099-killed")
    # a real writer SIGKILLed in the middle of its checkpoint write
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from model.atomic import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'half a checkpoint'); f.flush(); print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        f"atomic_write({str(target)!r}, write)\n")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    leftovers = list(store.versions_dir.glob(".*.tmp"))
    assert len(leftovers) == 1
    old = time.time() - 2 * store_module.STALE_TEMP_S
    os.utime(leftovers[0], (old, old))
    fresh = store.versions_dir / ".v0100.pt.abc123.tmp"  # a write in progress: kept
    fresh.write_bytes(b"in progress")
    store.save(model, CLASSES)
    assert list(store.versions_dir.glob(".*.tmp")) == [fresh]
