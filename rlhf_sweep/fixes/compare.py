"""Which two fixes should an RLHF team make? `rlhf-sweep compare-fixes` answers within a seed budget.

This module owns the comparison, not its runs (fixes.runner: every arm x seed run is a planned trial
of one study run by study.sweep) nor its settings (fixes.spec) or outputs (fixes.output):

- `compare_fixes`: load the settings, race the single fixes (fixes.racing.select: every arm on a
  first block of seeds, then more seeds only for the fixes still in contention for the top two, until
  the two are separated from the rest or the budget, or the seed pool, is spent), confirm the
  recommended pair, its combination `a+b` and any combinations asked for with the baseline on
  held-out seeds that took no part in choosing them, then write the outputs and log them;
- `arm_stats` and `compare`: the result, per arm, from the runs' summaries: paired differences
  against the baseline with a Student-t interval over seeds, the interquartile mean and the
  probability of improvement of those differences (fixes.racing), the racing's decision, and the
  extra CPU seconds an arm costs.

The arms form a categorical over `experiment` whose choices are fixed when the study is made
(the baseline, the arms and every pair of single fixes): a comparison of other arms needs
another --out. A run is identified by the config its arm composes to, so an edited overlay
runs its arm again; everything else already in the output directory is reused.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import ConfigError
from rlhf_sweep.fixes.output import draw_figure, log_mlflow, terminal_table, write_markdown
from rlhf_sweep.fixes.racing import INTERVAL, Decision, Selection, excludes_zero, iqm, paired_interval, prob_improvement, select
from rlhf_sweep.fixes.runner import Budget, Runner, confirm, trials_before
from rlhf_sweep.fixes.spec import METRICS, STUDY_FILE, FixesError, FixesSpec, arm_overrides, load_spec, study_spec
from rlhf_sweep.run import preflight


def _metric(summary: dict, key: str) -> float:
    return float(summary["metrics"][key])


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")


def arm_stats(spec: FixesSpec, summaries: dict[str, dict[int, dict]], arms: list[str], seeds: list[int] | None = None) -> dict:
    """Per arm: mean of each metric, and against the baseline (on the seeds both ran, or on `seeds`) the
    mean paired difference with its interval, its IQM and the probability of improvement; costs."""
    base = summaries[spec.baseline]
    keys = [k for k, _l, _s in METRICS] + ["rm/acc_labels", "rm/acc_gold"]
    out = {}
    for arm in [spec.baseline, *arms]:
        runs = summaries[arm]
        use = sorted(set(runs) & set(base) & set(seeds if seeds is not None else runs))
        row: dict = {"overrides": arm_overrides(arm), "seeds": use, "mean": {}, "diff": {}, "per_seed": {}}
        for key in keys:
            a = np.array([_metric(runs[s], key) for s in use])
            b = np.array([_metric(base[s], key) for s in use])
            row["mean"][key] = float(a.mean()) if len(a) else float("nan")
            row["per_seed"][key] = a.tolist()
            if arm != spec.baseline:
                m, lo, hi = paired_interval(a, b, spec.confidence)
                row["diff"][key] = {"mean": m, "lo": lo, "hi": hi, "excludes_zero": excludes_zero(lo, hi),
                                    "iqm": iqm(a - b), "p_improve": prob_improvement(a, b), "n": len(use)}
        # CPU seconds (one-thread workers, so other processes on the cores do not inflate them)
        row["ppo_eval_seconds"] = _nanmean([runs[s]["cost"]["ppo_eval_cpu_seconds"] for s in use])
        row["rm_train_seconds"] = _nanmean([runs[s]["cost"].get("rm_train_cpu_seconds", float("nan")) for s in use])
        first = runs[use[0]] if use else next(iter(runs.values()))
        row["rm_side"] = first["config"]["rm"] != next(iter(base.values()))["config"]["rm"]
        row["ensemble_size"] = first["config"]["rm"]["ensemble_size"]
        out[arm] = row
    b = out[spec.baseline]
    for row in out.values():
        extra_rm = row["rm_train_seconds"] - b["rm_train_seconds"] if row["rm_side"] else 0.0
        row["extra_seconds_per_run"] = row["ppo_eval_seconds"] - b["ppo_eval_seconds"] + (extra_rm if math.isfinite(extra_rm) else 0.0)
        row["extra_rm_seconds"] = extra_rm
    return out


def compare(spec: FixesSpec, summaries: dict[str, dict[int, dict]], sel: Selection, confirm_arms: list[str]) -> dict:
    """The comparison's result (fixes.json): the selection's arm statistics, the racing's decision and verdict, and
    the confirmation's arm statistics on the held-out seeds."""
    d = sel.decision
    result: dict = {
        "baseline": spec.baseline, "confidence": spec.confidence, "alpha": spec.alpha, "interval": INTERVAL,
        "seeds": sorted(set(summaries[spec.baseline]) & set(spec.selection_seeds)),
        "selection_seeds": spec.selection_seeds, "held_out_seeds": spec.held_out_seeds,
        "arms": arm_stats(spec, summaries, spec.singles, spec.selection_seeds),
        "racing": {"ranking": d.ranking, "alive": d.alive, "sure": d.sure, "out": d.out, "beaten_by": d.beaten_by,
                   "helps": d.helps, "hurts": d.hurts, "p_holm_vs_baseline": d.p_base, "looks": sel.looks, "stopped": sel.stopped,
                   "runs": sel.runs, "n_seeds": d.n_seeds,
                   # every arm of the race on every selection seed the contenders reached: what a fixed design spends
                   "runs_every_arm_every_seed": (1 + len(spec.singles)) * d.n_seeds},
        "verdict": d.verdict,
        "recommended": list(d.pair) if d.pair else [],
        "confirmation": {},
    }
    if confirm_arms:
        result["confirmation"] = {"seeds": spec.held_out_seeds, "runs": (1 + len(confirm_arms)) * len(spec.held_out_seeds),
                                  "arms": arm_stats(spec, summaries, confirm_arms, spec.held_out_seeds)}
    return result


@dataclass
class FixesResult:
    """What compare_fixes returns: the result (as in fixes.json), the terminal table, where the outputs are."""

    result: dict
    table: str
    out_dir: str
    wall_s: float
    parent_run_id: str | None


def compare_fixes(arms: list[str] | None = None, seeds: int | None = None, tracking_uri: str | None = None,
                  out: str | None = None, study: str | Path = STUDY_FILE, extra: tuple[str, ...] = (),
                  workers: int | None = None, progress: bool = True, budget: float | None = None, max_seeds: int | None = None,
                  first_seed: int | None = None, confirm_seeds: int | None = None) -> FixesResult:
    """Race the fixes within the budget, confirm the pair on held-out seeds, write the outputs, log to MLflow."""
    t0 = time.perf_counter()
    spec = load_spec(study, arms, seeds, max_seeds, first_seed, budget, confirm_seeds)
    if workers is not None:
        if workers < 1:
            raise FixesError(f"--workers={workers} is invalid: --workers accepts an integer >= 1")
        spec.workers = workers
    try:
        compose(list(extra))  # a bad extra override fails before any run
    except ConfigError as e:
        raise FixesError(str(e)) from None
    study_spec(spec, tuple(extra), [])  # and one that compare-fixes sets itself
    out_dir = Path(out or "outputs/fixes")
    base_cfg = compose(list(extra))
    uri = tracking_uri or (base_cfg.mlflow.tracking_uri if base_cfg.mlflow.enabled else None)
    try:
        preflight.check(uri, "--tracking-uri" if tracking_uri else "mlflow.tracking_uri", {"--out": out_dir, "cache_dir": base_cfg.cache_dir})
    except preflight.PreflightError as e:
        raise FixesError(str(e)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(spec, out_dir, tuple(extra), uri, progress, trials_before(out_dir))
    confirm_runs = (1 + 3 + len(spec.extras)) * spec.confirm_seeds  # the baseline, the pair, its combination, those asked for
    budget_ = Budget(spec.budget_minutes, spec.workers, runner, confirm_runs)

    def look(i: int, runs: int, d: Decision) -> None:
        if progress:
            out = "; ".join(f"{a} out ({why})" for a, why in d.out.items())
            print(f"look {i}: {runs} runs, {d.n_seeds} seeds; in contention: {', '.join(d.alive)}" + (f"; {out}" if out else ""), flush=True)

    sel = select(runner, spec.baseline, spec.singles, spec.selection_seeds, spec.seeds, spec.seeds_per_round, spec.alpha,
                 budget_.afford, look)
    confirm_arms = confirm(runner, spec, sel.decision.pair) if sel.decision.pair else []
    summaries = runner.summaries
    result = compare(spec, summaries, sel, confirm_arms)
    result["budget_minutes"] = spec.budget_minutes
    result["budget_refused"] = budget_.refused if sel.stopped == "budget" else ""
    figure = draw_figure(spec, result, summaries, out_dir / "fixes.png")
    wall = time.perf_counter() - t0
    result["wall_seconds"] = wall
    result["runs_this_invocation"] = runner.ran_now
    result["run_dirs"] = runner.run_dirs
    (out_dir / "fixes.json").write_text(json.dumps(result, indent=2, default=float))
    write_markdown(out_dir / "fixes.md", spec, result, wall, Path(figure).name if figure else None)
    table = terminal_table(spec, result)
    parent = runner.parent_run_id
    if uri and parent:
        log_mlflow(uri, parent, spec, result, [out_dir / "fixes.md", out_dir / "fixes.json"] + ([Path(figure)] if figure else []))
    return FixesResult(result, table, str(out_dir), wall, parent)
