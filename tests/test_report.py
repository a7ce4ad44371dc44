"""The simulator's per-seed report (model/report.py) on rows with known settings."""

import json

from model import report


def _row(folder, name, acquisition, split, regions):
    protocol = {
        "name": "lab", "description": name, "crop": 128, "iterations": [4], "rows": [],
        "cold_start_fraction": 0.1, "warm_start": True, "regions_per_image": regions,
        "selection": "per-image", "score_with": "student", "eval_with": "teacher",
    }  # fmt: skip
    record = {
        "cycle": 0, "miou": 0.5, "student": {"miou": 0.5}, "labelled_fraction": 0.1,
        "wall_s": 60.0, "peak_rss_mb": 100.0, "iou": [0.5, 0.5], "iterations": 4,
    }  # fmt: skip
    doc = {
        "row": name, "method": "s4al", "start": "split", "acquisition": acquisition,
        "heuristic": None, "protocol": protocol, "block": 15, "seed": 0, "split": split,
        "train_images": 10, "val_images": 5, "image_size": [180, 240], "classes": ["a", "b"],
        "backbone_weights": "none", "cycle_budget_pixels": 0, "command": f"run {name}",
        "cycles": [record], "complete": True,
    }  # fmt: skip
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    (folder / "rows" / f"{name}.json").write_text(json.dumps(doc))


def test_header_is_the_acquisition_rows_and_other_settings_are_named(tmp_path):
    _row(tmp_path, "full", None, "old.txt", 8)
    _row(tmp_path, "entropy-regions", "regions", "new.txt", 10)
    _row(tmp_path, "random-regions", "regions", "new.txt", 10)
    table = report.write_report(tmp_path)[1].read_text()
    assert "10 per image per acquisition" in table
    lines = [line for line in table.splitlines() if "run with other settings" in line]
    assert lines == [
        "- `full` was run with other settings: regions_per_image = 8 (header: 10), "
        "split = 'old.txt' (header: 'new.txt')."
    ]


def test_rows_with_equal_settings_name_nothing(tmp_path):
    _row(tmp_path, "entropy-regions", "regions", "new.txt", 10)
    _row(tmp_path, "initial-only", None, "new.txt", 10)
    table = report.write_report(tmp_path)[1].read_text()
    assert "run with other settings" not in table
