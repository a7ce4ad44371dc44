"""The training methods, by name: `STEPS[method]` is the step class `model.train.Trainer`
runs each iteration (model.methods.base describes the contract)."""

from __future__ import annotations

from model.methods.base import TrainStep
from model.methods.s4al import MeanTeacherStep, S4ALStep, SupervisedStep
from model.methods.tsf import VARIANTS, TsfStep

STEPS: dict[str, type[TrainStep]] = {
    "supervised": SupervisedStep,
    "mean-teacher": MeanTeacherStep,
    "s4al": S4ALStep,
    **dict.fromkeys(VARIANTS, TsfStep),
}
