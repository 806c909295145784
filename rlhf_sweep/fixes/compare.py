"""Which two fixes should an RLHF team make? `rlhf-sweep compare-fixes` answers within a seed budget.

This module owns the comparison, not its runs: every arm x seed run is a planned trial of one
study run by the sweep machinery (sweep.py: its storage and resume, workers, MLflow parent run
with a nested run per arm x seed). What is here:

- the arms: experiment overlays in `conf/experiment/`; `a+b` composes two (`experiment=[a,b]`);
- the racing loop that decides which runs come next (`select`): every arm on a first block of
  seeds, then more seeds only for the single fixes still in contention for the top two, until
  the two are separated from the rest (`decide`) or the budget, or the seed pool, is spent;
- the confirmation: the recommended pair, its combination `a+b` and any combinations asked
  for are scored with the baseline on held-out seeds that took no part in choosing them;
- the statistics (pure functions): paired differences against the baseline with a Student-t
  interval over seeds, the interquartile mean (scipy.stats.trim_mean) and the probability of
  improvement of those differences, two-sided paired t-tests (Student's t from scipy.special)
  with Holm's correction across arms for every "helps", "hurts" and "beats" the racing uses;
- the outputs: a terminal table, `fixes.md`, `fixes.json`, `fixes.png` and the comparison's
  metrics and files on the study's MLflow parent run.

The arms form a categorical over `experiment` whose choices are fixed when the study is made
(the baseline, the arms and every pair of single fixes): a comparison of other arms needs
another --out. A run is identified by the config its arm composes to, so an edited overlay
runs its arm again; everything else already in the output directory is reused.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.paths import config_dirs, group_options, shipped_studies_dir
from rlhf_sweep.config.schema import ConfigError
from rlhf_sweep.fixes.racing import INTERVAL, Decision, Selection, excludes_zero, iqm, paired_interval, prob_improvement, select
from rlhf_sweep.run import layout, preflight
from rlhf_sweep.study.spec import RESERVED_KEYS, Objective, Param, PlannedTrial, StudyError, StudySpec
from rlhf_sweep.utils.tables import format_table, md_table

STUDY_FILE = shipped_studies_dir() / "compare_fixes.yaml"
STUDY_NAME = "compare_fixes"

# (summary metric, label, +1 if larger is better for the team, -1 if smaller is, 0 if neither)
METRICS = (
    ("gold/policy", "gold", +1),
    ("gold/win_rate", "gold win rate", +1),
    ("len/policy", "length", -1),
    ("filler/policy", "filler", -1),
    ("kl/exact", "KL exact", -1),
    ("rm/policy", "RM score", 0),
)
DECIDE_ON = "gold/policy"  # the metric the racing and the recommendation read


class FixesError(ValueError):
    """A bad arm, seed count, budget or study file; the message is one line naming the key and the fix."""


# The t quantiles and tail areas come from scipy.special (stdtrit, stdtr): scipy.stats.ttest_1samp gives the
# same numbers (tests/test_fixes.py holds them to it) at ~1 ms a call, and the racing simulation makes
# hundreds of thousands of calls.




# ----- the comparison's settings ---------------------------------------------------------------------
@dataclass
class FixesSpec:
    """studies/compare_fixes.yaml, checked.

    arms: the baseline and the single fixes it races (overlays in conf/experiment/);
    combinations: arms that combine others (`a+b`, or an overlay such as `combined`): scored on the
        confirmation seeds beside the recommended pair, never raced or recommended;
    first_seed: the seed pool starts here: selection seeds first_seed .. first_seed+max_seeds-1, then
        confirm_seeds held-out seeds after them;
    seeds: the first block (every arm); seeds_per_round: seeds added per look to the arms in contention;
    budget_minutes: wall time for the whole comparison (the first block always runs);
    alpha: the Holm-adjusted level of every "helps", "hurts" and "beats".
    """

    arms: list[str]
    seeds: int = 6
    max_seeds: int = 15
    confirm_seeds: int = 5
    first_seed: int = 0
    seeds_per_round: int = 2
    budget_minutes: float = 40.0
    baseline: str = "baseline"
    combinations: list[str] = field(default_factory=list)
    workers: int = 2
    confidence: float = 0.95
    alpha: float = 0.05

    @property
    def singles(self) -> list[str]:
        return [a for a in self.arms if a != self.baseline and "+" not in a and a not in self.combinations]

    @property
    def extras(self) -> list[str]:
        """Combinations asked for (arms with '+' or listed under combinations): confirmed, never raced."""
        return list(dict.fromkeys([*(a for a in self.arms if a not in (self.baseline, *self.singles)), *self.combinations]))

    @property
    def selection_seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.max_seeds))

    @property
    def held_out_seeds(self) -> list[int]:
        start = self.first_seed + self.max_seeds
        return list(range(start, start + self.confirm_seeds))

    def combo(self, a: str, b: str) -> str:
        """The arm that composes two single fixes, named in the order of `arms`."""
        order = self.singles
        return "+".join(sorted((a, b), key=order.index))

    @property
    def choices(self) -> list[str]:
        """Every arm a run of this comparison can have: Optuna fixes them when the study is made."""
        pairs = [self.combo(a, b) for a, b in itertools.combinations(self.singles, 2)]
        return list(dict.fromkeys([self.baseline, *self.singles, *self.extras, *pairs]))


def experiments() -> list[str]:
    """The experiment overlays of the shipped conf/ and of the user's config directories."""
    return group_options("experiment")


def arm_parts(arm: str) -> list[str]:
    """'rm_ensemble+kl_control' -> ['rm_ensemble', 'kl_control'] (checked against conf/experiment/)."""
    parts = [p.strip() for p in arm.split("+") if p.strip()]
    known = experiments()
    for p in parts:
        if p not in known:
            raise FixesError(f"unknown arm {p!r}; arms are experiment overlays in conf/experiment/: {', '.join(known)} "
                             f"(combine two with a+b; looked in {', '.join(str(d / 'experiment') for d in config_dirs())})")
    if not parts:
        raise FixesError("an empty arm name; give --arms a,b,c with names from conf/experiment/")
    return parts


def arm_overrides(arm: str) -> list[str]:
    parts = arm_parts(arm)
    return [f"experiment={parts[0]}"] if len(parts) == 1 else [f"experiment=[{','.join(parts)}]"]


KEYS = {"description", "arms", "seeds", "max_seeds", "confirm_seeds", "first_seed", "seeds_per_round", "budget_minutes",
        "baseline", "combinations", "workers", "confidence", "alpha"}


def _int(v, key: str, low: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise FixesError(f"{key}={v!r} is invalid: {key} accepts an integer >= {low} ({what})")
    return v


def load_spec(path: str | Path = STUDY_FILE, arms: list[str] | None = None, seeds: int | None = None, max_seeds: int | None = None,
              first_seed: int | None = None, budget: float | None = None, confirm_seeds: int | None = None) -> FixesSpec:
    """The study file with the command line's values on top; every bad value is one line naming its key."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    for k in raw:
        if k not in KEYS:
            raise FixesError(f"unknown key {k!r} in {path}; keys: {', '.join(sorted(KEYS))}")
    pick = lambda flag, key, default: flag if flag is not None else raw.get(key, default)  # noqa: E731
    spec = FixesSpec(arms=list(arms or raw.get("arms", [])), baseline=raw.get("baseline", "baseline"),
                     combinations=list(raw.get("combinations", [])), workers=int(raw.get("workers", 2)),
                     confidence=float(raw.get("confidence", 0.95)), alpha=float(raw.get("alpha", 0.05)),
                     seeds_per_round=_int(raw.get("seeds_per_round", 2), "seeds_per_round", 1, "seeds added per look"))
    spec.seeds = _int(pick(seeds, "seeds", 6), "--seeds", 2, "the first block of seeds, every arm; 2 is the least that gives an interval")
    spec.max_seeds = _int(pick(max_seeds, "max_seeds", 15), "--max-seeds", 2, "selection seeds per arm at most")
    spec.first_seed = _int(pick(first_seed, "first_seed", 0), "--first-seed", 0, "where the seed pool starts")
    spec.confirm_seeds = _int(pick(confirm_seeds, "confirm_seeds", 5), "--confirm-seeds", 2, "held-out seeds for the confirmation")
    b = pick(budget, "budget_minutes", 40.0)
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
        raise FixesError(f"--budget={b!r} is invalid: --budget accepts minutes > 0 (the first block of seeds always runs)")
    spec.budget_minutes = float(b)
    if spec.max_seeds < spec.seeds:
        raise FixesError(f"--max-seeds={spec.max_seeds} is below --seeds={spec.seeds}: the first block is part of the selection "
                         "seeds; give --max-seeds >= --seeds")
    if spec.baseline not in spec.arms:
        spec.arms.insert(0, spec.baseline)
    if not 0 < spec.alpha < 1 or not 0 < spec.confidence < 1:
        raise FixesError(f"alpha={spec.alpha} / confidence={spec.confidence} in {path}: both accept a number in (0, 1)")
    if len(spec.singles) < 2:
        raise FixesError(f"--arms needs at least two single fixes besides {spec.baseline} to choose a pair from, got {spec.singles}")
    for arm in spec.choices:
        try:
            compose([*arm_overrides(arm), "seed=0"])  # unknown arms and bad overlays fail here, in one line
        except ConfigError as e:
            raise FixesError(f"arm {arm}: {e}") from None
    return spec


def study_spec(spec: FixesSpec, extra: tuple[str, ...], planned: list[tuple[str, int]]) -> StudySpec:
    """The planned study that runs `planned` (arm, seed) pairs; `extra` overrides go to every run."""
    fixed = {}
    for o in extra:
        key, sep, value = o.partition("=")
        if not sep or key.startswith(("+", "~")):
            raise FixesError(f"override {o!r}: give key=value (e.g. ppo.iterations=50)")
        if key == "progress":  # the sweep's runs never draw bars of their own
            continue
        if key in RESERVED_KEYS or key == "experiment":
            raise FixesError(f"override {o!r}: {key} is set by compare-fixes per run (arms: --arms; seeds: --first-seed/--seeds; "
                             "threads: --workers)")
        fixed[key] = yaml.safe_load(value) if value else ""
    return StudySpec(name=STUDY_NAME, path=str(STUDY_FILE), description="compare-fixes: arm x seed runs, raced",
                     objectives=[Objective(DECIDE_ON, "maximize")], space=[Param("experiment", "categorical", choices=spec.choices)],
                     fixed=fixed, seeds=[spec.first_seed], n_trials=max(1, len(planned)), sampler="random",
                     trials=[PlannedTrial({"experiment": a}, [s], name=f"{a} seed {s}") for a, s in planned])


# ----- running: planned trials through the sweep ------------------------------------------------------
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
        from rlhf_sweep.study import sweep

        todo = [(a, s) for a, s in runs if s not in self.summaries.get(a, {})]
        if todo:
            try:
                res = sweep.sweep(study_spec(self.spec, self.extra, todo), workers=self.spec.workers,
                                  storage=str(layout.journal_path(self.out)), tracking_uri=self.uri, out=str(self.out), progress=self.progress,
                                  baseline=False)  # the report of a study reads it; fixes.md does not
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


# ----- comparison ------------------------------------------------------------------------------------
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


# ----- outputs -------------------------------------------------------------------------------------
def ci_text(d: dict, digits: int = 3) -> str:
    if not (math.isfinite(d["lo"]) and math.isfinite(d["hi"])):
        return f"{d['mean']:+.{digits}f} [n/a]"
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def _status(result: dict, arm: str) -> str:
    r = result["racing"]
    if arm in result["recommended"]:
        return "recommended"
    if arm in r["out"]:
        return "out: " + r["out"][arm]
    if arm in r["sure"]:
        return "in the top two"
    return "in contention"


def gold_table(spec: FixesSpec, result: dict, arms_key: str = "arms") -> tuple[list[str], list[list[str]]]:
    src = result[arms_key] if arms_key == "arms" else result["confirmation"]["arms"]
    headers = ["arm", "seeds", "d gold mean [interval]", "IQM d", "P(> base)"]
    if arms_key == "arms":
        headers += ["p Holm", "racing"]
    rows = []
    for arm, row in src.items():
        if arm == spec.baseline:
            rows.append([f"{arm} (mean gold)", str(len(row["seeds"])), f"{row['mean'][DECIDE_ON]:.3f}", "", ""]
                        + (["", ""] if arms_key == "arms" else []))
            continue
        d = row["diff"][DECIDE_ON]
        r = [arm, str(d["n"]), ci_text(d), f"{d['iqm']:+.3f}", f"{d['p_improve']:.2f}"]
        if arms_key == "arms":
            r += [f"{result['racing']['p_holm_vs_baseline'][arm]:.2g}", _status(result, arm)]
        rows.append(r)
    return headers, rows


def diff_table(spec: FixesSpec, src: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", *(f"d {label}" for _k, label, _s in METRICS[1:])]
    rows = []
    for arm, row in src.items():
        if arm == spec.baseline:
            rows.append([f"{arm} (mean)", *(f"{row['mean'][k]:.3f}" for k, _l, _s in METRICS[1:])])
        else:
            rows.append([arm, *(ci_text(row["diff"][k]) for k, _l, _s in METRICS[1:])])
    return headers, rows


def cost_table(spec: FixesSpec, src: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "side", "d RM acc labels", "d RM acc gold", "proxy given up", "extra CPU s/run"]
    rows = []
    for arm, row in src.items():
        if arm == spec.baseline:
            continue
        side = ("RM" if row["rm_side"] else "PPO") + (f", {row['ensemble_size']} RMs" if row["ensemble_size"] > 1 else "")
        d = row["diff"]
        rows.append([arm, side, ci_text(d["rm/acc_labels"]), ci_text(d["rm/acc_gold"]),
                     f"{-d['rm/policy']['mean']:+.3f}", f"{row['extra_seconds_per_run']:+.1f}"])
    return headers, rows


def runs_line(result: dict) -> str:
    r = result["racing"]
    line = (f"runs: {r['runs']} to select ({r['looks']} looks, up to {r['n_seeds']} seeds; every arm on every one of those seeds "
            f"would be {r['runs_every_arm_every_seed']})")
    if result["confirmation"]:
        line += f" + {result['confirmation']['runs']} to confirm"
    return line


def interval_words(spec: FixesSpec) -> str:
    return (f"mean [{spec.confidence:.0%} Student-t interval over seeds, per arm]; IQM d: interquartile mean of the per-seed differences; P(> base): share of seeds where the arm beats the baseline; "
            f"p Holm: paired t-test against the baseline, Holm-adjusted across the {len(spec.singles)} single fixes")


def terminal_table(spec: FixesSpec, result: dict) -> str:
    seeds = result["arms"][spec.baseline]["seeds"]
    h, r = gold_table(spec, result)
    lines = [format_table(h, r, title=f"selection: each fix minus {spec.baseline} in gold, paired by seed (seeds {_span(seeds)}); "
                                       + interval_words(spec))]
    h, r = diff_table(spec, result["arms"])
    lines += ["", format_table(h, r, title=f"selection: other metrics, mean [{spec.confidence:.0%} t interval]")]
    h, r = cost_table(spec, result["arms"])
    lines += ["", format_table(h, r, title="costs")]
    if result["confirmation"]:
        h, r = gold_table(spec, result, "confirmation")
        lines += ["", format_table(h, r, title=f"confirmation on held-out seeds {_span(result['confirmation']['seeds'])} "
                                                "(not used to choose): each arm minus the baseline in gold")]
        h, r = diff_table(spec, result["confirmation"]["arms"])
        lines += ["", format_table(h, r, title="confirmation: other metrics")]
    lines += ["", runs_line(result), result["verdict"]]
    if result["confirmation"]:
        lines.append(confirmation_line(spec, result))
    return "\n".join(lines)


def _span(seeds: list[int]) -> str:
    if not seeds:
        return "none"
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return ",".join(map(str, seeds))


def confirmation_line(spec: FixesSpec, result: dict) -> str:
    c = result["confirmation"]
    parts = []
    for arm, row in c["arms"].items():
        if arm == spec.baseline:
            continue
        d = row["diff"][DECIDE_ON]
        holds = "holds" if d["lo"] > 0 else "not confirmed" if d["mean"] <= 0 else "positive, interval spans 0"
        parts.append(f"{arm} {ci_text(d)} ({holds})")
    return f"held out ({len(c['seeds'])} seeds): " + "; ".join(parts)


def trade_off(spec: FixesSpec, src: dict, arm: str) -> str:
    r, b = src[arm], src[spec.baseline]
    d = r["diff"]
    parts = [
        f"gold {b['mean']['gold/policy']:.3f} -> {r['mean']['gold/policy']:.3f} ({ci_text(d['gold/policy'])}), "
        f"gold win rate vs reference {b['mean']['gold/win_rate']:.3f} -> {r['mean']['gold/win_rate']:.3f}",
        f"length {b['mean']['len/policy']:.2f} -> {r['mean']['len/policy']:.2f} tokens, "
        f"filler {b['mean']['filler/policy']:.2f} -> {r['mean']['filler/policy']:.2f}",
        f"KL {b['mean']['kl/exact']:.1f} -> {r['mean']['kl/exact']:.1f} nats/seq",
    ]
    if r["rm_side"]:
        parts.append(f"RM accuracy on labeler labels {b['mean']['rm/acc_labels']:.3f} -> {r['mean']['rm/acc_labels']:.3f} "
                     f"and on gold order {b['mean']['rm/acc_gold']:.3f} -> {r['mean']['rm/acc_gold']:.3f}")
    else:
        parts.append(f"the proxy (RM) score it gives up: {-d['rm/policy']['mean']:.3f} std units "
                     f"({b['mean']['rm/policy']:.3f} -> {r['mean']['rm/policy']:.3f})")
    extra = f"extra compute {r['extra_seconds_per_run']:+.1f} CPU s per run"
    if r["rm_side"] and math.isfinite(r["extra_rm_seconds"]):
        extra += f" (of which RM training {r['extra_rm_seconds']:+.1f} CPU s, paid once per RM and cached)"
    parts.append(extra)
    return "; ".join(parts) + "."


def write_markdown(path: Path, spec: FixesSpec, result: dict, wall_s: float, figure: str | None) -> None:
    r = result["racing"]
    lines = [
        "# Which fixes? A raced comparison against the baseline, confirmed on held-out seeds",
        "",
        f"**{result['verdict']}**",
        "",
        *( [f"**{confirmation_line(spec, result)}**", ""] if result["confirmation"] else []),
        f"Seed pool from {spec.first_seed}: selection seeds {_span(spec.selection_seeds)} (every arm on the first {spec.seeds}, then "
        f"{spec.seeds_per_round} more per look for the fixes still in contention), held-out confirmation seeds {_span(spec.held_out_seeds)}. "
        f"Budget {spec.budget_minutes:g} min; stopped: {r['stopped']}{(' (' + result['budget_refused'] + ')') if result.get('budget_refused') else ''}. "
        f"{runs_line(result)}. Wall time of this invocation: {wall_s / 60:.1f} min, {result['runs_this_invocation']} runs made now "
        f"({spec.workers} workers; runs already in the output directory are reused).",
        "",
        "How to read it: differences are arm minus baseline on the same seed. Intervals: "
        f"{spec.confidence:.0%} {INTERVAL}, one per arm and metric. IQM d: interquartile mean of the per-seed differences "
        "(scipy.stats.trim_mean, 25% cut each side). P(> base): the share of seeds on which the arm's gold beats the "
        "baseline's (ties half). p Holm: two-sided paired t-test against the baseline, Holm-adjusted across the single "
        f"fixes (statsmodels). Racing: an arm is out once two others beat it (paired t-tests, Holm across all pairs of single "
        f"fixes, alpha {spec.alpha}) or once it is worse than the baseline; the pair is recommended when exactly two are left "
        "and both beat the baseline. The confirmation scores the pair, its combination and any combinations asked for on seeds "
        "that took no part in choosing them.",
        "",
        "## Arms",
        "",
        *(f"- `{a}`: `{' '.join(arm_overrides(a))}`" for a in [*result["arms"], *result.get("confirmation", {}).get("arms", {})] if a),
        "",
        "## Selection: gold",
        "",
        md_table(*gold_table(spec, result)),
        "",
        "## Selection: other metrics",
        "",
        md_table(*diff_table(spec, result["arms"])),
        "",
        "## Costs",
        "",
        "RM accuracy is on held-out labeled pairs; 'proxy given up' is the drop in the arm's own RM score "
        "(for RM-side arms that is another RM's scale); extra CPU seconds per run are PPO + evaluation against the "
        "baseline, plus RM training for RM-side arms (CPU time, so other processes sharing the cores do not inflate it).",
        "",
        md_table(*cost_table(spec, result["arms"])),
        "",
    ]
    if result["confirmation"]:
        c = result["confirmation"]
        lines += ["## Confirmation on held-out seeds", "", f"Seeds {_span(c['seeds'])}, not used to choose.", "",
                  md_table(*gold_table(spec, result, "confirmation")), "", md_table(*diff_table(spec, c["arms"])), ""]
        for arm in c["arms"]:
            if arm != spec.baseline:
                lines.append(f"- **{arm}** (held out): {trade_off(spec, c['arms'], arm)}")
        lines.append("")
    lines += ["## Per seed", ""]
    rows = []
    for src, tag in ((result["arms"], ""), (result.get("confirmation", {}).get("arms", {}), " (held out)")):
        for a, row in src.items():
            for k in ("gold/policy", "kl/exact", "len/policy"):
                rows.append([a + tag, k, " ".join(f"{s}:{v:.3f}" for s, v in zip(row["seeds"], row["per_seed"][k], strict=True))])
    lines.append(md_table(["arm", "metric", "seed:value"], rows))
    if figure:
        lines += ["", f"![arms x metrics]({figure})"]
    path.write_text("\n".join(lines) + "\n")


def draw_figure(spec: FixesSpec, result: dict, summaries: dict, path: Path) -> str:
    from rlhf_sweep.reporting import plots

    diffs = {a: r["diff"] for a, r in result["arms"].items() if a != spec.baseline}
    points = {a: [(summaries[a][s]["metrics"]["kl/exact"], summaries[a][s]["metrics"]["gold/policy"]) for s in r["seeds"]]
              for a, r in result["arms"].items()}
    for a, r in (result.get("confirmation") or {}).get("arms", {}).items():
        if a != spec.baseline:
            diffs[f"{a} (held out)"] = r["diff"]
            points[f"{a} (held out)"] = [(summaries[a][s]["metrics"]["kl/exact"], summaries[a][s]["metrics"]["gold/policy"]) for s in r["seeds"]]
    base_seeds = result["arms"][spec.baseline]["seeds"]
    ref_gold = float(np.mean([summaries[spec.baseline][s]["metrics"]["gold/ref"] for s in base_seeds]))
    title = f"Each fix minus the baseline, paired by seed: mean and {spec.confidence:.0%} t interval (filled: excludes 0)"
    return plots.fixes_figure(diffs, [(k, label) for k, label, _s in METRICS], points, path, ref_gold, title=title)


def log_mlflow(uri: str, parent: str, spec: FixesSpec, result: dict, files: list[Path]) -> None:
    """The comparison on the study's parent run (its nested runs are the arm x seed trials)."""
    from mlflow.entities import Metric

    from rlhf_sweep.run import tracking

    client = tracking.client_for(uri)
    now = int(time.time() * 1000)
    # tags, not params: the parent run outlives one invocation, and MLflow refuses a param whose value changes
    tags = {"rlhf_sweep.kind": "compare-fixes", "arms": ",".join(spec.arms), "first_seed": str(spec.first_seed),
            "budget_minutes": f"{spec.budget_minutes:g}", "baseline": spec.baseline,
            "recommended": ",".join(result["recommended"]) or "none", "verdict": result["verdict"][:5000]}
    metrics = []
    for tag, src in (("", result["arms"]), ("heldout/", (result["confirmation"] or {}).get("arms", {}))):
        for arm, row in src.items():
            name = tag + arm.replace("+", "-plus-")  # MLflow metric names may not contain '+'
            for key, d in row["diff"].items():
                metrics += [Metric(f"{name}/d_{key}", d["mean"], now, 0), Metric(f"{name}/d_{key}_lo", d["lo"], now, 0),
                            Metric(f"{name}/d_{key}_hi", d["hi"], now, 0)]
            metrics.append(Metric(f"{name}/extra_seconds_per_run", row["extra_seconds_per_run"], now, 0))
    metrics = [m for m in metrics if math.isfinite(m.value)]
    for k, v in tags.items():
        client.set_tag(parent, k, v)
    for chunk in tracking.chunks(metrics, tracking.MAX_METRICS_PER_CALL):
        client.log_batch(parent, metrics=chunk)
    for f in files:
        if f.exists():
            client.log_artifact(parent, str(f))


@dataclass
class FixesResult:
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
    runner = Runner(spec, out_dir, tuple(extra), uri, progress, _n_trials(out_dir))
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


def _n_trials(out_dir: Path) -> int:
    """How many trials the comparison's study in OUT already has (the runs before this invocation)."""
    journal = layout.journal_path(out_dir)
    if not journal.exists():
        return 0
    import optuna

    from rlhf_sweep.study.storage import open_storage

    try:
        return len(optuna.load_study(study_name=STUDY_NAME, storage=open_storage(str(journal))).get_trials(deepcopy=False))
    except KeyError:
        return 0
