"""The active-learning simulator (model/simulate.py, simulation.py, protocols.py, oracle.py):
row names, the oracle's bookkeeping, and the whole loop on
the bundled CamVid fixture (8 train + 4 val images at 120x160, a few steps per cycle)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import simulate, simulation
from model.acquisition import Region
from model.data import IGNORE_INDEX, Sample
from model.oracle import LabelState
from model.protocols import PROTOCOLS, RowSpec, parse_row

SPLIT = "splits/labeled_seed0.txt"


def test_parse_row():
    assert parse_row("full") == RowSpec("full", "supervised", "all")
    assert parse_row("initial-only") == RowSpec("initial-only", "supervised", "split")
    assert parse_row("mean-teacher") == RowSpec("mean-teacher", "mean-teacher", "split")
    spec = parse_row("entropy-regions")
    assert (spec.method, spec.acquisition, spec.heuristic) == ("s4al", "regions", "entropy")
    spec = parse_row("image-entropy")
    assert (spec.method, spec.acquisition, spec.heuristic) == ("s4al", "images", "entropy")
    spec = parse_row("margin-regions@tsf-plar")
    assert (spec.method, spec.acquisition, spec.heuristic) == ("tsf-plar", "regions", "margin")
    assert parse_row("tsf-plar").method == "tsf-plar"
    for bad in ("bald-regions", "entropy-regions@dino", "everything", "s4al@supervised"):
        with pytest.raises(ValueError):
            parse_row(bad)


def _truth():
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 3, (20, 30)).astype(np.int64) for _ in range(4)]
    masks[2][:5, :5] = IGNORE_INDEX
    return masks


def test_label_state_reveals_exactly_and_replays():
    truth = _truth()
    state = LabelState(truth, start=[0])
    assert state.pool() == [1, 2, 3]
    got = state.reveal_regions([Region(2, 0, 0, 10, 10), Region(3, 25, 15, 5, 5)])
    assert got == {"pixels": 125, "void_pixels": 25, "regions": 2, "images": 0}
    assert state.labelled_pixels() == 600 + 125
    assert state.labelled_valid_pixels() == 600 + 100
    with pytest.raises(ValueError):  # never the same block twice
        state.reveal_regions([Region(2, 0, 0, 10, 10)])
    got = state.reveal_images([1])
    assert got["pixels"] == 600 and got["images"] == 1
    assert state.pool() == [2, 3]

    samples = [Sample(f"{i}.png", np.zeros((20, 30, 3), np.uint8), t) for i, t in enumerate(truth)]
    labelled, unlabelled = state.training_sets(samples)
    assert [s.name for s in labelled] == ["0.png", "1.png", "2.png", "3.png"]
    assert [s.name for s in unlabelled] == ["2.png", "3.png"]
    partial = labelled[3].mask
    assert (partial[15:20, 25:30] == truth[3][15:20, 25:30]).all()
    assert (partial != IGNORE_INDEX).sum() <= 25 and (partial[:15] == IGNORE_INDEX).all()
    assert unlabelled[1].mask is labelled[3].mask or (unlabelled[1].mask == partial).all()

    again = LabelState.from_dict(truth, json.loads(json.dumps(state.to_dict())))
    assert all((a == b).all() for a, b in zip(again.labelled, state.labelled, strict=True))


def _argv(camvid_root, out, *extra):
    return [
        "--data", str(camvid_root), "--split", str(camvid_root / SPLIT), "--protocol", "smoke",
        "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def test_smoke_end_to_end(camvid_root, tmp_path):
    out = tmp_path / "run"
    rows = "full,entropy-regions,image-entropy"
    assert simulate.main(_argv(camvid_root, out, "--rows", rows)) == 0

    results = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in results["rows"]] == rows.split(",")
    assert (out / "results.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| entropy-regions | s4al | 1 |" in table and "% of full" in table

    total = 8 * 120 * 160
    by_row = {r["row"]: r for r in results["rows"]}
    for row in results["rows"]:
        assert row["complete"] and [c["cycle"] for c in row["cycles"]] == [0, 1]
        for c in row["cycles"]:
            for key in ("labelled_fraction", "miou", "iou", "pct_of_full", "wall_s", "peak_rss_mb"):
                assert key in c
            assert len(c["iou"]) == 11 and 0 <= c["miou"] <= 1 and c["peak_rss_mb"] > 0
            assert c["labelled_fraction"] == c["labelled_pixels"] / total
    assert by_row["full"]["cycles"][-1]["pct_of_full"] == pytest.approx(100)
    assert by_row["full"]["cycles"][0]["labelled_fraction"] == 1.0

    entropy = by_row["entropy-regions"]["cycles"]
    assert entropy[0]["labelled_pixels"] == 2 * 120 * 160  # the 2-image split
    acquired = entropy[1]["acquired"]
    assert acquired["regions"] == 2 * 6 and acquired["pixels"] == 12 * 10 * 10
    assert entropy[1]["labelled_pixels"] - entropy[0]["labelled_pixels"] == acquired["pixels"]
    assert entropy[1]["partial_images"] == 6 and entropy[1]["full_images"] == 2
    image = by_row["image-entropy"]["cycles"]
    assert image[1]["acquired"]["images"] == 1 and image[1]["full_images"] == 3
    # the acquisition rows trained cycle 0 once and shared it
    assert [entropy[0]["cycle0_shared"], image[0]["cycle0_shared"]] == [False, True]
    assert entropy[0]["miou"] == image[0]["miou"]

    # acquired blocks: inside pool images, disjoint, on the block grid
    import torch

    saved = torch.load(out / "state/entropy-regions/cycle1.pt", weights_only=False)
    ((kind, regions),) = saved["labels"]["history"]
    names = (camvid_root / SPLIT).read_text().split()
    train = sorted(p.name for p in (camvid_root / "train").iterdir())
    start = {train.index(n) for n in names}
    keys = {(r["image_index"], r["x"], r["y"]) for r in regions}
    assert kind == "regions" and len(keys) == len(regions) == 12
    assert not start & {r["image_index"] for r in regions}
    assert all(r["x"] % 10 == 0 and r["y"] % 10 == 0 for r in regions)

    # finished rows: --resume does nothing; without it the row is protected
    before = (out / "rows/entropy-regions.json").read_text()
    assert simulate.main(_argv(camvid_root, out, "--rows", "entropy-regions", "--resume")) == 0
    assert (
        json.loads((out / "rows/entropy-regions.json").read_text())["cycles"]
        == json.loads(before)["cycles"]
    )
    assert simulate.main(_argv(camvid_root, out, "--rows", "entropy-regions")) == 2

    # --report-only rebuilds the report from the rows on disk
    (out / "results.md").unlink()
    assert simulate.main(["--out", str(out), "--report-only"]) == 0
    assert (out / "results.md").read_text() == table


def test_tsf_plar_row_labels_queued_pixels_first(camvid_root, tmp_path):
    out = tmp_path / "run"
    assert simulate.main(_argv(camvid_root, out, "--rows", "entropy-regions@tsf-plar")) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["method"] == "tsf-plar" and row["complete"]
    acquired, plar = row["cycles"][1]["acquired"], row["cycles"][1]["plar"]
    assert acquired["regions"] == 2 * 6
    assert 0 <= acquired["queued_acquired"] <= min(acquired["queued_pixels"], acquired["pixels"])
    # an image with queued pixels gives its first block to them
    assert (acquired["queued_acquired"] > 0) == (acquired["queued_pixels"] > 0)
    assert plar["images"] == 6 and plar["corrected_right"] <= plar["corrected"]
    table = (out / "results.md").read_text()
    line = next(x for x in table.splitlines() if x.startswith("| entropy-regions@tsf-plar | 1 |"))
    assert line.endswith(f"| {acquired['queued_acquired']} of {acquired['pixels']} |")
    assert f"| {plar['corrected']} |" in line


def test_resume_continues_an_interrupted_row(camvid_root, tmp_path):
    out = tmp_path / "run"
    argv = _argv(camvid_root, out, "--rows", "random-regions")
    assert simulate.main([*argv, "--cycles", "1"]) == 0  # "interrupted" after cycle 0
    first = json.loads((out / "rows/random-regions.json").read_text())
    assert len(first["cycles"]) == 1
    assert simulate.main([*argv, "--resume", "--crop", "32"]) == 2  # other settings: refused
    assert simulate.main([*argv, "--resume"]) == 0
    row = json.loads((out / "rows/random-regions.json").read_text())
    assert row["complete"] and [c["cycle"] for c in row["cycles"]] == [0, 1]
    assert row["cycles"][0] == first["cycles"][0]
    assert row["cycles"][1]["acquired"]["pixels"] == 1200


def test_row_lock(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # held by a live process
    with pytest.raises(simulation.SimulationError, match="in use"):
        with simulation._lock(lock, "row 'x'"):
            pass
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    lock.write_text(f"{socket.gethostname()} {dead.stdout.strip()}")  # left by a dead one
    with simulation._lock(lock, "row 'x'"):
        assert lock.read_text().split()[1] == str(os.getpid())
    assert not lock.exists()


def test_two_processes_share_one_out(camvid_root, tmp_path):
    """Another process runs one row while this one runs another, into the same --out."""
    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    other = subprocess.Popen(
        [sys.executable, "-m", "model.simulate",
         *_argv(camvid_root, out, "--rows", "initial-only", "--iterations", "1,1")],
        cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    mine = simulate.main(_argv(camvid_root, out, "--rows", "random-regions", "--iterations", "1,1"))
    output, _ = other.communicate(timeout=120)
    assert mine == 0 and other.returncode == 0, output
    assert simulate.main(["--out", str(out), "--report-only"]) == 0  # whoever finished first
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["row"] for r in results["rows"]) == ["initial-only", "random-regions"]
    assert all(r["complete"] for r in results["rows"])
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("lock"))


def test_protocol_overrides():
    args = simulate.build_parser().parse_args(
        ["--out", "x", "--iterations-scale", "0.5", "--crop", "96", "--score-with", "teacher",
         "--backbone-weights", "none", "--no-warm-start"]
    )  # fmt: skip
    protocol = simulate.protocol_from_args(args)
    base = PROTOCOLS["camvid-cpu"]
    assert protocol.iterations == tuple(round(i / 2) for i in base.iterations)
    assert (protocol.crop, protocol.score_with, protocol.backbone_weights) == (96, "teacher", None)
    assert not protocol.warm_start and base.warm_start
    args = simulate.build_parser().parse_args(
        ["--out", "x", "--iterations", "5,6,7", "--cycles", "2"]
    )
    assert simulate.protocol_from_args(args).iterations == (5, 6)


def test_help_documents_rows_and_protocols(capsys):
    with pytest.raises(SystemExit):
        simulate.main(["--help"])
    text = capsys.readouterr().out
    for word in ("entropy-regions", "image-<h>", "--resume", "--report-only", "camvid-cpu",
                 "smoke", "--iterations-scale", "--score-with"):  # fmt: skip
        assert word in text


def test_a_row_stopped_mid_cycle_resumes_there(camvid_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = _argv(camvid_root, out, "--rows", "random-regions", "--iterations", "4,6")
    argv += ["--eval-every", "2", "--extra-eval", f"{camvid_root}:val"]
    real_logger = simulation._progress_logger

    def stop_in_cycle1(ctx, spec, cycle):
        log = real_logger(ctx, spec, cycle)

        def progress(info):
            log(info)
            if cycle == 1 and info["iteration"] == 3 and info["phase"] != "evaluate":
                raise KeyboardInterrupt  # the session ends here

        return progress

    monkeypatch.setattr(simulation, "CHECKPOINT_EVERY_S", -1.0)  # save at every iteration
    monkeypatch.setattr(simulation, "_progress_logger", stop_in_cycle1)
    with pytest.raises(KeyboardInterrupt):
        simulate.main(argv)
    partial = out / "state/random-regions/partial-cycle1.pt"
    saved = torch.load(partial, weights_only=False)
    # saved at iteration 1, not at 2 where a curve point was due, not at the interrupted 3
    assert saved["train_state"]["iteration"] == 1
    acquired = saved["revealed"]["pixels"]

    monkeypatch.setattr(simulation, "_progress_logger", real_logger)
    logs = []
    monkeypatch.setattr(simulation.Context, "log", lambda self, message: logs.append(message))
    assert simulate.main([*argv, "--resume"]) == 0
    assert any("resuming at iteration 1" in line for line in logs)
    assert not any("acquired" in line for line in logs)  # the acquisition was not redone
    assert not partial.exists()
    row = json.loads((out / "rows/random-regions.json").read_text())
    assert row["complete"] and row["cycles"][1]["acquired"]["pixels"] == acquired
    # the val curve of each cycle, and the extra split (here val itself) evaluated too
    assert [p["iteration"] for p in row["cycles"][1]["curve"]] == [2, 4, 6]
    extra = row["cycles"][1]["extra_eval"][f"{camvid_root}:val"]
    assert extra["teacher"]["miou"] == row["cycles"][1]["teacher"]["miou"]
