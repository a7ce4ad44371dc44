"""The strong view's own zoom (model/strong_zoom.py): known answers on synthetic maps, the
label warp agreeing with the image warp, and a semi-supervised step training with it on the
CamVid fixture."""

from __future__ import annotations

import argparse

import pytest
import torch

from model.ignore import IGNORE_INDEX
from model.strong_zoom import warp_image, warp_map, zoom_grids
from model.train import Trainer, parse_range
from tests.test_methods import config_for, sets  # noqa: F401 - the fixture

SIZE = (32, 48)


def _grids(n: int, zoom: tuple[float, float], seed: int = 0) -> torch.Tensor:
    return zoom_grids(n, SIZE, zoom, torch.Generator().manual_seed(seed), torch.device("cpu"))


def _blocks(n: int) -> torch.Tensor:
    """N x H x W labels in 8 px blocks, a different label per block and image."""
    rows = torch.arange(SIZE[0])[:, None] // 8
    cols = torch.arange(SIZE[1])[None, :] // 8
    return torch.stack([(rows * 6 + cols + k) % 11 for k in range(n)]).long()


def test_zoom_one_is_the_identity():
    labels = _blocks(3)
    image = torch.rand(3, 3, *SIZE)
    grid = _grids(3, (1.0, 1.0))
    assert torch.equal(warp_map(labels, grid, IGNORE_INDEX), labels)
    assert torch.allclose(warp_image(image, grid), image, atol=1e-5)


def test_zooming_in_stays_inside_and_zooming_out_leaves_three_quarters_outside():
    labels = _blocks(4)
    inside = warp_map(labels, _grids(4, (1.5, 2.0)), IGNORE_INDEX)
    assert not (inside == IGNORE_INDEX).any()  # the window never leaves the crop
    outside = warp_map(labels, _grids(4, (0.5, 0.5)), IGNORE_INDEX)
    # half the zoom: the crop fills a quarter of the view wherever its centre lands
    share = (outside == IGNORE_INDEX).float().mean(dim=(1, 2))
    assert torch.allclose(share, torch.full((4,), 0.75), atol=0.02)
    weights = warp_map(torch.ones(4, *SIZE), _grids(4, (0.5, 0.5)), 0.0)
    assert torch.equal(weights == 0, outside == IGNORE_INDEX)


def test_labels_follow_the_image():
    labels = _blocks(4)
    image = labels[:, None].float().expand(-1, 3, -1, -1).contiguous()
    grid = _grids(4, (0.8, 1.6), seed=3)
    warped_image = warp_image(image, grid)[:, 0]
    warped_labels = warp_map(labels, grid, IGNORE_INDEX)
    known = warped_labels != IGNORE_INDEX
    # bilinear and nearest agree away from block edges: on most of the pixels
    same = (warped_image.round() == warped_labels.float()) & known
    assert same.sum() / known.sum() > 0.8
    assert not torch.equal(warped_labels, labels)  # it moved


def _second_step(sets, **overrides) -> dict:  # noqa: F811 - the fixture
    labelled, unlabelled, num_classes = sets
    trainer = Trainer(config_for("s4al", **overrides), labelled, unlabelled, num_classes)
    trainer.run_step()  # cold start
    return trainer.run_step()


def test_a_step_trains_with_its_own_zoom(sets):  # noqa: F811 - the fixture
    zoomed = _second_step(sets, strong_zoom=(0.6, 0.7))
    plain = _second_step(sets)
    assert torch.isfinite(torch.tensor(zoomed["unsupervised"]))
    assert zoomed["unsupervised"] != pytest.approx(plain["unsupervised"])  # the zoom is used
    with pytest.raises(ValueError, match="strong_zoom"):
        config_for("s4al", strong_zoom=(1.5, 1.0))


def test_the_clis_take_a_range():
    assert parse_range("0.8,1.25") == (0.8, 1.25)
    for bad in ("1.2", "a,b", "1.5,1.0", "0,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_range(bad)
