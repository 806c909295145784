"""A study's best-of-n baseline: `algo=bon` runs on the study's fixed config, one per seed, into OUT/baseline/seed-N/.

Best-of-n trains nothing, so it runs once per study on the world, reference, RM and held-out
evaluation its trials share; a study that searches the RM's own keys (spec.varies_rm) gives each
trial its own, in the trial's directory, run by the worker right after the trial's seeds and again
at the sweep's end for a trial whose best-of-n is missing. The report reads these runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from rlhf_sweep.config.algorithms import algo_sections
from rlhf_sweep.run import layout, tracking
from rlhf_sweep.study.spec import StudySpec, config_override, trial_spec
from rlhf_sweep.study.storage import open_storage

BASELINE_N = 256  # its history walks best-of-n' for n' = 1, 2, 4, ..., 256


def baseline_overrides(spec: StudySpec, seed: int) -> list[str]:
    """`algo=bon` on the study's fixed config: the same world, reference, RM and held-out evaluation as its
    trials (a fixed `algo` and that algorithm's own knobs are left out: best-of-n trains nothing)."""
    keep = {k: v for k, v in spec.fixed.items() if k != "algo" and k.split(".")[0] not in algo_sections()}
    return [config_override(k, v) for k, v in {**keep, "algo": "bon", "bon.n": BASELINE_N,
                                               "bon.samples_per_prompt": BASELINE_N, "seed": seed}.items()]


def run_baseline(spec: StudySpec, name: str, out_dir: Path, threads: int, client=None, exp_id: str | None = None,
                 parent: str | None = None, say: Callable[[str], None] = print) -> list[Path]:
    """The study's best-of-n baseline, one `algo=bon` run per seed into OUT/baseline/seed-N/ (skipped when its
    summary.json exists), with the trials' thread count so it reuses their cached reference and RM; each run
    is an MLflow run nested in the study's. Returns the summary paths."""
    # torch loads where a trial or baseline runs: a refused, resumed-complete or reporting sweep never pays for it
    from rlhf_sweep.run import pipeline

    paths = []
    for seed in spec.seeds:
        run_dir = layout.seed_dir(layout.baseline_dir(out_dir), seed)
        paths.append(layout.summary_path(run_dir))
        if paths[-1].is_file():
            continue
        say(f"best-of-n baseline, seed {seed}: algo=bon, n' = 1…{BASELINE_N}, {BASELINE_N} reference samples per held-out prompt")
        cfg, summary = pipeline.run_config(baseline_overrides(spec, seed), run_dir, threads=threads, progress=False, say=say)
        if client is not None and exp_id is not None:
            tracking.log_finished(client, exp_id, summary, cfg.run_dir, f"{name}-baseline-s{seed}",
                                  tags={"study": name, "seed": str(seed), "rlhf_sweep.role": "baseline"}, parent_run_id=parent)
    return paths


def run_trial_baselines(spec: StudySpec, name: str, storage: str, out_dir: Path, client=None, exp_id: str | None = None,
                        parent: str | None = None) -> None:
    """Every complete trial's own best-of-n baseline (varies_rm), where its summary.json is missing."""
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        params = {p.name: t.params[p.name] for p in spec.space if p.name in t.params}
        run_baseline(trial_spec(spec, params, t.user_attrs.get("seeds")), name, layout.trial_dir(out_dir, t.number), int(t.user_attrs.get("threads") or 1), client, exp_id,
                     parent, say=lambda msg, n=t.number: None if ": cached" in msg else print(f"trial {n}: {msg}", flush=True))
