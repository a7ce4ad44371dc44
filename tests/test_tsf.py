"""model/methods/tsf.py (Teacher-Student-Friend, the error-mask / PLAR targets, the training
step) and model/refinement.py (the same on whole images after a cycle, the audit)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from model.config import METHODS, TrainConfig
from model.data import IGNORE_INDEX, load_folder, read_classes, read_split
from model.methods import STEPS
from model.methods.tsf import VARIANTS, TsfStep, make_targets
from model.plar import PseudoLabelRefiner
from model.refinement import PoolRefinement, plar_audit, queued_maps
from model.ssl import cross_pseudo_supervision_loss
from model.train import Trainer, train_cycle


def test_cps_loss_is_symmetric_in_its_two_networks():
    torch.manual_seed(0)
    a, b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    ab = cross_pseudo_supervision_loss(a(x), b(x))
    ab.backward()
    grads_ab = [p.grad.clone() for p in (*a.parameters(), *b.parameters())]
    for p in (*a.parameters(), *b.parameters()):
        p.grad = None
    ba = cross_pseudo_supervision_loss(b(x), a(x))
    ba.backward()
    grads_ba = [p.grad.clone() for p in (*a.parameters(), *b.parameters())]
    torch.testing.assert_close(ab, ba)
    for g1, g2 in zip(grads_ab, grads_ba, strict=True):
        torch.testing.assert_close(g1, g2)
    assert all(g.abs().sum() > 0 for g in grads_ab)  # both networks learn


def test_every_variant_is_a_registered_method():
    for name in VARIANTS:
        assert name in METHODS and STEPS[name] is TsfStep
        TrainConfig(method=name)
    assert not VARIANTS["tsf"].masks_errors
    assert VARIANTS["tsf-plar"].emd and VARIANTS["tsf-plar"].plar


def _probs():
    """2 images 16x16, 3 classes: left half confident class 0, right half unsure class 1."""
    logits = torch.zeros(2, 3, 16, 16)
    logits[:, 0, :, :8] = 5.0
    logits[:, 1, :, 8:] = 0.5
    return logits.softmax(1)


def test_targets_without_error_mask_use_every_pseudo_label():
    partial = torch.full((2, 16, 16), IGNORE_INDEX)
    partial[0, 0, 15] = 2
    t = make_targets(VARIANTS["tsf"], TrainConfig(), _probs(), None, None, partial, None, None)
    assert (t.label != IGNORE_INDEX).all() and t.label[0, 0, 15] == 2
    assert t.confidence[0, 0, 15] == 1.0 and not t.error.any()
    assert t.counts()["unlabelled_pixels"] == 2 * 256 - 1


def test_confidence_error_mask_drops_and_queues_unsure_pixels():
    partial = torch.full((2, 16, 16), IGNORE_INDEX)
    partial[0, 0, 15] = 2  # a labelled pixel is never an error
    config = TrainConfig(tsf_error_confidence=0.7)
    t = make_targets(VARIANTS["tsf-conf"], config, _probs(), None, None, partial, None, None)
    assert (t.label[:, :, :8] == 0).all()
    assert t.label[0, 0, 15] == 2 and not t.error[0, 0, 15]
    assert t.error[:, :, 8:].sum() == 2 * 128 - 1
    assert (t.label[t.error] == IGNORE_INDEX).all() and torch.equal(t.queued, t.error)


def test_plar_targets_correct_error_pixels_from_features():
    """Features cluster by the true class (0 left, 2 right); the teacher says 1 on the right,
    unsure. PLAR with the pool statistics moves those pixels to class 2."""
    torch.manual_seed(0)
    truth = torch.zeros(2, 16, 16, dtype=torch.long)
    truth[:, :, 8:] = 2
    centres = torch.randn(3, 8) * 5
    decoder = centres[truth[:, ::4, ::4]].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 8, 4, 4)
    aspp = decoder.clone()
    refiner = PseudoLabelRefiner(3, 8, 8, min_cov_pixels=2)
    refiner.observe(aspp, decoder, truth)
    partial = torch.full((2, 16, 16), IGNORE_INDEX)
    t = make_targets(
        VARIANTS["tsf-plar-conf"], TrainConfig(), _probs(), aspp, decoder, partial, None, refiner
    )
    assert t.corrected[:, :, 8:].all() and (t.label[:, :, 8:] == 2).all()
    assert t.changed.sum() == 2 * 128 and not t.queued.any()
    # weighted by the teacher's probability of the new class (Eq. 5's p), or a constant
    torch.testing.assert_close(t.weight[t.corrected], _probs()[:, 2][t.corrected])
    fixed = TrainConfig(tsf_plar_corrected_weight=1.0)
    t = make_targets(
        VARIANTS["tsf-plar-conf"], fixed, _probs(), aspp, decoder, partial, None, refiner
    )
    assert (t.weight[t.corrected] == 1.0).all()


@pytest.fixture(scope="module")
def fixture_sets(camvid_root):
    train = load_folder(camvid_root, "train")
    names = set(read_split(camvid_root / "splits" / "labeled_seed0.txt"))
    labelled = [s for s in train if s.name in names]
    pool = [s for s in train if s.name not in names]
    # the first pool image has one acquired region: it is in both sets, as in the simulator
    partial = np.full_like(pool[0].mask, IGNORE_INDEX)
    partial[20:60, 30:90] = pool[0].mask[20:60, 30:90]
    unlabelled = [replace(s, mask=None) for s in pool]
    unlabelled[0] = replace(pool[0], mask=partial)
    labelled.append(unlabelled[0])
    truth = [s.mask for s in pool]
    return labelled, unlabelled, truth, len(read_classes(camvid_root))


def _config(method, iterations=4, **kw):
    return TrainConfig(
        method=method,
        iterations=iterations,
        cold_start_iterations=1,
        batch_labelled=2,
        batch_unlabelled=2,
        crop_size=(64, 64),
        backbone_weights=None,
        eval_every=2,
        replay_size=4,
        device="cpu",
        **kw,
    )


def test_short_tsf_plar_cycle_on_the_fixture(fixture_sets):
    labelled, unlabelled, truth, num_classes = fixture_sets
    result = train_cycle(_config("tsf-plar"), labelled, unlabelled, num_classes)
    last = result.history[-1]
    for key in (
        "supervised",
        "friend_supervised",
        "cps",
        "unsupervised",
        "emd_loss",
        "emd_recall",
        "error_share",
        "corrected_share",
        "queued_share",
    ):
        assert np.isfinite(last[key]), key
    step = result.state["step"]
    assert step["counters"]["unlabelled_pixels"] > 0
    assert step["counters"]["error_pixels"] >= step["counters"]["corrected_pixels"]
    assert {"friend", "emd", "refiner", "replay"} <= set(step)

    report = plar_audit(result.state, unlabelled, truth)
    assert report["images"] == len(unlabelled)
    assert report["corrected_right"] <= report["corrected"] <= report["error"]
    assert report["queued"] + report["corrected"] <= report["error"]
    known = sum(
        int(((t != IGNORE_INDEX) & ((s.mask is None) or (s.mask == IGNORE_INDEX))).sum())
        for s, t in zip(unlabelled, truth, strict=True)
    )
    assert report["pixels"] == known

    # what acquisition labels first: within PLAR's budget, never on labelled pixels
    queued = queued_maps(result.state, unlabelled)
    assert [q.shape for q in queued] == [s.image.shape[:2] for s in unlabelled]
    assert all(q.dtype == bool for q in queued)
    assert not (queued[0] & (unlabelled[0].mask != IGNORE_INDEX)).any()
    budget = result.state["config"]["tsf_plar_queue_budget"]
    assert all(q.mean() <= budget + 1e-9 for q in queued)
    unbounded = PoolRefinement(result.state, queue_budget=None)
    for sample, q in zip(unlabelled, queued, strict=True):
        assert not (q & ~unbounded(sample.image, sample.mask).queued[0].numpy()).any()
    assert queued_maps(train_cycle(_config("tsf"), labelled, unlabelled, num_classes).state,
                       unlabelled) is None  # fmt: skip


def test_tsf_only_cycle_and_resume_of_an_unfinished_state(fixture_sets):
    labelled, unlabelled, _, num_classes = fixture_sets
    config = _config("tsf", iterations=3)
    trainer = Trainer(config, labelled, unlabelled, num_classes)
    assert trainer.step.emd is None and trainer.step.refiner is None
    friend, student = trainer.step.friend, trainer.student
    assert not torch.equal(friend.classifier.weight, student.classifier.weight)
    assert len(trainer.optimizer.param_groups) == 2
    trainer.run_step()  # cold start: the friend learns too
    assert trainer.history == [] and friend.classifier.weight.grad is not None
    trainer.run_step()
    state = trainer.state_dict()
    resumed = Trainer(config, labelled, unlabelled, num_classes, init_state=state)
    assert resumed.iteration == 2
    torch.testing.assert_close(
        resumed.step.friend.classifier.weight, trainer.step.friend.classifier.weight
    )
    result = resumed.fit()
    assert "cps" in result.history[-1] and "error_share" in result.history[-1]
    # a finished cycle warm-starts the next one: the friend continues too
    nxt = Trainer(_config("tsf-plar"), labelled, unlabelled, num_classes, init_state=result.state)
    assert nxt.iteration == 0
    torch.testing.assert_close(
        nxt.step.friend.classifier.weight, resumed.step.friend.classifier.weight
    )
