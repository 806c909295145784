"""A study-level progress bar: trials complete, failed and running, and the time left.

A thread of the sweep's parent process reads the study's storage every few seconds, so the bar
moves with any number of workers (the parent also runs trials itself, as worker 0, and the other
workers are separate processes). Per-trial lines go above the bar through `write`. The time left is
the wall time per completed trial in this invocation times the trials left; before the first one
completes, the median seconds of the study's earlier complete trials divided over the workers.
"""

from __future__ import annotations

import math
import statistics
import sys
import threading
import time

from optuna.trial import TrialState


def time_left(remaining: int, completed_here: int, elapsed: float, prior_seconds: list[float], workers: int) -> float | None:
    """Seconds left for `remaining` trials: this invocation's pace, else earlier trials' median per worker."""
    if remaining <= 0:
        return 0.0
    if completed_here > 0:
        return elapsed / completed_here * remaining
    if prior_seconds:
        return statistics.median(prior_seconds) * math.ceil(remaining / workers)
    return None


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class StudyProgress:
    """The bar, and the interface a sweep worker writes to (`write`, `update`)."""

    def __init__(self, open_study, n_trials: int, workers: int, desc: str, every: float | None = None):
        from tqdm import tqdm

        self._open_study = open_study  # a zero-argument function: its own storage connection for the thread
        self.n_trials, self.workers = n_trials, workers
        self.every = every if every is not None else (2.0 if sys.stderr.isatty() else 10.0)
        self._stop, self._wake = threading.Event(), threading.Event()
        self._t0 = time.perf_counter()
        self._study = open_study()
        trials = self._study.get_trials(deepcopy=False)
        self._complete_at_start = sum(t.state == TrialState.COMPLETE for t in trials)
        self._prior = [float(t.user_attrs["seconds"]) for t in trials
                       if t.state == TrialState.COMPLETE and isinstance(t.user_attrs.get("seconds"), (int, float))]
        self.bar = tqdm(total=n_trials, initial=self._complete_at_start, unit="trial", desc=desc, dynamic_ncols=True,
                        bar_format="{desc}: {n_fmt}/{total_fmt} complete |{bar}|{postfix}", mininterval=0)
        self.counts = {"complete": self._complete_at_start, "failed": 0, "running": 0}
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="study-progress", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        trials = self._study.get_trials(deepcopy=False)
        c = {"complete": sum(t.state == TrialState.COMPLETE for t in trials),
             "failed": sum(t.state == TrialState.FAIL for t in trials),
             "running": sum(t.state == TrialState.RUNNING for t in trials)}
        self.counts = c
        elapsed = time.perf_counter() - self._t0
        left = time_left(self.n_trials - c["complete"], c["complete"] - self._complete_at_start, elapsed, self._prior, self.workers)
        self.bar.n = min(c["complete"], self.n_trials)
        self.bar.set_postfix_str(f"{c['failed']} failed, {c['running']} running, elapsed {_clock(elapsed)}, "
                                 f"left ~{_clock(left)}", refresh=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.every)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.refresh()
            except Exception:  # a storage hiccup costs one refresh, never the sweep
                pass

    # what a worker (study.workers.work) calls on the bar
    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def update(self, _n: int = 1) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        try:
            self.refresh()
        except Exception:
            pass
        self.bar.close()
