"""A time budget for a training cycle: iteration counts derived from the measured speed.

`TrainConfig.time_budget_s` caps the whole cycle's training time and
`TrainConfig.cold_start_budget_s` the supervised cold start's. After each iteration the
trainer asks `TimeBudget.plan` for the phase ends: from the current phase's recent seconds
per iteration (model.progress.PhaseRate) it fits as many of the configured iterations as
the time left allows, never more than configured. A phase keeps its configured count when
it fits (a GPU runs the paper's schedule untouched). Once the cycle budget is spent the
cycle ends at the next iteration, whatever the estimate said, so it always stops itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["MIN_MEASURED", "Plan", "TimeBudget"]

MIN_MEASURED = 5  # iterations of a phase measured before its end moves


@dataclass(frozen=True)
class Plan:
    """Phase ends as iteration numbers: the cold start ends at `cold_end`, the cycle at
    `total` (the config's `cold_start_iterations` and `iterations`)."""

    cold_end: int
    total: int


@dataclass
class TimeBudget:
    """Seconds for the whole cycle and for its cold start (0 = no limit), against the
    configured iteration counts; `clock` is injectable for tests."""

    cycle_s: float
    cold_start_s: float
    configured: Plan
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)
    phase_started: float = field(init=False)
    phase: str | None = field(init=False, default=None)

    def __post_init__(self):
        self.started = self.phase_started = self.clock()

    @property
    def enabled(self) -> bool:
        return self.cycle_s > 0 or self.cold_start_s > 0

    def remaining_s(self) -> float | None:
        """Seconds of the cycle budget left (None without one): the longest any ETA is."""
        if self.cycle_s <= 0:
            return None
        return max(0.0, self.cycle_s - (self.clock() - self.started))

    def plan(self, cold: bool, iteration: int, measured: int,
             seconds_per_iteration: float | None, current: Plan) -> Plan:
        """The phase ends after `iteration` (`cold`: in the cold start; `measured`: its
        iterations timed so far)."""
        now = self.clock()
        phase = "cold" if cold else "method"
        if phase != self.phase:  # the first phase started with the budget
            if self.phase is not None:
                self.phase_started = now
            self.phase = phase
        elapsed = now - self.started
        if self.cycle_s > 0 and elapsed >= self.cycle_s:  # spent: stop here
            return Plan(min(current.cold_end, iteration), iteration)
        if seconds_per_iteration is None or measured < MIN_MEASURED:
            return current
        fits = math.inf
        if self.cycle_s > 0:
            fits = iteration + (self.cycle_s - elapsed) / seconds_per_iteration
        if cold:
            return self._cold_plan(iteration, now, seconds_per_iteration, fits)
        # from the configured count, not the last plan: a load spike must not cut for good
        cap = self.configured.total - (self.configured.cold_end - current.cold_end)
        return Plan(current.cold_end, max(iteration, min(cap, int(fits))))

    def _cold_plan(self, iteration: int, now: float, spi: float, fits: float) -> Plan:
        cold_fits = fits
        if self.cold_start_s > 0:
            left = self.cold_start_s - (now - self.phase_started)
            cold_fits = min(fits, iteration + left / spi)
        cold_end = max(iteration, min(self.configured.cold_end, int(cold_fits)))
        # the method keeps its configured iterations; the cycle budget trims them later
        total = self.configured.total - (self.configured.cold_end - cold_end)
        return Plan(cold_end, max(cold_end, total))
