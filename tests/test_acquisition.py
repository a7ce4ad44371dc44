"""Acquisition: heuristics on hand-made probabilities, block scoring, selection, streaming."""

import math
import tracemalloc
import weakref

import numpy as np
import pytest
import torch

from model import acquisition as acq
from model.acquisition import (
    BlockSelector,
    Entropy,
    LeastConfidence,
    Margin,
    RandomScore,
    block_scores,
    image_score,
    prioritise,
    region_size_for,
    regions_mask,
    select_blocks,
    select_images,
)


def confident(num_classes: int, height: int, width: int, p: float = 0.97) -> torch.Tensor:
    probs = torch.full((num_classes, height, width), (1 - p) / (num_classes - 1))
    probs[0] = p
    return probs


# three pixels whose orders differ between heuristics (worked out by hand):
#   A = (0.5, 0.5, 0.0): margin 1 - 0 = 1.0,   least-conf 0.5, entropy ln 2     = 0.693
#   B = (0.4, 0.3, 0.3): margin 1 - .1 = 0.9,  least-conf 0.6, entropy          = 1.089
#   C = (0.9, .05, .05): margin 1 - .85 = 0.15, least-conf 0.1, entropy         = 0.394
PIXELS = torch.tensor([[0.5, 0.4, 0.9], [0.5, 0.3, 0.05], [0.0, 0.3, 0.05]]).reshape(3, 1, 3)


def test_margin_least_confidence_entropy_by_hand():
    margin = Margin().compute_score(PIXELS)[0]
    least = LeastConfidence().compute_score(PIXELS)[0]
    entropy = Entropy().compute_score(PIXELS)[0]
    assert torch.allclose(margin, torch.tensor([1.0, 0.9, 0.15]), atol=1e-6)
    assert torch.allclose(least, torch.tensor([0.5, 0.6, 0.1]), atol=1e-6)
    b = -(0.4 * math.log(0.4) + 2 * 0.3 * math.log(0.3))
    c = -(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05))
    assert torch.allclose(entropy, torch.tensor([math.log(2), b, c]), atol=1e-5)
    assert margin.argsort(descending=True).tolist() == [0, 1, 2]  # A > B > C
    assert least.argsort(descending=True).tolist() == [1, 0, 2]  # B > A > C
    assert entropy.argsort(descending=True).tolist() == [1, 0, 2]  # B > A > C


def test_heuristics_accept_numpy_and_batches():
    probs = PIXELS.numpy()
    for heuristic in (Entropy(), Margin(), LeastConfidence(), RandomScore(0)):
        score = heuristic.compute_score(probs)
        assert isinstance(score, np.ndarray) and score.shape == (1, 3)
        batched = heuristic.compute_score(PIXELS[None].repeat(2, 1, 1, 1))
        assert isinstance(batched, torch.Tensor) and batched.shape == (2, 1, 3)


def test_entropy_is_finite_on_exact_zeros():
    probs = torch.zeros(4, 8, 8)
    probs[2] = 1.0
    score = Entropy().compute_score(probs)
    assert torch.isfinite(score).all() and score.abs().max() < 1e-6


@pytest.mark.parametrize("heuristic", [Entropy(), Margin(), LeastConfidence()])
def test_uniform_block_ranks_first(heuristic):
    probs = confident(5, 40, 60)
    probs[:, 10:20, 30:40] = 0.2  # one block of uniform probabilities
    grid = block_scores(heuristic.compute_score(probs), 10)
    best = select_blocks([grid], per_image=1)
    assert [(r.x, r.y, r.w, r.h) for r in best] == [(30, 10, 10, 10)]


def test_queued_pixels_rank_first_then_the_heuristic():
    probs = confident(5, 40, 60)
    probs[:, 10:20, 30:40] = 0.2  # the most uncertain block
    queued = np.zeros((40, 60), dtype=bool)
    queued[20:30, 0:10] = True  # a confident block, entirely queued
    queued[0:5, 50:60] = True  # half a confident block queued
    score = prioritise(Entropy().compute_score(probs), queued, math.log(5))
    ranked = select_blocks([block_scores(score, 10)], per_image=3)
    assert [(r.x, r.y) for r in ranked] == [(0, 20), (30, 10), (50, 0)]
    assert prioritise(score, None, 9.0) is score
    with pytest.raises(ValueError, match="priority map"):
        prioritise(score, queued[:, :30], 1.0)


def test_nan_block_never_first():
    scores = np.zeros((20, 20), dtype=np.float32)
    scores[0:10, 0:10] = np.nan  # what log(0) gave in the authors' code
    scores[10:20, 10:20] = 0.5
    grid = block_scores(scores, 10)
    assert grid.scores[0, 0] == -np.inf
    first = select_blocks([grid], per_image=1)[0]
    assert (first.x, first.y) == (10, 10)


def test_partial_border_blocks_are_real_blocks():
    scores = np.full((25, 35), 1.0)
    scores[20:, 30:] = 7.0  # the 5 x 5 corner block
    grid = block_scores(scores, 10)
    assert grid.shape == (3, 4)
    assert grid.costs.tolist() == [[100, 100, 100, 50], [100, 100, 100, 50], [50, 50, 50, 25]]
    assert grid.scores[2, 3] == 7.0  # not diluted by padding
    corner = select_blocks([grid], per_image=1)[0]
    assert (corner.x, corner.y, corner.w, corner.h, corner.cost) == (30, 20, 5, 5, 25)
    assert corner.area == 25


def test_region_size_for():
    assert region_size_for(360) == 30
    assert region_size_for(180) == 15
    assert region_size_for(120) == 10
    assert region_size_for(1) == 1


def test_labelled_blocks_excluded():
    scores = np.zeros((30, 30))
    scores[0:10, 0:10] = 3.0  # best block, but labelled
    scores[10:20, 10:20] = 2.0  # second, one labelled pixel
    scores[20:30, 20:30] = 1.0
    labelled = np.zeros((30, 30), dtype=bool)
    labelled[0:10, 0:10] = True
    labelled[15, 15] = True
    picked = select_blocks([block_scores(scores, 10, labelled)], per_image=1)[0]
    assert (picked.x, picked.y) == (20, 20)
    # a label mask works as well: 255 = not labelled
    mask = np.where(labelled, 3, acq.IGNORE_INDEX)
    assert select_blocks([block_scores(scores, 10, mask)], per_image=1)[0] == picked
    # tolerating a labelled share: the partly labelled block competes, costs its open pixels
    grid = block_scores(scores, 10, labelled, max_labelled_fraction=0.5)
    picked = select_blocks([grid], per_image=1)[0]
    assert (picked.x, picked.y, picked.cost) == (10, 10, 99)
    assert grid.scores[0, 0] == -np.inf


def test_ignore_aware_cost():
    scores = np.ones((20, 20))
    valid = np.ones((20, 20), dtype=bool)
    valid[0:10, 0:5] = False  # void pixels: paid for, never used
    grid = block_scores(scores, 10, cost_mask=valid)
    assert grid.costs.tolist() == [[50, 100], [100, 100]]


def brute_force(grids, per_image, budget):
    """Non-streaming reference: every candidate in one sorted list."""
    items = []
    for index, grid in enumerate(grids):
        flat = grid.scores.ravel()
        cands = sorted(
            (i for i in range(flat.size) if np.isfinite(flat[i])), key=lambda i: (-flat[i], i)
        )
        if per_image is not None:
            cands = cands[:per_image]
        items += [
            (-flat[i], index, i, grid.region(index, *divmod(i, grid.shape[1]))) for i in cands
        ]
    items.sort(key=lambda t: t[:3])
    chosen, spent = [], 0
    for *_, region in items:
        if budget is not None and spent + region.cost > budget:
            break
        chosen.append(region)
        spent += region.cost
    return chosen


@pytest.mark.parametrize("per_image,budget", [(4, None), (None, 2000), (3, 1500), (2, 0)])
def test_selection_matches_reference_and_budget_is_exact(per_image, budget):
    rng = np.random.default_rng(1)
    grids, labelled = [], []
    for _ in range(12):
        height, width = rng.integers(20, 50, size=2)
        done = rng.random((height, width)) < 0.02
        labelled.append(done)
        scores = rng.random((height, width))
        scores[rng.random((height, width)) < 0.3] = 0.5  # ties
        grids.append(block_scores(scores, 9, done, max_labelled_fraction=0.05))
    chosen = select_blocks(grids, per_image=per_image, budget=budget)
    assert chosen == brute_force(grids, per_image, budget)
    if budget is not None:
        assert sum(r.cost for r in chosen) <= budget
    # accounting exact to the pixel: cost == pixels that become labelled
    for index, done in enumerate(labelled):
        mine = [r for r in chosen if r.image_index == index]
        after = done | regions_mask(done.shape, mine)
        assert after.sum() - done.sum() == sum(r.cost for r in mine)
        if per_image is not None:
            assert len(mine) <= per_image


def test_budget_fills_to_the_pixel_with_equal_blocks():
    grids = [block_scores(np.random.default_rng(i).random((30, 40)), 10) for i in range(5)]
    chosen = select_blocks(grids, budget=1234)
    assert len(chosen) == 12 and sum(r.cost for r in chosen) == 1200


def test_no_block_selected_twice_across_cycles():
    rng = np.random.default_rng(0)
    shapes = [(45, 60)] * 6
    labelled = [np.zeros(s, dtype=bool) for s in shapes]
    seen = set()
    for _cycle in range(4):
        grids = [block_scores(rng.random(s), 15, labelled[i]) for i, s in enumerate(shapes)]
        chosen = select_blocks(grids, per_image=3)
        for region in chosen:
            key = (region.image_index, region.x, region.y)
            assert key not in seen
            seen.add(key)
            assert not labelled[region.image_index][region.slices].any()
            labelled[region.image_index][region.slices] = True
    assert len(seen) == 6 * 12  # 4 cycles x 3 blocks: every block of every image, once
    grids = [block_scores(rng.random(s), 15, labelled[i]) for i, s in enumerate(shapes)]
    assert select_blocks(grids, per_image=3) == []


def test_selector_rejects_bad_use():
    with pytest.raises(ValueError):
        BlockSelector()
    selector = BlockSelector(per_image=1)
    grid = block_scores(np.ones((10, 10)), 5)
    selector.add(0, grid)
    with pytest.raises(ValueError):
        selector.add(0, grid)


def test_image_score_and_select_images():
    scores = np.array([[1.0, 3.0], [5.0, 7.0]])
    assert image_score(scores) == 4.0
    assert image_score(scores, np.array([[True, False], [False, True]])) == 4.0
    assert image_score(scores, np.ones((2, 2), dtype=bool)) == -math.inf
    values = [0.2, 0.9, 0.5, 0.9, -math.inf]
    assert select_images(values, count=3) == [1, 3, 2]
    assert select_images(values, count=10) == [1, 3, 2, 0]
    assert select_images(values, budget=250, costs=[100] * 5) == [1, 3]


def test_random_score_is_seeded():
    probs = torch.rand(3, 8, 8)
    a, b = RandomScore(5), RandomScore(5)
    assert torch.equal(a.compute_score(probs), b.compute_score(probs))
    assert not torch.equal(a.compute_score(probs), RandomScore(6).compute_score(probs))
    # without a network: a placeholder of the image's shape, the same contract
    blank = acq.placeholder(4, 6)
    assert blank.numel() == 0 and a.compute_score(blank).shape == (4, 6)


def test_get_heuristic():
    assert isinstance(acq.get_heuristic("least-confidence"), LeastConfidence)
    assert acq.get_heuristic("random", seed=3).seed == 3
    with pytest.raises(ValueError):
        acq.get_heuristic("bald")


# --------------------------------------------------------------------------- score_pool
class TinySegmenter(torch.nn.Module):
    """1x1 convolution: logits depend on the pixel, deterministic."""

    def __init__(self, num_classes=11):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.conv(x)


def pool(n, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_score_pool_matches_direct_computation(capsys):
    from model.inference import predict_probabilities

    model, images = TinySegmenter().eval(), pool(5)
    labelled = [None, np.zeros((48, 48), dtype=bool), None, None, None]
    labelled[1][:16, :16] = True
    queued = [None, None, np.zeros((48, 48), dtype=bool), None, None]
    queued[2][30:40, 5:9] = True
    result = acq.score_pool(
        model, images, Entropy(), 16, labelled, batch_size=2, device="cpu", progress=False,
        priority_maps=queued, priority_weight=3.0,
    )  # fmt: skip
    assert "images/s" in capsys.readouterr().err
    assert len(result.grids) == 5 and result.images_per_s > 0
    for i, probs in enumerate(predict_probabilities(model, images, 1, "cpu")):
        score = prioritise(Entropy().compute_score(probs), queued[i], 3.0)
        np.testing.assert_allclose(
            result.grids[i].scores, block_scores(score, 16, labelled[i]).scores, rtol=1e-5
        )
        assert result.image_scores[i] == pytest.approx(image_score(score, labelled[i]), rel=1e-5)
    assert result.grids[1].scores[0, 0] == -np.inf


def test_score_pool_random_needs_no_model():
    result = acq.score_pool(
        None, pool(3, 30), RandomScore(0), 10, progress=False, log=lambda _: None
    )
    assert [g.shape for g in result.grids] == [(3, 3)] * 3


def test_score_pool_hands_each_images_probabilities_to_on_image():
    """The service pushes predictions from the scorer's own pass: on_image sees every
    image's probabilities, in pool order, as predict_probabilities makes them."""
    from model.inference import predict_probabilities

    model, images = TinySegmenter().eval(), pool(3)
    seen = []
    acq.score_pool(
        model, images, Entropy(), 16, batch_size=2, progress=False, log=lambda _: None,
        on_image=lambda index, probs: seen.append((index, probs)),
    )  # fmt: skip
    assert [index for index, _ in seen] == [0, 1, 2]
    for (_, probs), direct in zip(seen, predict_probabilities(model, images, 2), strict=True):
        torch.testing.assert_close(probs, direct)
    nothing = []
    acq.score_pool(
        None, images, RandomScore(0), 16, progress=False, log=lambda _: None,
        on_image=lambda index, probs: nothing.append(probs),
    )  # fmt: skip
    assert nothing == [None, None, None]


class Refuses(list):
    """Per-image values that must not be read at `index`."""

    def __init__(self, values, index):
        super().__init__(values)
        self.index = index

    def __getitem__(self, index):
        assert index != self.index, f"priority map {index} read"
        return super().__getitem__(index)


def test_score_pool_skips_images_with_nothing_left_to_label():
    """A fully labelled image gets an all-excluded grid without being scored: random draws
    go to the open images only (the service's random acquisition is seeded), and its
    priority map is never computed."""
    images = pool(3, 30)
    full = np.ones((30, 30), dtype=bool)
    with_full = acq.score_pool(
        None, images, RandomScore(0), 10, [None, full, None], progress=False,
        priority_maps=Refuses([None, None, None], 1), log=lambda _: None,
    )  # fmt: skip
    without = acq.score_pool(
        None, [images[0], images[2]], RandomScore(0), 10, progress=False, log=lambda _: None
    )
    assert np.isneginf(with_full.grids[1].scores).all() and with_full.image_scores[1] == -np.inf
    np.testing.assert_array_equal(with_full.grids[0].scores, without.grids[0].scores)
    np.testing.assert_array_equal(with_full.grids[2].scores, without.grids[1].scores)


def test_score_pool_takes_a_block_side_per_image():
    """Label Studio projects mix image sizes: REGION_SIZE follows each image's height."""
    images = [pool(1, 30)[0], pool(1, 60)[0]]
    result = acq.score_pool(
        None, images, RandomScore(0), [10, 20], progress=False, log=lambda _: None
    )
    assert [g.block for g in result.grids] == [10, 20]
    assert [g.shape for g in result.grids] == [(3, 3), (3, 3)]


class LiveTensors:
    """Bytes of tracked tensors alive right now, and the peak (torch's CPU allocations are
    invisible to tracemalloc, so the stream's tensors are tracked by hand)."""

    def __init__(self):
        self.live = self.peak = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.element_size() * tensor.nelement()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, size)
        return tensor

    def _release(self, size: int) -> None:
        self.live -= size


class TrackedEntropy(Entropy):
    def __init__(self, tracker: LiveTensors):
        super().__init__()
        self.tracker = tracker

    def compute_score(self, probs):
        return self.tracker.track(super().compute_score(probs))


def _peak_memory(monkeypatch, n_images):
    """Peak bytes of probability and score tensors alive at once, and tracemalloc's peak
    (the numpy side: block grids, image scores)."""
    from model import inference

    real, tracker = inference.predict_probabilities, LiveTensors()

    def tracked(*args, **kwargs):
        for probs in real(*args, **kwargs):
            yield tracker.track(probs)
            del probs

    monkeypatch.setattr(inference, "predict_probabilities", tracked)
    model, images = TinySegmenter().eval(), pool(n_images, size=96)
    tracemalloc.start()
    acq.score_pool(
        model,
        images,
        TrackedEntropy(tracker),
        16,
        batch_size=4,
        progress=False,
        log=lambda _: None,
    )
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    monkeypatch.undo()
    return tracker.peak, traced


def test_score_pool_memory_does_not_grow_with_pool(monkeypatch):
    tensors_small, traced_small = _peak_memory(monkeypatch, 8)
    tensors_large, traced_large = _peak_memory(monkeypatch, 64)
    one_map = 11 * 96 * 96 * 4
    assert 0 < tensors_large == tensors_small <= 5 * one_map  # one batch of maps, one score
    # the 56 extra images keep a 6 x 6 block grid each (~1 kB), never a map (~400 kB)
    assert traced_large - traced_small < one_map
