"""`python -m model.evaluate`: any checkpoint on any folder split (model/evaluate.py)."""

import json
import shutil

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.data import load_folder, read_classes
from model.evaluate import main
from model.metrics import evaluate
from model.network import DeepLabV3Plus

NUM_CLASSES = 11


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return DeepLabV3Plus(NUM_CLASSES, backbone_weights=None).eval()


def _expected(network, camvid_root) -> dict:
    return evaluate(network, load_folder(camvid_root, "val"), NUM_CLASSES)


def test_a_service_checkpoint_on_a_folder_split(network, camvid_root, tmp_path, capsys):
    path = tmp_path / "v0001.pt"
    save_checkpoint(path, network, read_classes(camvid_root), {"published": "student"})
    out = tmp_path / "metrics.json"
    argv = [str(path), "--data", str(camvid_root), "--split", "val", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    expected = _expected(network, camvid_root)
    assert json.loads(out.read_text()) == {"student": expected}
    assert f"{100 * expected['miou']:.1f}" in printed.split("mIoU")[1].splitlines()[0]
    assert all(name in printed for name in read_classes(camvid_root))


def test_a_simulator_state_gives_teacher_and_student(network, camvid_root, tmp_path):
    torch.manual_seed(1)
    student = DeepLabV3Plus(NUM_CLASSES, backbone_weights=None).eval()
    state = {
        "num_classes": NUM_CLASSES,
        "student": student.state_dict(),
        "teacher": {"model": network.state_dict(), "updates": 3},
    }
    path = tmp_path / "cycle1.pt"
    torch.save({"train_state": state, "settings": {"classes": read_classes(camvid_root)}}, path)
    out = tmp_path / "metrics.json"
    argv = [str(path), "--data", str(camvid_root), "--split", "val", "--json", str(out)]
    assert main(argv) == 0
    metrics = json.loads(out.read_text())
    assert metrics["teacher"] == _expected(network, camvid_root)
    assert metrics["student"] == _expected(student, camvid_root)
    assert metrics["teacher"] != metrics["student"]


def test_other_classes_or_no_masks_are_refused(network, camvid_root, tmp_path, capsys):
    path = tmp_path / "model.pt"
    save_checkpoint(path, network, [f"c{i}" for i in range(NUM_CLASSES)], {})
    assert main([str(path), "--data", str(camvid_root), "--split", "val"]) == 2
    assert "trained on classes" in capsys.readouterr().err
    data = tmp_path / "data"
    shutil.copytree(camvid_root / "val", data / "val")
    shutil.copy(camvid_root / "classes.json", data)
    save_checkpoint(path, network, read_classes(camvid_root), {})
    assert main([str(path), "--data", str(data), "--split", "val"]) == 2
    assert "has no masks" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt"), "--data", str(data), "--split", "val"]) == 2
