"""The study-level progress bar (progress.py): counts read from the storage, and the time left."""

from __future__ import annotations

import io

import optuna
import pytest
from optuna.trial import TrialState

from rlhf_sweep.study.progress import StudyProgress, time_left


def test_time_left_from_this_invocations_pace_else_earlier_trials():
    assert time_left(6, 2, 30.0, [100.0], 2) == pytest.approx(90.0)  # 15 s a trial so far, 6 left
    assert time_left(5, 0, 12.0, [10.0, 40.0, 20.0], 2) == pytest.approx(60.0)  # median 20 s, ceil(5/2) = 3 rounds
    assert time_left(3, 0, 5.0, [], 1) is None
    assert time_left(0, 4, 50.0, [], 1) == 0.0


def test_the_bar_counts_complete_failed_and_running_trials_from_the_storage(monkeypatch):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    for _ in range(2):
        t = study.ask()
        t.set_user_attr("seconds", 8.0)
        study.tell(t, 1.0)
    study.tell(study.ask(), state=TrialState.FAIL)
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = StudyProgress(lambda: study, n_trials=5, workers=2, desc="demo", every=3600)
    assert bar.counts == {"complete": 2, "failed": 1, "running": 0}
    running = study.ask()  # another worker starts a trial; the bar sees it at its next read
    bar.refresh()
    assert bar.counts == {"complete": 2, "failed": 1, "running": 1} and bar.bar.n == 2
    # nothing completed in this invocation yet: 3 left on 2 workers at the earlier trials' 8 s
    assert "demo: 2/5 complete" in err.getvalue() and "1 failed, 1 running" in err.getvalue() and "left ~00:16" in err.getvalue()
    study.tell(running, 2.0)
    bar.close()
    assert bar.counts == {"complete": 3, "failed": 1, "running": 0} and "demo: 3/5 complete" in err.getvalue()
