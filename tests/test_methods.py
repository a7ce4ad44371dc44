"""The step contract (model/methods/base.py), checked for every registered method alike, on
the CamVid fixture: it is a known method, a training step moves the student and reports
finite named losses, and its state survives a save and a resume (an unfinished cycle) and
a warm start (a finished one)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.config import METHODS, TrainConfig
from model.data import load_folder, read_classes
from model.methods import STEPS
from model.methods.base import TrainStep
from model.train import Trainer
from tests.conftest import CAMVID as CAMVID_ROOT


@pytest.fixture(scope="module")
def sets():
    train = load_folder(CAMVID_ROOT, "train", downscale=2)
    labelled = train[:2]
    unlabelled = [replace(sample, mask=None) for sample in train[2:6]]
    return labelled, unlabelled, len(read_classes(CAMVID_ROOT))


def config_for(method: str, **overrides) -> TrainConfig:
    values = dict(
        method=method,
        iterations=6,
        cold_start_iterations=1,
        batch_labelled=2,
        batch_unlabelled=2,
        replay_size=2,
        crop_size=(32, 32),
        eval_every=0,
        device="cpu",
        backbone_weights=None,
        seed=1,
    )
    return TrainConfig(**{**values, **overrides})


def assert_same(a, b, where: str = "state") -> None:
    """Equal nested state: dicts, lists, tensors (bitwise), plain values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("method", sorted(STEPS))
class TestStepContract:
    def test_is_a_known_method(self, method):
        assert method in METHODS
        assert issubclass(STEPS[method], TrainStep)
        assert TrainConfig(method=method).method == method

    def test_a_step_trains_and_its_state_round_trips(self, method, sets):
        labelled, unlabelled, num_classes = sets
        config = config_for(method)
        trainer = Trainer(config, labelled, unlabelled, num_classes)
        assert trainer.current_step() is trainer.cold_start_step
        trainer.run_step()
        before = [p.detach().clone() for p in trainer.student.parameters()]
        assert trainer.current_step() is trainer.step
        losses = trainer.run_step()
        assert "supervised" in losses
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
        if trainer.step.uses_unlabelled:
            assert "unsupervised" in losses
        assert losses["loss"] == pytest.approx(
            sum(v for k, v in losses.items() if k in self.loss_names(losses, trainer)), rel=1e-5
        )
        after = list(trainer.student.parameters())
        assert any(not torch.equal(a, p) for a, p in zip(before, after, strict=True))

        state = trainer.state_dict()  # an unfinished cycle: resumed where it stopped
        resumed = Trainer(config, labelled, unlabelled, num_classes, init_state=state)
        assert resumed.iteration == trainer.iteration == 2
        assert_same(state, resumed.state_dict())

    def test_a_finished_state_warm_starts_the_next_cycle(self, method, sets):
        labelled, unlabelled, num_classes = sets
        config = config_for(method, iterations=2)
        first = Trainer(config, labelled, unlabelled, num_classes)
        while first.iteration < config.iterations:
            first.run_step()
        finished = first.state_dict()
        second = Trainer(config_for(method, iterations=3), labelled, unlabelled, num_classes,
                         init_state=finished)
        assert second.iteration == 0  # a new cycle: fresh schedule
        assert_same(finished["student"], second.student.state_dict(), "student")
        assert_same(finished["teacher"], second.teacher.state_dict(), "teacher")
        if "friend" in finished["step"]:  # tsf: the friend continues too
            assert_same(finished["step"]["friend"], second.step.friend.state_dict(), "friend")
        second.run_step()
        assert second.iteration == 1

    @staticmethod
    def loss_names(losses: dict, trainer: Trainer) -> set[str]:
        """The entries of a step's result that are losses (the rest are its metrics)."""
        return set(losses) - {"loss"} - set(trainer.step.metrics())
