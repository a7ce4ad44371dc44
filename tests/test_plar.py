"""model/plar.py and model/class_statistics.py: statistics, distances, voting, the Error Mask
Decoder and PLAR."""

import numpy as np
import pytest
import torch

from model.class_statistics import RunningClassStatistics, class_statistics
from model.ignore import IGNORE_INDEX
from model.plar import (
    ErrorMaskDecoder,
    PseudoLabelRefiner,
    emd_loss,
    error_mask,
    euclidean_distance,
    hybrid_distance,
    mahalanobis_distance,
    vote,
)


def _clusters(num_classes=3, per_class=400, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 4
    mixing = torch.randn(num_classes, dim, dim, generator=g) * 0.5 + torch.eye(dim)
    feats, labels = [], []
    for c in range(num_classes):
        x = torch.randn(per_class, dim, generator=g) @ mixing[c] + centres[c]
        feats.append(x)
        labels.append(torch.full((per_class,), c))
    return torch.cat(feats), torch.cat(labels)


def test_mahalanobis_equals_direct_computation():
    feats, labels = _clusters()
    labels[:5] = IGNORE_INDEX  # ignored pixels do not count
    stats = class_statistics(
        feats, labels, num_classes=4, shrinkage=0.0, min_cov_pixels=2, covariance="class"
    )
    queries = torch.randn(50, 8, generator=torch.Generator().manual_seed(1)) * 3
    got = mahalanobis_distance(queries, stats).numpy()
    got_e = euclidean_distance(queries, stats).numpy()
    x, y, q = feats.double().numpy(), labels.numpy(), queries.double().numpy()
    for c in range(3):
        xc = x[y == c]
        mean = xc.mean(0)
        inv = np.linalg.inv(np.cov(xc, rowvar=False))
        diff = q - mean
        direct = np.sqrt(np.einsum("pi,ij,pj->p", diff, inv, diff) / 8)
        np.testing.assert_allclose(got[:, c], direct, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            got_e[:, c], np.linalg.norm(diff, axis=1) / np.sqrt(8), rtol=1e-5, atol=1e-5
        )
    assert stats.full_cov[:3].all() and not stats.present[3]
    assert np.isinf(got[:, 3]).all() and np.isinf(got_e[:, 3]).all()


def test_tied_mahalanobis_uses_the_pooled_within_class_covariance():
    feats, labels = _clusters()
    stats = class_statistics(feats, labels, num_classes=3, shrinkage=0.0, covariance="tied")
    x, y = feats.double().numpy(), labels.numpy()
    scatter = sum(
        (x[y == c] - x[y == c].mean(0)).T @ (x[y == c] - x[y == c].mean(0)) for c in range(3)
    )
    inv = np.linalg.inv(scatter / (len(y) - 3))
    for c in range(3):
        np.testing.assert_allclose(stats.inv_cov[c].numpy(), inv, rtol=1e-4, atol=1e-5)
    q = torch.randn(20, 8)
    diff = q.double().numpy() - x[y == 1].mean(0)
    direct = np.sqrt(np.einsum("pi,ij,pj->p", diff, inv, diff) / 8)
    np.testing.assert_allclose(mahalanobis_distance(q, stats)[:, 1].numpy(), direct, rtol=1e-4)


def test_shrinkage_makes_small_classes_invertible_and_one_pixel_falls_back():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 32, generator=g)
    labels = torch.zeros(40, dtype=torch.long)
    labels[20:] = 1
    labels[39] = 2  # one pixel of class 2
    feats[30:39] = feats[30]  # class 1 partly duplicated: rank-deficient covariance
    for shrinkage in (None, 0.0, 0.5):
        per_class = class_statistics(
            feats, labels, 3, shrinkage=shrinkage, min_cov_pixels=4, covariance="class"
        )
        assert not per_class.full_cov[2] and per_class.present[2]  # Euclidean fallback
        tied = class_statistics(feats, labels, 3, shrinkage=shrinkage, min_cov_pixels=4)
        assert tied.full_cov.all()  # the shared covariance serves the one-pixel class too
        for stats in (per_class, tied):
            d = mahalanobis_distance(torch.randn(10, 32, generator=g), stats)
            assert torch.isfinite(d).all()
    # identical vectors only: zero variance everywhere, still finite
    same = class_statistics(torch.ones(5, 4), torch.tensor([0, 0, 0, 1, 1]), 2)
    assert torch.isfinite(mahalanobis_distance(torch.zeros(3, 4), same)).all()


def test_running_statistics_with_unit_momentum_match_batch_statistics():
    feats, labels = _clusters(per_class=100)
    running = RunningClassStatistics(3, 8, momentum=1.0, shrinkage=0.1)
    running.update(feats[:150], labels[:150])
    running.update(feats[150:], labels[150:])
    a = running.statistics()
    b = class_statistics(feats, labels, 3, shrinkage=0.1)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.inv_cov, b.inv_cov, rtol=1e-4, atol=1e-5)
    copy = RunningClassStatistics(3, 8)
    copy.load_state_dict(running.state_dict())
    torch.testing.assert_close(copy.statistics().mean, b.mean)


def test_hybrid_distance_keeps_infinity():
    inf = float("inf")
    d = hybrid_distance(
        torch.tensor([[1.0, inf]]), torch.tensor([[3.0, inf]]), torch.tensor([0.25])
    )
    assert d[0, 0] == pytest.approx(2.5) and torch.isinf(d[0, 1])


def test_vote_agree_corrects_disagree_queues_within_budget():
    e = torch.tensor([0, 1, 2, 3, 4, 5, 1])
    m = torch.tensor([0, 2, 2, 0, 0, 0, 1])
    v = vote(e, m)
    assert v.corrected.tolist() == [True, False, True, False, False, False, True]
    assert v.queued.tolist() == [False, True, False, True, True, True, False]
    assert v.label.tolist() == [0, 255, 2, 255, 255, 255, 1]
    # budget 2: the two highest-priority disagreeing pixels are queued, the others left
    prio = torch.tensor([0.0, 0.1, 0.0, 0.9, 0.3, 0.8, 0.0])
    v = vote(e, m, budget=2, priority=prio)
    assert v.queued.tolist() == [False, False, False, True, False, True, False]
    assert v.corrected.sum() == 3
    assert vote(e, m, budget=0).queued.sum() == 0
    assert vote(e, m, budget=10).queued.sum() == 4


def test_error_mask_is_emd_or_low_confidence():
    conf = torch.tensor([[[0.5, 0.9], [0.95, 0.6]]])
    emd = torch.tensor([[[-5.0, 5.0], [-5.0, -5.0]]])
    assert error_mask(conf, emd).tolist() == [[[True, True], [False, True]]]
    assert error_mask(conf, None).tolist() == [[[True, False], [False, True]]]
    assert error_mask(conf, emd, confidence_threshold=None).tolist() == [
        [[False, True], [False, False]]
    ]


def test_emd_learns_a_synthetic_error_pattern():
    """The pseudo-label is wrong wherever channel 0 of the 'features' is positive next to a
    positive channel 1 (a spatial AND); the decoder must learn it from labelled pixels only."""
    torch.manual_seed(0)
    emd = ErrorMaskDecoder(in_channels=6, hidden=16)
    opt = torch.optim.Adam(emd.parameters(), lr=1e-2)

    def batch(n=8):
        x = torch.randn(n, 6, 16, 16)
        err = (x[:, 0] > 0) & (torch.roll(x[:, 1], 1, dims=2) > 0)
        target = torch.zeros(n, 16, 16, dtype=torch.long)
        pseudo = err.long()
        target[:, :, :3] = IGNORE_INDEX  # unlabelled pixels: wrong on purpose, ignored
        pseudo[:, :, :3] = 1
        return x, pseudo, target, err

    for _ in range(150):
        x, pseudo, target, _ = batch()
        loss = emd_loss(emd(x), pseudo, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, _, _, err = batch(16)
    with torch.no_grad():
        pred = torch.sigmoid(emd(x))[:, 0] > 0.5
    assert (pred == err).float().mean() > 0.93
    assert emd_loss(emd(x), err.long(), torch.full_like(err.long(), 255)).item() == 0.0


def test_emd_inputs_concatenate_levels_and_probabilities():
    aspp, dec = torch.randn(2, 5, 4, 4), torch.randn(2, 7, 16, 16)
    probs = torch.softmax(torch.randn(2, 3, 64, 64), 1)
    x = ErrorMaskDecoder.inputs(aspp, dec, probs)
    assert x.shape == (2, 15, 16, 16)
    assert ErrorMaskDecoder(15, hidden=8)(x).shape == (2, 1, 16, 16)


def _scene(seed=0, num_classes=3, dim=6):
    """Two images 32x32 whose grid features (8x8, stride 4) cluster by the true class;
    the pseudo-label is wrong on the right half of class 1's stripe."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(2, 32, 32, dtype=torch.long)
    truth[:, :, 10:22] = 1
    truth[:, :, 22:] = 2
    centres = torch.randn(num_classes, dim, generator=g) * 5
    grid_truth = truth[:, ::4, ::4]
    dec = centres[grid_truth].permute(0, 3, 1, 2) + 0.3 * torch.randn(2, dim, 8, 8, generator=g)
    aspp = torch.nn.functional.avg_pool2d(dec, 2)  # coarse level, same clusters
    pseudo = truth.clone()
    pseudo[:, :, 16:22] = 0  # wrong
    conf = torch.full((2, 32, 32), 0.95)
    conf[:, :, 16:22] = 0.5  # the errors are the unconfident pixels
    return truth, pseudo, conf, aspp, dec


def test_refiner_corrects_errors_from_image_labels_and_pool():
    truth, pseudo, conf, aspp, dec = _scene()
    refiner = PseudoLabelRefiner(3, aspp.shape[1], dec.shape[1], min_cov_pixels=4)
    err = error_mask(conf)
    # image 0 has labelled regions (a column block of each class), image 1 none
    labels = torch.full_like(truth, IGNORE_INDEX)
    labels[0, :, 0:8] = truth[0, :, 0:8]
    labels[0, :, 12:16] = truth[0, :, 12:16]
    labels[0, :, 24:32] = truth[0, :, 24:32]
    # pool statistics from a fully labelled copy
    loss = refiner.observe(aspp, dec, truth)
    assert loss.requires_grad
    r = refiner.refine(aspp, dec, pseudo, conf, err, labels)
    assert r.image_stats.tolist() == [True, False]
    assert r.error.sum() > 0 and r.corrected.any()
    right = (r.label == truth)[r.corrected].float().mean()
    assert right > 0.95
    assert r.changed.sum() >= 0.9 * err[1].sum()  # image 1's errors fixed from the pool
    # reliable pixels keep their pseudo-label, labelled pixels their label
    assert (r.label[~err] == torch.where(labels != 255, labels, pseudo)[~err]).all()
    assert not (r.error & (labels != 255)).any()


def test_refiner_queues_disagreement_within_budget_and_ignores_the_rest():
    truth, pseudo, conf, aspp, dec = _scene()
    refiner = PseudoLabelRefiner(3, aspp.shape[1], dec.shape[1], queue_budget=0.05)
    refiner.observe(aspp, dec, truth)
    # features of the error cells exactly between two class means: the votes may split
    err = error_mask(conf)
    noisy = dec.clone()
    noisy[:, :, :, 4:6] = torch.randn(2, dec.shape[1], 8, 2) * 20
    r = refiner.refine(aspp, noisy, pseudo, conf, err)
    per_image_cells = (r.queued[:, ::4, ::4]).flatten(1).sum(1)
    assert (per_image_cells == int(0.05 * 64)).all()  # budget binding: 3 cells per image
    refiner.queue_budget = None
    unlimited = refiner.refine(aspp, noisy, pseudo, conf, err)
    assert unlimited.queued.sum() > r.queued.sum()
    assert not (unlimited.queued & unlimited.corrected).any()
    untouched = r.error & ~r.corrected
    assert (r.label[untouched] == IGNORE_INDEX).all()


def test_class_with_one_labelled_pixel_does_not_crash():
    truth, pseudo, conf, aspp, dec = _scene()
    refiner = PseudoLabelRefiner(3, aspp.shape[1], dec.shape[1], min_image_pixels=1)
    labels = torch.full_like(truth, IGNORE_INDEX)
    labels[:, 0, 0] = 0  # one pixel of class 0
    labels[:, 0:8, 24:32] = 2
    labels[:, 4, 12] = 1  # and one of class 1 (one grid cell each)
    refiner.observe(aspp, dec, labels)
    r = refiner.refine(aspp, dec, pseudo, conf, error_mask(conf), labels)
    assert r.image_stats.all()
    stats = refiner.pool_decoder.statistics()
    assert not stats.full_cov[0] and not stats.full_cov[1]
    assert torch.isfinite(stats.inv_cov).all()
    # no statistics at all yet: nothing corrected, nothing crashes
    empty = PseudoLabelRefiner(3, aspp.shape[1], dec.shape[1])
    r = empty.refine(aspp, dec, pseudo, conf, error_mask(conf))
    assert not r.corrected.any()


def test_refiner_state_dict_carries_pool_statistics():
    truth, _, _, aspp, dec = _scene()
    a = PseudoLabelRefiner(3, aspp.shape[1], dec.shape[1])
    a.observe(aspp, dec, truth)
    b = PseudoLabelRefiner(3, aspp.shape[1], dec.shape[1])
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.pool_decoder.count, a.pool_decoder.count)


def test_tradeoff_weights_learn_with_an_absent_class_and_stay_finite():
    """Class 3 has no pixels (infinite distances): gradients must stay finite, and the
    module must learn to trust the level that separates the classes (the decoder here)."""
    from model.plar import TradeOffWeights

    feats, labels = _clusters(per_class=100)
    noise = torch.randn(feats.shape, generator=torch.Generator().manual_seed(3)) * 4
    stats_dec = class_statistics(feats, labels, 4)
    stats_aspp = class_statistics(noise, labels, 4)
    module = TradeOffWeights(8, 8, hidden=8)
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(60):
        loss = module.loss(noise, feats, labels, stats_aspp, stats_dec)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in module.parameters())
        opt.step()
    alpha_beta = module(noise, feats)
    assert (alpha_beta < 0.3).float().mean() > 0.9  # weight of the uninformative ASPP level


def test_merge_takes_image_classes_from_the_image_and_the_rest_from_the_pool():
    from model.class_statistics import merge_statistics

    feats, labels = _clusters(per_class=100)
    per_class = {"min_cov_pixels": 4, "covariance": "class"}
    pool = class_statistics(feats, labels, 4, **per_class)  # classes 0-2, class 3 absent
    img_feats = torch.randn(7, 8)
    img_labels = torch.tensor([1, 3, 3, 3, 3, 3, 3])  # class 1: one pixel; class 3: six
    image = class_statistics(img_feats, img_labels, 4, **per_class)
    merged = merge_statistics(image, pool, min_pixels=1)
    torch.testing.assert_close(merged.mean[1], img_feats[0])  # the image's mean...
    torch.testing.assert_close(merged.inv_cov[1], pool.inv_cov[1])  # ...the pool's shape
    torch.testing.assert_close(merged.mean[0], pool.mean[0])
    torch.testing.assert_close(merged.inv_cov[3], image.inv_cov[3])  # only the image has it
    assert merged.present.all() and merged.full_cov[3]
    strict = merge_statistics(image, pool, min_pixels=2)
    torch.testing.assert_close(strict.mean[1], pool.mean[1])
    # tied: every class, the image's own included, shares the pool's covariance
    pool_t = class_statistics(feats, labels, 4)
    image_t = class_statistics(img_feats, img_labels, 4, min_cov_pixels=2)
    tied = merge_statistics(image_t, pool_t, min_pixels=1, tied=True)
    torch.testing.assert_close(tied.mean[3], img_feats[1:].mean(0))
    for c in range(4):
        torch.testing.assert_close(tied.inv_cov[c], pool_t.inv_cov[0])
    assert tied.full_cov.all()


def test_candidates_restrict_the_votes_to_the_teachers_top_classes():
    truth, pseudo, conf, aspp, dec = _scene()
    err = error_mask(conf)
    probs = torch.zeros(2, 3, 32, 32)
    probs[:, 0], probs[:, 2] = 0.5, 0.4  # the teacher's top 2 exclude the true class 1
    probs[:, 1] = 0.1
    free = PseudoLabelRefiner(3, aspp.shape[1], dec.shape[1], candidates=None)
    free.observe(aspp, dec, truth)
    assert (free.refine(aspp, dec, pseudo, conf, err, probs=probs).label[err] == 1).all()
    top2 = PseudoLabelRefiner(3, aspp.shape[1], dec.shape[1], candidates=2)
    top2.load_state_dict(free.state_dict())
    r = top2.refine(aspp, dec, pseudo, conf, err, probs=probs)
    assert r.corrected.any() and not (r.label[r.corrected] == 1).any()
