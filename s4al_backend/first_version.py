"""A first version before the cycle ends: the cold start's network, published at once.

A project's first cycle trains from the backbone: COLD_START_ITERATIONS supervised (cut to
COLD_START_BUDGET seconds), then METHOD for the rest of CYCLE_BUDGET. Without this module
every task would show `untrained` until the whole cycle ends (tens of minutes on a CPU).
When the cold start hands over, `FirstVersion` saves its network as a version of the
project's store, pushes a pre-label of it to every pool task and points the project at it;
training then goes on and the cycle's own version replaces it. It acquires no regions (the
cycle's version does). The version's train state counts as a finished cycle, so a cycle
that dies later still warm-starts from it. A failure here is logged and training goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from .acquire import Acquisition

log = logging.getLogger(__name__)


def early_network(metrics: dict) -> str:
    """The student unless the holdout shows the teacher better: after a short cold start
    the EMA teacher still carries much of the untrained decoder."""
    try:
        better = metrics["teacher"]["miou"] > metrics["student"]["miou"]
    except (KeyError, TypeError):
        return "student"
    return "teacher" if better else "student"


class FirstVersion:
    """`on_cold_start_end` for model.train.train_cycle, bound to one cycle's data."""

    def __init__(self, cycle: Any, label_map: Any, pool: dict, info: dict, tasks: list[dict],
                 meta: dict):
        self.cycle = cycle
        self.label_map = label_map
        self.pool = pool
        self.info = info
        self.tasks = tasks
        self.meta = meta
        self.version: str | None = None

    def __call__(self, snapshot: Any) -> None:
        with self.cycle.timed("first_version_s"):
            try:
                self.publish(snapshot)
            except Exception as exc:  # the cycle's own version still comes
                log.warning("project %s: first version not published (training goes on): "
                            "%s: %s", self.cycle.project, type(exc).__name__, exc)

    def publish(self, snapshot: Any) -> None:
        cycle = self.cycle
        cycle.phase("first-version", message="publishing the cold start's network")
        published = early_network(snapshot.metrics)
        served = snapshot.student if published == "student" else snapshot.teacher
        self.version = cycle.store.save(served, list(self.label_map.classes), {
            **self.meta,
            "config": snapshot.state["config"],
            "metrics": snapshot.metrics,
            "train_state": snapshot.state,
            "fingerprint": None,  # never "nothing changed": the cycle's version must come
            "published": published,
            "first_version": True,
        })
        acquisition = Acquisition(cycle.settings, cycle.studio, cycle.project, cycle.progress)
        _, pushed, _ = acquisition.run(self.label_map, self.pool, snapshot.student, served,
                                       self.version, select=False)
        cycle.follow_version(self.info, self.version, self.tasks)
        log.info("project %s: first version %s (the cold start's %s, iteration %d) published, "
                 "%d pre-labels pushed", cycle.project, self.version, published,
                 snapshot.state["iteration"], pushed)
