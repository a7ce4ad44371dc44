"""The papers' baselines and S4AL (papers/s4al.md Sec. 3): supervised, mean teacher, S4AL.

The supervised step is `model.methods.base.SupervisedStep` (every method's cold start);
the other two are `MixingStep`s that differ only in their switches.
"""

from __future__ import annotations

from model.methods.base import MixingStep, SupervisedStep

__all__ = ["MeanTeacherStep", "S4ALStep", "SupervisedStep"]


class MeanTeacherStep(MixingStep):
    """Eq. 4: the teacher pseudo-labels weak views; the student learns them on strong views
    mixed by ClassMix within the batch, each image weighted by its eta."""


class S4ALStep(MixingStep):
    """Eq. 6: the mean teacher with per-pixel confidence weighting (Eq. 5), plus Balanced
    ClassMix: classes drawn from the head and tail of a replayed image's pseudo-label are
    pasted onto the current images, a second eta-weighted loss."""

    confidence_weighting = True
    replays = True
