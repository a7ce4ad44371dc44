"""Training-cycle tests on the real CamVid fixture (model/train.py)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from model.batches import labelled_pixel_weights
from model.config import METHODS, TrainConfig
from model.data import IGNORE_INDEX, Sample, load_folder, read_split
from model.methods import STEPS
from model.train import Trainer, main, train_cycle

NUM_CLASSES = 11


@pytest.fixture(scope="module")
def fixture_sets(camvid_root):
    """(labelled, unlabelled, val): the split's 2 images labelled, the other 6 without masks."""
    train = load_folder(camvid_root, "train", downscale=2)
    names = set(read_split(camvid_root / "splits" / "labeled_seed0.txt"))
    labelled = [s for s in train if s.name in names]
    unlabelled = [replace(s, mask=None) for s in train if s.name not in names]
    return labelled, unlabelled, load_folder(camvid_root, "val", downscale=2)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        method="s4al",
        iterations=4,
        cold_start_iterations=1,
        crop_size=(48, 64),
        eval_every=2,
        backbone_weights=None,
        device="cpu",
    )
    return TrainConfig(**{**values, **overrides})


def test_config_round_trips_and_rejects_unknown_values():
    config = tiny_config(method="mean-teacher")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({**config.to_dict(), "lr_typo": 1.0})
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="fixmatch")


def test_every_method_has_a_registered_step():
    assert set(STEPS) == set(METHODS)  # the registry holds tsf-plar and its ablations too


@pytest.mark.slow
def test_overfits_four_real_images_well_above_chance(camvid_root):
    # 4 real CamVid images at 60x80, random init, no scale augmentation (crop = image):
    # 60 SGD steps must fit them. Chance here: the most frequent class (Building) covers
    # 26% of the labelled pixels, so always predicting it scores pixel accuracy 0.26 and
    # mIoU 0.02; uniform guessing scores 1/11. Seeds 0-2 reach 0.86 accuracy and 0.41-0.47
    # mIoU; the thresholds leave room for numeric differences between machines.
    samples = load_folder(camvid_root, "train", downscale=2)[:4]
    labels = np.concatenate([s.mask.ravel() for s in samples])
    labels = labels[labels != IGNORE_INDEX]
    majority_share = np.bincount(labels).max() / len(labels)
    assert majority_share < 0.3
    config = tiny_config(
        method="supervised",
        iterations=60,
        cold_start_iterations=0,
        crop_size=(60, 80),
        scale_range=(1.0, 1.0),
        eval_every=0,
    )
    result = train_cycle(config, samples, [], NUM_CLASSES, val=samples)
    assert result.metrics["student"]["pixel_accuracy"] > 0.75
    assert result.metrics["student"]["miou"] > 0.3


def test_s4al_cycle_runs_and_its_state_warm_starts_the_next(fixture_sets):
    labelled, unlabelled, val = fixture_sets
    events = []
    result = train_cycle(tiny_config(), labelled, unlabelled, NUM_CLASSES, val, None, events.append)

    # cold start (iteration 1) is supervised only; from iteration 3 on the replay buffer
    # holds the images of iteration 2, so Balanced ClassMix adds its loss
    assert [e["phase"] for e in events if e["phase"] != "evaluate"] == ["cold-start"] + 3 * ["s4al"]
    assert [e["iteration"] for e in result.history] == [2, 4]
    assert "replay" in result.history[1] and "unsupervised" in result.history[1]
    assert all(np.isfinite(v) for entry in result.history for v in entry.values())
    assert 0 <= result.history[-1]["teacher_miou"] <= 1
    assert set(result.metrics) == {"teacher", "student"}
    assert len(result.metrics["teacher"]["iou"]) == NUM_CLASSES
    assert result.state["iteration"] == 4

    # a finished cycle's state warm-starts a new one: same weights, fresh schedule
    next_config = tiny_config(iterations=2, cold_start_iterations=0, eval_every=0)
    warm = Trainer(next_config, labelled, unlabelled, NUM_CLASSES, init_state=result.state)
    assert warm.iteration == 0 and warm.optimizer.state_dict()["state"] == {}
    for name, tensor in warm.student.state_dict().items():
        assert torch.equal(tensor, result.student.state_dict()[name]), name
    assert warm.teacher.updates == 4
    second = train_cycle(next_config, labelled, unlabelled, NUM_CLASSES, init_state=result.state)
    assert second.state["iteration"] == 2 and second.metrics == {}


def test_an_unfinished_cycle_resumes_where_it_stopped(fixture_sets):
    labelled, unlabelled, _ = fixture_sets
    config = tiny_config(eval_every=0)
    trainer = Trainer(config, labelled, unlabelled, NUM_CLASSES)
    for _ in range(3):
        trainer.run_step()
    state = trainer.state_dict()
    resumed = Trainer(config, labelled, unlabelled, NUM_CLASSES, init_state=state)
    assert resumed.iteration == 3
    assert list(resumed.step.replay.indices) == list(trainer.step.replay.indices)
    momentum = resumed.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, trainer.optimizer.state_dict()["state"][0]["momentum_buffer"])
    result = resumed.fit()
    assert result.state["iteration"] == 4
    assert [entry["iteration"] for entry in result.history] == [4]


def test_replayed_images_keep_their_partial_labels_aligned(fixture_sets):
    # the authors' code re-read a replayed image, its labels and its label mask with three
    # separate random crops/flips; here one joint transform keeps them pixel-aligned.
    # A checkerboard whose mask says which squares are white makes misalignment visible.
    squares = (np.indices((96, 128)) // 32).sum(axis=0) % 2
    image = np.repeat((squares * 255).astype(np.uint8)[..., None], 3, axis=2)
    board = Sample("board.png", image, squares.astype(np.int64))
    labelled = fixture_sets[0]
    trainer = Trainer(tiny_config(crop_size=(64, 64)), labelled, [board], NUM_CLASSES)
    trainer.step.replay.add([0])
    for _ in range(10):
        views = trainer.step.replayed_views(2)
        white = views.weak[:, 0] > 0
        known = views.mask != IGNORE_INDEX  # crop padding is unlabelled
        agreement = (white == (views.mask == 1))[known].float().mean().item()
        # aligned: >= 0.96 (the antialiased resize blurs the edges); an image and a mask
        # cropped independently agree on 0.50 of the pixels on average, 0.82 at most
        assert agreement > 0.9


@pytest.mark.parametrize("method", ["supervised", "mean-teacher"])
def test_other_methods_run_and_name_their_losses(fixture_sets, method):
    labelled, unlabelled, _ = fixture_sets
    config = tiny_config(method=method, iterations=2, cold_start_iterations=0, eval_every=0)
    result = train_cycle(config, labelled, unlabelled, NUM_CLASSES)
    expected = {"supervised": {"supervised"}, "mean-teacher": {"supervised", "unsupervised"}}
    assert set(result.history[0]) - {"iteration", "lr", "loss", "elapsed_s"} == expected[method]


def test_poly_learning_rate(fixture_sets):
    labelled = fixture_sets[0]
    trainer = Trainer(tiny_config(method="supervised", iterations=10), labelled, [], NUM_CLASSES)
    trainer.iteration = 5
    trainer.set_learning_rate()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**0.9)
    # a 10-iteration cycle: the EMA horizon is capped at 5% of it (1 iteration: a copy)
    assert trainer.teacher.momentum == trainer.config.teacher_momentum() == 0.0


def test_cli_trains_saves_and_prints_the_iou_table(camvid_root, tmp_path, capsys):
    from model.checkpoint import load_checkpoint

    argv = [
        "--data", str(camvid_root),
        "--split", str(camvid_root / "splits" / "labeled_seed0.txt"),
        "--iterations", "2",
        "--crop", "48x64",
        "--downscale", "2",
        "--backbone-weights", "none",
        "--device", "cpu",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 labelled, 6 unlabelled, 4 val images" in out
    assert "random initialisation" in out
    assert "SignSymbol" in out and "mIoU" in out
    model, meta = load_checkpoint(tmp_path / "model.pt")
    assert model.num_classes == NUM_CLASSES
    assert meta["train_state"]["iteration"] == 2
    assert (tmp_path / "history.json").is_file()


def test_labelled_images_are_drawn_in_proportion_to_their_labelled_pixels():
    full = np.zeros((10, 10), dtype=np.int64)
    region = np.full((10, 10), IGNORE_INDEX, dtype=np.int64)
    region[:2, :5] = 1  # an acquired 2x5 block: 10 of 100 pixels
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    samples = [Sample("full", image, full), Sample("region", image, region)]
    assert labelled_pixel_weights(samples) == [100.0, 10.0]
    assert labelled_pixel_weights(samples[:1] * 3) is None  # all alike: uniform
