"""compare-fixes' runs: (arm, seed) pairs as planned trials of one study in OUT, run by the sweep (its storage
and resume, workers, MLflow parent run with a nested run per arm x seed), the confirmation runs on held-out
seeds, and the wall-time budget that decides whether the next block of runs fits.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna

from rlhf_sweep.fixes.spec import DECIDE_ON, STUDY_NAME, FixesError, FixesSpec, study_spec
from rlhf_sweep.run import layout
from rlhf_sweep.study import sweep
from rlhf_sweep.study.definition import DefinitionChanged
from rlhf_sweep.study.spec import StudyError
from rlhf_sweep.study.storage import open_storage


class Runner:
    """Runs (arm, seed) pairs as planned trials of one study in OUT and keeps their summaries and timing."""

    def __init__(self, spec: FixesSpec, out: Path, extra: tuple[str, ...], tracking_uri: str | None, progress: bool, first_number: int = 0):
        self.spec, self.out, self.extra, self.uri, self.progress = spec, out, extra, tracking_uri, progress
        self.first_number = first_number  # trials numbered from here on ran in this invocation
        self.summaries: dict[str, dict[int, dict]] = {}
        self.ran_now = 0  # runs made by this invocation (the rest were in OUT already)
        self.seconds_now: list[float] = []  # their trial seconds
        self.parent_run_id: str | None = None
        self.run_dirs: dict[str, dict[int, str]] = {}

    def __call__(self, runs: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
        todo = [(a, s) for a, s in runs if s not in self.summaries.get(a, {})]
        if todo:
            try:
                res = sweep.sweep(study_spec(self.spec, self.extra, todo), workers=self.spec.workers,
                                  storage=str(layout.journal_path(self.out)), tracking_uri=self.uri, out=str(self.out), progress=self.progress,
                                  baseline=False)  # the report of a study reads it; fixes.md does not
            except DefinitionChanged as e:  # compare-fixes has no --name: the runs of other overrides are in OUT
                raise FixesError(f"{self.out} holds runs made with other settings ({'; '.join(e.changes)}); their results and "
                                 "these would be compared as one: pass another --out (or the same overrides as before)") from None
            except StudyError as e:
                raise FixesError(str(e)) from None
            if res.interrupted:
                raise KeyboardInterrupt
            missing = [f"{a} seed {s}" for (a, s), r in zip(todo, res.planned, strict=True) if r is None]
            if missing:
                raise FixesError(f"{len(missing)} run(s) failed ({', '.join(missing[:4])}); their errors are in {self.out / 'trials.csv'}; "
                                 "run the same command again to retry them")
            self.parent_run_id = res.parent_run_id
            for (a, s), r in zip(todo, res.planned, strict=True):
                run_dir = layout.seed_dir(r["run_dir"], s)
                self.summaries.setdefault(a, {})[s] = layout.read_summary(run_dir)
                self.run_dirs.setdefault(a, {})[s] = str(run_dir)
                if r["number"] >= self.first_number:
                    self.ran_now += 1
                    self.seconds_now.append(float(r["seconds"] or 0.0))
        return {(a, s): float(self.summaries[a][s]["metrics"][DECIDE_ON]) for a, s in runs}


def confirm(runner: Runner, spec: FixesSpec, pair: tuple[str, str]) -> list[str]:
    """Run the pair, its combination and the combinations asked for, with the baseline, on the held-out seeds;
    returns the arms confirmed (the baseline aside)."""
    arms = list(dict.fromkeys([*pair, spec.combo(*pair), *spec.extras]))
    runner([(x, s) for x in [spec.baseline, *arms] for s in spec.held_out_seeds])
    return arms


class Budget:
    """Wall time left; the next block runs only if it fits beside the confirmation it may lead to."""

    def __init__(self, minutes: float, workers: int, runner: Runner, confirm_runs: int):
        self.t0, self.limit = time.perf_counter(), minutes * 60.0
        self.workers, self.runner, self.confirm_runs = workers, runner, confirm_runs
        self.refused = ""

    def per_run(self) -> float:
        """Wall seconds a run costs with the workers side by side (mean CPU-bound trial seconds / workers)."""
        s = self.runner.seconds_now
        return (sum(s) / len(s) if s else 60.0) / self.workers

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def afford(self, n_runs: int) -> bool:
        need = (n_runs + self.confirm_runs) * self.per_run()
        ok = self.elapsed() + need <= self.limit
        if not ok:
            self.refused = (f"the next {n_runs} runs and the confirmation ({self.confirm_runs} runs) need ~{need / 60:.1f} min, "
                            f"{max(0.0, self.limit - self.elapsed()) / 60:.1f} of {self.limit / 60:.0f} min are left")
        return ok


def trials_before(out_dir: Path) -> int:
    """How many trials the comparison's study in OUT already has (the runs before this invocation)."""
    journal = layout.journal_path(out_dir)
    if not journal.exists():
        return 0
    try:
        return len(optuna.load_study(study_name=STUDY_NAME, storage=open_storage(str(journal))).get_trials(deepcopy=False))
    except KeyError:
        return 0
