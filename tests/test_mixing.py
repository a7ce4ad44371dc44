"""Known-answer tests for ClassMix, Balanced ClassMix and the replay buffer (model/mixing.py)."""

from collections import Counter

import numpy as np
import pytest
import torch

from model.mixing import (
    ClassSampler,
    RandomHalf,
    ReplayBuffer,
    apply_mix,
    classmix_masks,
    head_tail_split,
)

CAMVID_HEAD = [0, 1, 3, 4, 5]  # the authors' hard-coded CamVid split
CAMVID_TAIL = [2, 6, 7, 8, 9, 10]


def stripes(classes: list[int], height: int = 4, width: int = 36) -> torch.Tensor:
    """A label map with one 3-pixel-wide vertical stripe per class, 255 to the right."""
    columns = [c for c in classes for _ in range(3)]
    return torch.tensor(columns + [255] * (width - len(columns))).repeat(height, 1)


def test_classmix_keeps_exactly_the_sampled_classes_pixels():
    generator = torch.Generator().manual_seed(0)
    labels = torch.stack([stripes([0, 2, 5, 7, 9]), stripes([1, 3]), stripes([4])])
    masks = classmix_masks(labels, RandomHalf(generator))
    for image_labels, mask, n_present in zip(labels, masks, [5, 2, 1], strict=True):
        chosen = torch.unique(image_labels[mask])
        assert len(chosen) == (n_present + 1) // 2  # half, rounded up
        assert torch.equal(mask, torch.isin(image_labels, chosen))  # whole classes, no more
        assert not mask[image_labels == 255].any()


def test_apply_mix_takes_source_inside_the_mask_for_images_labels_and_confidences():
    mask = torch.tensor([[[True, False], [False, True]]])
    source = (torch.ones(1, 3, 2, 2), torch.full((1, 2, 2), 7), torch.full((1, 2, 2), 0.9))
    target = (torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 1), torch.full((1, 2, 2), 0.2))
    images, labels, confidence = apply_mix(mask, source, target)
    assert torch.equal(images, mask[:, None].expand(1, 3, 2, 2).float())
    assert labels.tolist() == [[[7, 1], [1, 7]]]
    assert torch.equal(confidence, torch.tensor([[[0.9, 0.2], [0.2, 0.9]]]))


def test_head_tail_split_on_camvid_class_shares():
    # CamVid train pixel shares (data/camvid/README.md), in class order
    shares = [16.9, 23.3, 1.0, 31.7, 4.5, 9.7, 1.2, 1.1, 5.9, 0.6, 0.3]
    head, tail = head_tail_split([int(s * 10) for s in shares], head_pixel_share=0.8)
    # of labelled pixels: Road + Building + Sky = 74.7% < 80%, + Tree = 84.8%
    assert head == [0, 1, 3, 5]
    assert tail == [2, 4, 6, 7, 8, 9, 10]


def test_class_sampler_counts_labelled_pixels_and_ignores_255():
    masks = [np.array([[0, 0, 0, 1], [255, 255, 255, 255]]), np.array([[0, 0, 2, 255]])]
    sampler = ClassSampler.from_masks(masks, num_classes=4, head_pixel_share=0.7)
    # counts 5, 1, 1, 0: class 0 alone is 5/7 = 71% of the labelled pixels
    assert sampler.head.tolist() == [0]
    assert sampler.tail.tolist() == [1, 2, 3]


def test_balanced_classmix_draws_tail_classes_at_the_configured_rate():
    generator = torch.Generator().manual_seed(0)
    sampler = ClassSampler(CAMVID_HEAD, CAMVID_TAIL, n_head=3, n_tail=2, generator=generator)
    labels = stripes(list(range(11)))[None]
    draws = 3000
    counts = Counter()
    for _ in range(draws):
        mask = classmix_masks(labels, sampler)[0]
        chosen = torch.unique(labels[0][mask]).tolist()
        assert sum(c in CAMVID_TAIL for c in chosen) == 2 and len(chosen) == 5
        counts.update(chosen)
    # each tail class: 2 of 6 draws (1/3); each head class: 3 of 5 (3/5); binomial sd < 0.01
    for c in CAMVID_TAIL:
        assert counts[c] / draws == pytest.approx(1 / 3, abs=0.03)
    for c in CAMVID_HEAD:
        assert counts[c] / draws == pytest.approx(3 / 5, abs=0.03)


def test_balanced_classmix_oversamples_a_lone_tail_class_that_classmix_halves():
    labels = stripes([0, 1, 3, 5, 9])[None]  # four head classes and one tail class
    draws = 1000
    balanced = ClassSampler(CAMVID_HEAD, CAMVID_TAIL, generator=torch.Generator().manual_seed(1))
    plain = RandomHalf(torch.Generator().manual_seed(1))
    tail_hits = {"balanced": 0, "plain": 0}
    for _ in range(draws):
        for name, sampler in (("balanced", balanced), ("plain", plain)):
            mask = classmix_masks(labels, sampler)[0]
            tail_hits[name] += bool(mask[labels[0] == 9].any())
    assert tail_hits["balanced"] == draws  # every present tail class is drawn
    assert tail_hits["plain"] / draws == pytest.approx(3 / 5, abs=0.05)  # 3 of 5 classes


def _tail_share(labels: torch.Tensor, tail: list[int]) -> float:
    valid = labels != 255
    return float((torch.isin(labels, torch.tensor(tail)) & valid).sum() / valid.sum())


def test_default_balanced_classmix_adds_the_sources_tail_and_covers_none_of_the_targets():
    # source: three head classes fill it but for a 2x2 tail square (class 9); target: one
    # head class and a 4x4 tail block (class 6) where the source has head pixels
    source = torch.zeros(8, 8, dtype=torch.int64)
    source[:, 3:6], source[:, 6:] = 1, 3
    source[6:, 6:] = 9
    target = torch.full((8, 8), 5, dtype=torch.int64)
    target[:4, :4] = 6
    sampler = ClassSampler(CAMVID_HEAD, CAMVID_TAIL, generator=torch.Generator().manual_seed(0))
    (mixed,) = apply_mix(classmix_masks(source[None], sampler), [source[None]], [target[None]])
    # pasted: the tail square only; the target's 16 tail pixels stay: (16 + 4) / 64
    assert _tail_share(mixed, CAMVID_TAIL) == 20 / 64
    # the authors' 3 head + 2 tail draw pastes the whole source: only its 4 tail pixels
    authors = ClassSampler(CAMVID_HEAD, CAMVID_TAIL, 3, 2, torch.Generator().manual_seed(0))
    (covered,) = apply_mix(classmix_masks(source[None], authors), [source[None]], [target[None]])
    assert _tail_share(covered, CAMVID_TAIL) == 4 / 64


def test_default_balanced_classmix_shows_more_tail_than_classmix_and_never_less_than_no_mix():
    rng = np.random.default_rng(0)
    head, tail = [0, 1, 3], [2, 6, 9]
    generator = torch.Generator().manual_seed(0)
    balanced, plain = ClassSampler(head, tail, generator=generator), RandomHalf(generator)
    shares = {"balanced": [], "plain": [], "none": []}
    for _ in range(200):
        # blocky scenes, 4x4 cells, head classes ten times as likely as tail ones
        cells = rng.choice(head + tail, size=(2, 4, 4), p=[0.3, 0.3, 0.3, 1 / 30, 1 / 30, 1 / 30])
        source, target = torch.from_numpy(cells.repeat(4, 1).repeat(4, 2))[:, None]
        for name, sampler in (("balanced", balanced), ("plain", plain)):
            (mixed,) = apply_mix(classmix_masks(source, sampler), [source], [target])
            shares[name].append(_tail_share(mixed, tail))
        shares["none"].append(_tail_share(target, tail))
        assert shares["balanced"][-1] >= shares["none"][-1]  # pasting tail only adds tail
    assert np.mean(shares["balanced"]) > np.mean(shares["plain"]) + 0.05


def test_replay_buffer_keeps_the_last_distinct_indices_within_its_size():
    buffer = ReplayBuffer(3, torch.Generator().manual_seed(0))
    with pytest.raises(IndexError):
        buffer.sample(1)
    buffer.add(range(10))
    assert list(buffer.indices) == [7, 8, 9]
    buffer.add([8, 10])  # 8 is seen again: it becomes the newest, 7 the oldest drops
    assert list(buffer.indices) == [9, 8, 10]
    draws = buffer.sample(3000)
    assert set(draws) == {8, 9, 10}
    for index in (8, 9, 10):
        assert draws.count(index) / 3000 == pytest.approx(1 / 3, abs=0.03)
    restored = ReplayBuffer(3)
    restored.load_state_dict(buffer.state_dict())
    assert list(restored.indices) == [9, 8, 10]
