"""model.progress (recent per-phase rate, ETAs) and model.budget (iterations from the
measured speed), with a fake clock, and both inside a real training cycle."""

import time
from dataclasses import replace

import pytest

from model.budget import MIN_MEASURED, Plan, TimeBudget
from model.progress import FitProgress, PhaseRate, phase_table
from model.train import Trainer, train_cycle
from tests.test_train import NUM_CLASSES, fixture_sets, tiny_config  # noqa: F401


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_is_the_current_phases_recent_speed():
    clock = Clock()
    rate = PhaseRate(window_s=60, clock=clock)
    rate.update("cold-start", 1)  # the first iteration paid the warm-up: baseline only
    assert rate.rate() is None
    for i in range(2, 12):
        clock.now += 0.5
        rate.update("cold-start", i)
    assert rate.rate() == pytest.approx(2.0)
    clock.now += 30  # the method phase: slow, and its own first iteration is a baseline
    rate.update("s4al", 12)
    assert rate.rate() is None
    for i in range(13, 200):
        clock.now += 4.0
        rate.update("s4al", i)
    assert rate.rate() == pytest.approx(0.25)
    assert rate.eta_s(100) == pytest.approx(400)
    assert len(rate.samples) <= 17  # a minute of samples, not the whole phase


def test_eta_follows_the_recent_rate_not_the_cycle_average():
    # the case: cheap iterations first, then 4 s ones; the average said 4,474 s
    clock = Clock()

    class FakeTrainer:
        config = tiny_config(iterations=2000, cold_start_iterations=200)
        iteration = 0

        def replan(self, cold_end, total):
            raise AssertionError("no budget configured")

    trainer = FakeTrainer()
    tracker = FitProgress(trainer, clock=clock)
    for i in range(1, 335):
        clock.now += 1.76 if i <= 200 else 4.05
        trainer.iteration = i
        tracker.measure("cold-start" if i <= 200 else "s4al")
    update = tracker.update("s4al", 0.5)
    assert update["rate"] == pytest.approx(1 / 4.05)
    assert update["phase_eta_s"] == pytest.approx((2000 - 334) * 4.05, rel=1e-3)
    assert update["eta_s"] == pytest.approx(update["phase_eta_s"])
    assert update["phases"]["cold-start"] == {"iteration": 200, "total": 200,
                                              "rate": pytest.approx(1 / 1.76), "eta_s": 0.0}
    assert update["phases"]["s4al"]["iteration"] == 134


def test_phase_table_assumes_the_current_rate_for_later_phases():
    table = phase_table({"cold-start": (0, 100), "s4al": (100, 300)}, 50, "cold-start",
                        {"cold-start": 2.0})
    assert table["cold-start"]["eta_s"] == pytest.approx(25)
    assert table["s4al"] == {"iteration": 0, "total": 200, "rate": None,
                             "eta_s": pytest.approx(100)}


def _budget(cycle_s, cold_s, cold=200, total=2000):
    clock = Clock()
    return TimeBudget(cycle_s, cold_s, Plan(cold, total), clock), clock


def test_cold_start_budget_cuts_the_cold_start_and_keeps_the_method_iterations():
    budget, clock = _budget(0, 300)
    plan = Plan(200, 2000)
    clock.now += 10 * 2.0
    plan = budget.plan(True, 10, MIN_MEASURED, 2.0, plan)
    assert plan == Plan(150, 1950)  # 300 s at 2 s each; the 1,800 method ones stay


def test_cycle_budget_cuts_the_method_phase_and_fast_devices_keep_the_schedule():
    budget, clock = _budget(2400, 300)
    clock.now += 600
    assert budget.plan(False, 400, MIN_MEASURED, 4.0, Plan(200, 2000)) == Plan(200, 850)
    fast, clock = _budget(2400, 300)
    clock.now += 30
    assert fast.plan(False, 300, MIN_MEASURED, 0.05, Plan(200, 2000)) == Plan(200, 2000)
    assert fast.plan(False, 300, 2, 100.0, Plan(200, 2000)) == Plan(200, 2000)  # not measured


def test_a_load_spike_does_not_cut_the_cycle_for_good():
    budget, clock = _budget(2400, 300)
    clock.now += 600
    slow = budget.plan(False, 400, MIN_MEASURED, 20.0, Plan(150, 1950))
    assert slow == Plan(150, 490)  # 1,800 s left at 20 s an iteration
    faster = budget.plan(False, 401, MIN_MEASURED, 2.0, slow)
    assert faster == Plan(150, 1301)  # back up: 900 more fit at 2 s, within the 1,800


def test_a_spent_budget_stops_at_once():
    budget, clock = _budget(100, 0)
    clock.now += 101
    assert budget.plan(False, 40, 0, None, Plan(20, 2000)) == Plan(20, 40)
    assert budget.plan(True, 10, 0, None, Plan(20, 2000)) == Plan(10, 10)


def test_a_budgeted_cycle_stops_itself_and_its_state_is_finished(fixture_sets):  # noqa: F811
    labelled, unlabelled, val = fixture_sets
    config = tiny_config(method="supervised", iterations=100_000, cold_start_iterations=0,
                         eval_every=0, time_budget_s=3.0)
    started = time.monotonic()
    result = train_cycle(config, labelled, unlabelled, NUM_CLASSES, val=val[:1])
    assert time.monotonic() - started < 60
    iterations = result.state["iteration"]
    assert 1 <= iterations < 100_000
    assert result.state["config"]["iterations"] == iterations  # warm-starts, never resumes
    assert result.history[-1]["iteration"] == iterations and result.metrics


def test_the_cold_start_end_hands_over_a_snapshot(fixture_sets):  # noqa: F811
    labelled, unlabelled, val = fixture_sets
    seen, updates = [], []
    config = tiny_config(iterations=4, cold_start_iterations=2)
    result = train_cycle(config, labelled, unlabelled, NUM_CLASSES, val=val[:1],
                         progress=updates.append, on_cold_start_end=seen.append)
    assert len(seen) == 1 and result.state["iteration"] == 4
    snapshot = seen[0]
    assert snapshot.state["iteration"] == 2 == snapshot.state["config"]["iterations"]
    assert set(snapshot.metrics) == {"teacher", "student"}
    assert {"rate", "eta_s", "phase_eta_s", "phases"} <= set(updates[-1])
    warm = Trainer(replace(config, cold_start_iterations=0), labelled, unlabelled,
                   NUM_CLASSES, init_state=snapshot.state)
    assert warm.iteration == 0  # a finished state: a new cycle, not a resumed one


def test_the_eta_never_exceeds_the_budget_left():
    clock = Clock()

    class FakeTrainer:
        config = tiny_config(iterations=2000, cold_start_iterations=200, time_budget_s=600)
        iteration = 0

        def replan(self, cold_end, total):
            self.config = replace(self.config, cold_start_iterations=cold_end,
                                  iterations=total)

    trainer = FakeTrainer()
    tracker = FitProgress(trainer, clock=clock)
    for i in range(1, 11):
        clock.now += 10.0  # 10 s an iteration: 2,000 would take 5.5 h
        trainer.iteration = i
        tracker.measure("cold-start")
    update = tracker.update("cold-start", 1.0)
    assert update["eta_s"] == pytest.approx(500)  # 600 s budget, 100 s spent
    assert trainer.config.cold_start_iterations == 60  # what fits in the 600 s


def test_the_eta_is_a_number_from_the_first_iteration():
    clock = Clock()

    class FakeTrainer:
        config = tiny_config(iterations=100, cold_start_iterations=10)
        iteration = 0

    trainer = FakeTrainer()
    tracker = FitProgress(trainer, clock=clock)
    clock.now += 3.0
    trainer.iteration = 1
    tracker.measure("cold-start")
    update = tracker.update("cold-start", 1.0)
    assert update["rate"] is None and update["eta_s"] == pytest.approx(99 * 3.0)
