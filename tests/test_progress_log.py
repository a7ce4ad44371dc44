"""jobs_base.ProgressReporter: a progress line about once a minute, with rate and ETAs."""

import logging
import re

from s4al_backend import jobs_base as jobs


def test_a_progress_line_every_minute_with_rate_and_eta(monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr(jobs.time, "monotonic", lambda: clock[0])
    reporter = jobs.ProgressReporter(7)
    with caplog.at_level(logging.INFO, "s4al_backend.jobs_base"):
        for i in range(1, 301):
            clock[0] += 1.0
            reporter({"phase": "s4al", "iteration": i, "total": 1000, "loss": 0.5,
                      "rate": 1.0, "eta_s": 1000.0 - i, "phase_eta_s": 1000.0 - i})
        reporter({"phase": "s4al", "iteration": 1000, "total": 1000, "loss": 0.4})
    lines = [r.getMessage() for r in caplog.records if " it/s" in r.getMessage()
             or "1000/1000" in r.getMessage()]
    iterations = [int(re.search(r"s4al (\d+)/1000", line).group(1)) for line in lines]
    assert iterations == [61, 121, 181, 241, 1000]
    assert lines[0] == ("project 7: s4al 61/1000 loss 0.500, 1.00 it/s, phase eta 939 s, "
                        "eta 939 s")


def test_a_new_phase_drops_the_previous_phases_rate_and_eta():
    reporter = jobs.ProgressReporter(7)
    reporter({"phase": "s4al", "iteration": 5, "total": 10, "rate": 1.0, "eta_s": 5.0,
              "phases": {"s4al": {"iteration": 5}}})
    reporter({"phase": "predict", "iteration": 1, "total": 20})
    assert {"rate", "eta_s", "phases"}.isdisjoint(reporter.latest)
    assert reporter.latest["phase"] == "predict" and reporter.latest["total"] == 20
