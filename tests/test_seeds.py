"""Seeds -> mean, sd, targets and plots (model/seeds.py), on rows with known figures."""

import json

import pytest

from model import seeds


def _row(folder, name, mious, fractions):
    cycles = [
        {
            "cycle": k, "miou": m, "student": {"miou": m - 0.01}, "labelled_fraction": f,
            "iterations": 4, "curve": [{"iteration": 2, "teacher_miou": m / 2},
                                       {"iteration": 4, "teacher_miou": m}],
        }
        for k, (m, f) in enumerate(zip(mious, fractions, strict=True))
    ]  # fmt: skip
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    doc = {"row": name, "cycles": cycles, "complete": True}
    (folder / "rows" / f"{name}.json").write_text(json.dumps(doc))


def test_mean_sd_pct_of_full_and_targets(tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.02)):
        folder = tmp_path / f"seed{seed}"
        _row(folder, "full", [0.50 + shift, 0.60 + shift], [1.0, 1.0])
        _row(folder, "initial-only", [0.40 + shift, 0.45 + shift], [0.05, 0.05])
        _row(folder, "random-regions", [0.40 + shift, 0.50 + shift], [0.05, 0.13])
        _row(folder, "entropy-regions", [0.40 + shift, 0.58 + shift], [0.05, 0.13])
    _row(tmp_path / "seed2", "mean-teacher", [0.44, 0.44], [0.05, 0.05])
    paths = seeds.write_report(tmp_path)
    summary = json.loads(paths[0].read_text())
    assert summary["full_miou"] == pytest.approx(0.61)
    last = summary["rows"]["entropy-regions"][-1]
    assert last["n"] == 2 and last["miou"] == pytest.approx(0.59)
    assert last["miou_sd"] == pytest.approx(0.02 / 2**0.5)  # sample sd of 0.58, 0.60
    assert last["pct_of_full"] == pytest.approx(100 * 0.59 / 0.61)
    assert summary["rows"]["mean-teacher"][-1]["miou_sd"] is None  # one seed
    table = paths[1].read_text()
    assert "| entropy-regions | 1 | 2 | 13.00 | 59.0 ± 1.4 | 96.7 |" in table
    assert "96.7% of full (target >= 95% with <= 15%): met" in table
    assert "S4AL - random-regions: +8.0 mIoU points, larger sd 1.4: met" in table
    assert "mean-teacher - initial-only: -2.0 mIoU points: MISSED" in table
    assert paths[2].stat().st_size > 10_000


def test_one_seed_judges_nothing(tmp_path):
    _row(tmp_path / "seed0", "full", [0.5], [1.0])
    _row(tmp_path / "seed0", "entropy-regions", [0.49], [0.1])
    table = seeds.write_report(tmp_path)[1].read_text()
    assert "No target can be judged yet" in table
