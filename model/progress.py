"""Honest progress: the current phase's recent speed, and ETAs from it.

A cycle's phases run at very different speeds (a supervised cold-start iteration costs
about half an S4AL one; the first iterations of a phase pay warm-up costs), so an average
since the start of the cycle misleads. `PhaseRate` measures iterations per second over the
last `window_s` seconds of the current phase only, and restarts at every phase change.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from model.budget import Plan, TimeBudget

__all__ = ["FitProgress", "PhaseRate", "phase_table"]


class PhaseRate:
    """Iterations per second of the current phase, over its last `window_s` seconds.

    `update(phase, iteration)` after each iteration. The first update of a phase is the
    baseline, so the phase's first (warm-up) iteration never counts."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self.phase: str | None = None
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, phase: str, iteration: int) -> None:
        now = self.clock()
        if phase != self.phase:
            self.phase = phase
            self.samples.clear()
        self.samples.append((now, iteration))
        # keep one sample older than the window, so the window is always fully covered
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def rate(self) -> float | None:
        """Iterations per second; None until two iterations of the phase are seen."""
        if len(self.samples) < 2:
            return None
        (t0, i0), (t1, i1) = self.samples[0], self.samples[-1]
        return (i1 - i0) / (t1 - t0) if t1 > t0 and i1 > i0 else None

    def seconds_per_iteration(self) -> float | None:
        rate = self.rate()
        return 1.0 / rate if rate else None

    def eta_s(self, remaining: int) -> float | None:
        spi = self.seconds_per_iteration()
        return None if spi is None else remaining * spi


def phase_table(bounds: dict[str, tuple[int, int]], iteration: int, current: str,
                rates: dict[str, float]) -> dict[str, dict]:
    """Per phase {iteration, total, rate, eta_s}: `bounds` maps a phase to its [start, end)
    iterations, `rates` holds the measured iterations/s of the current and finished phases.
    A phase not started yet has no rate; its ETA assumes the current phase's rate (a lower
    bound: later S4AL phases are slower than the supervised cold start)."""
    table = {}
    for name, (start, end) in bounds.items():
        done = min(max(iteration - start, 0), end - start)
        rate = rates.get(name) or rates.get(current)
        remaining = end - start - done
        table[name] = {"iteration": done, "total": end - start, "rate": rates.get(name),
                       "eta_s": remaining / rate if rate else (0.0 if not remaining else None)}
    return table


class FitProgress:
    """A trainer's progress and time budget: `measure(phase)` after each iteration (speed,
    and new phase ends from the budget, applied with `trainer.replan`); `update(phase,
    loss)` is the progress dict: phase, iteration, total, loss, rate (iterations/s of the
    phase, recent), eta_s (the cycle; always a number: the fit's average speed until the
    phase's rate is measured, and never past the budget), phase_eta_s, phases
    (model.progress.phase_table).

    `trainer` needs `config` (cold_start_iterations, iterations, method, time_budget_s,
    cold_start_budget_s), `iteration` and `replan(cold_end, total)`."""

    def __init__(self, trainer: Any, budgeted: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.trainer = trainer
        config = trainer.config
        self.clock = clock
        self.started, self.start_iteration = clock(), trainer.iteration
        self.rate = PhaseRate(clock=clock)
        self.rates: dict[str, float] = {}
        self.measured = 0
        seconds = (config.time_budget_s, config.cold_start_budget_s) if budgeted else (0, 0)
        self.budget = TimeBudget(*seconds, Plan(config.cold_start_iterations,
                                                config.iterations), clock)

    def measure(self, phase: str) -> None:
        trainer = self.trainer
        self.measured = self.measured + 1 if phase == self.rate.phase else 0
        self.rate.update(phase, trainer.iteration)
        rate = self.rate.rate()
        if rate:
            self.rates[phase] = rate
        if not self.budget.enabled:
            return
        config = trainer.config
        plan = self.budget.plan(phase == "cold-start", trainer.iteration, self.measured,
                                self.rate.seconds_per_iteration(),
                                Plan(config.cold_start_iterations, config.iterations))
        trainer.replan(plan.cold_end, plan.total)

    def average_eta_s(self, remaining: int) -> float:
        """At the fit's average speed: the fallback until a phase's rate is measured."""
        done = max(self.trainer.iteration - self.start_iteration, 1)
        return remaining * (self.clock() - self.started) / done

    def update(self, phase: str, loss: float) -> dict:
        config, iteration = self.trainer.config, self.trainer.iteration
        cold, total = config.cold_start_iterations, config.iterations
        bounds = {"cold-start": (0, cold)} if cold else {}
        bounds[config.method] = (cold, total)
        current = phase if phase in bounds else self.rate.phase or config.method
        phases = phase_table(bounds, iteration, current, self.rates)
        etas = [row["eta_s"] for row in phases.values()]
        eta = sum(etas) if None not in etas else self.average_eta_s(total - iteration)
        left = self.budget.remaining_s()
        if left is not None:  # the budget ends the cycle by then, whatever the rate says
            eta = min(eta, left)
        return {
            "phase": phase,
            "iteration": iteration,
            "total": total,
            "loss": loss,
            "rate": self.rates.get(current),
            "eta_s": eta,
            "phase_eta_s": phases.get(current, {}).get("eta_s"),
            "phases": phases,
        }
