"""The racing design of compare-fixes, on numbers alone: paired intervals and t-tests against the baseline,
Holm's correction, IQM and probability of improvement (Agarwal et al. 2021), the per-look decision, which
runs to make next, and the whole race on synthetic arms (`SyntheticArms`, `simulate`) for its benches and tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rlhf_sweep.maths.stats import mean_interval

# ----- statistics: pure functions ------------------------------------------------------------------
INTERVAL = "Student-t interval of the mean paired difference over seeds"


Outcome = Callable[[list[tuple[str, int]]], dict[tuple[str, int], float]]


def paired_interval(arm, base, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of the paired differences arm - base (paired by seed) and its Student-t interval.

    Chosen over scipy's BCa and percentile bootstraps: with 10 seeds and bimodal outcomes (some
    seeds only pad, others exploit the RM) the bootstraps are too narrow and the t interval holds its
    coverage (tests/test_fixes.py measures it; bench/fixes_racing.py prints all three). One seed: no
    interval (nan bounds); a constant difference: a zero-width one.
    """
    d = np.asarray(arm, dtype=float) - np.asarray(base, dtype=float)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_interval needs two equal-length, non-empty 1-D arrays")
    return mean_interval(d, confidence, "t")


def paired_p(d) -> float:
    """Two-sided p-value of a paired t-test that the mean difference is 0 (1 with < 2 seeds).

    The tail area comes from scipy.special.stdtr: scipy.stats.ttest_1samp gives the same numbers
    (tests/test_fixes.py holds them to it) far more slowly, and the racing simulation makes hundreds
    of thousands of calls."""
    from scipy.special import stdtr

    d = np.asarray(d, dtype=float)
    if len(d) < 2:
        return 1.0
    if np.ptp(d) == 0:
        return 1.0 if d[0] == 0 else 0.0
    t = float(d.mean()) / (float(d.std(ddof=1)) / math.sqrt(len(d)))
    return float(2 * stdtr(len(d) - 1, -abs(t)))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest times (m - i), kept
    non-decreasing, at most 1. (statsmodels' multipletests gives the same numbers, as a test checks, but
    runs gc.collect() on every call, which is slow in a process holding torch.)"""
    p = np.asarray(pvalues, dtype=float)
    if not len(p):
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(len(p), 0, -1)))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out.tolist()


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle half (scipy.stats.trim_mean, 25% cut each side)."""
    from scipy.stats import trim_mean

    x = np.asarray(x, dtype=float)
    return float(trim_mean(x, 0.25)) if len(x) else float("nan")


def prob_improvement(arm, base) -> float:
    """P(arm > base) on the same seed: the share of seeds where the arm is ahead, ties counted half."""
    a, b = np.asarray(arm, dtype=float), np.asarray(base, dtype=float)
    return float(np.mean((a > b) + 0.5 * (a == b))) if len(a) else float("nan")


def excludes_zero(lo: float, hi: float) -> bool:
    return lo > 0 or hi < 0


# ----- the racing decision: pure -------------------------------------------------------------------
@dataclass
class Decision:
    """What the data say after one look. `gold[arm][seed]` holds what has run so far."""

    ranking: list[str]  # single fixes by mean difference to the baseline, best first
    mean_diff: dict[str, float]
    helps: dict[str, bool]  # better than the baseline (Holm across the single fixes)
    hurts: dict[str, bool]
    p_base: dict[str, float]  # Holm-adjusted p against the baseline
    beaten_by: dict[str, list[str]]  # arms confidently better than it (Holm across all pairs of single fixes)
    out: dict[str, str]  # arm -> why it cannot be among the top two
    alive: list[str]  # in contention, by mean difference
    sure: list[str]  # alive and certainly among the top two
    pair: tuple[str, str] | None
    n_seeds: int  # seeds of the arms in contention
    verdict: str


def _common(x: dict[int, float], y: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    seeds = sorted(set(x) & set(y))
    return np.array([x[s] for s in seeds], dtype=float), np.array([y[s] for s in seeds], dtype=float)


def _names(xs: list[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def decide(gold: dict[str, dict[int, float]], baseline: str, singles: list[str], alpha: float = 0.05) -> Decision:
    """Which single fixes can still be among the two best, and whether the two are known.

    An arm is out once two others beat it or once it hurts; the pair is known when exactly two
    arms are left and both help. Every "beats", "helps" and "hurts" is a two-sided paired t-test
    on the seeds both arms ran, Holm-adjusted at `alpha` within its family (pairs of single fixes;
    single fixes against the baseline).
    """
    base = gold[baseline]
    mean_diff, raw_base = {}, []
    for a in singles:
        x, b = _common(gold[a], base)
        mean_diff[a] = float((x - b).mean()) if len(x) else float("nan")
        raw_base.append(paired_p(x - b))
    p_base = dict(zip(singles, holm(raw_base), strict=True))
    helps = {a: p_base[a] < alpha and mean_diff[a] > 0 for a in singles}
    hurts = {a: p_base[a] < alpha and mean_diff[a] < 0 for a in singles}
    pairs = list(itertools.combinations(singles, 2))
    diffs = {}
    for i, j in pairs:
        x, y = _common(gold[i], gold[j])
        diffs[(i, j)] = float((x - y).mean()) if len(x) else 0.0
    p_pairs = dict(zip(pairs, holm([paired_p(np.subtract(*_common(gold[i], gold[j]))) for i, j in pairs]), strict=True))
    beaten_by: dict[str, list[str]] = {a: [] for a in singles}
    for (i, j), p in p_pairs.items():
        if p < alpha and diffs[(i, j)] != 0:
            winner, loser = (i, j) if diffs[(i, j)] > 0 else (j, i)
            beaten_by[loser].append(winner)
    out = {}
    for a in singles:
        if len(beaten_by[a]) >= 2:
            out[a] = "beaten by " + _names(beaten_by[a])
        elif hurts[a]:
            out[a] = f"worse than {baseline}"
    ranking = sorted(singles, key=lambda a: -mean_diff[a] if math.isfinite(mean_diff[a]) else math.inf)
    alive = [a for a in ranking if a not in out]
    below = {a: sum(a in beaten_by[b] for b in singles) for a in singles}
    # certainly among the top two: every other single fix but at most one is confidently below it
    sure = [a for a in alive if below[a] >= len(singles) - 2]
    n_seeds = max((len(gold[a]) for a in alive), default=0)
    pair = (alive[0], alive[1]) if len(alive) == 2 and all(helps[a] for a in alive) else None
    if pair:
        verdict = f"recommended: {pair[0]} and {pair[1]} (separated from the other fixes and better than {baseline} after {n_seeds} seeds)"
    elif len(alive) == 2:
        weak = [a for a in alive if not helps[a]]
        verdict = (f"no stable pair: {_names(alive)} lead, but {weak[0]} is not confidently better than {baseline} after {n_seeds} seeds"
                   if len(weak) == 1 else
                   f"no stable pair: neither {weak[0]} nor {weak[1]} is confidently better than {baseline} after {n_seeds} seeds")
    elif len(alive) < 2:
        verdict = (f"no stable pair: only {alive[0]} can still be among the best after {n_seeds} seeds" if alive else
                   f"no stable pair: no fix is better than {baseline} after {n_seeds} seeds")
    else:
        tied = [a for a in alive if a not in sure]
        lead = f"{_names(sure)} {'is' if len(sure) == 1 else 'are'} in the top two, but " if sure else ""
        verdict = f"no stable pair: {lead}{_names(tied)} are within noise after {n_seeds} seeds"
    return Decision(ranking=ranking, mean_diff=mean_diff, helps=helps, hurts=hurts, p_base=p_base, beaten_by=beaten_by,
                    out=out, alive=alive, sure=sure, pair=pair, n_seeds=n_seeds, verdict=verdict)


@dataclass
class Selection:
    """How the racing ended: the last decision, every value seen, runs spent and why it stopped."""

    decision: Decision
    gold: dict[str, dict[int, float]]
    runs: int
    looks: int
    stopped: str  # separated | seeds | budget | fewer than two left


def next_runs(decision: Decision, gold: dict[str, dict[int, float]], baseline: str, seeds: list[int], step: int) -> list[tuple[str, int]]:
    """The next block of `step` selection seeds for the arms in contention and the baseline (arm-major,
    so parallel workers start on different seeds and build their SFT reference and RM side by side)."""
    n = max(len(gold[a]) for a in decision.alive)
    block = seeds[n:n + step]
    return [(a, s) for a in [baseline, *decision.alive] for s in block if s not in gold[a]]


def select(outcome: Outcome, baseline: str, singles: list[str], seeds: list[int], first: int, step: int,
           alpha: float = 0.05, afford: Callable[[int], bool] = lambda n: True,
           on_look: Callable[[int, int, Decision], None] | None = None) -> Selection:
    """Race the single fixes on the selection seeds: `first` seeds for every arm, then `step` more at a
    time for the arms still in contention, until a pair is known, the seeds run out or `afford(n_runs)`
    says the next block does not fit. `outcome(runs)` runs them and returns gold per (arm, seed);
    `on_look(look, runs so far, decision)` hears each look."""
    gold: dict[str, dict[int, float]] = {a: {} for a in [baseline, *singles]}
    runs = [(a, s) for a in [baseline, *singles] for s in seeds[:first]]
    for (a, s), v in outcome(runs).items():
        gold[a][s] = v
    n_runs, looks = len(runs), 1
    while True:
        d = decide(gold, baseline, singles, alpha)
        if on_look is not None:
            on_look(looks, n_runs, d)
        if d.pair:
            return Selection(d, gold, n_runs, looks, "separated")
        if len(d.alive) < 2:
            return Selection(d, gold, n_runs, looks, "fewer than two left")
        runs = next_runs(d, gold, baseline, seeds, step)
        if not runs:
            return Selection(d, gold, n_runs, looks, "seeds")
        if not afford(len(runs)):
            return Selection(d, gold, n_runs, looks, "budget")
        for (a, s), v in outcome(runs).items():
            gold[a][s] = v
        n_runs += len(runs)
        looks += 1


# ----- the procedure on simulated arms (its operating characteristics) --------------------------------
@dataclass
class SyntheticArms:
    """Arms with known true effects, shaped like the default world's per-seed outcomes (bimodal).

    Each run either exploits the RM (probability `exploit[arm]`; gold around `low`) or only pads
    (gold around `high`), plus per-run noise `noise` and a per-seed effect shared by every arm on that
    seed (`seed_sd`: the seed's SFT reference and RM). A fix works by lowering the exploit rate, so
    arm a's true effect against the baseline is (exploit[base] - exploit[a]) * (high - low).
    """

    exploit: dict[str, float]
    high: float
    low: float
    noise: float
    seed_sd: float

    def effect(self, arm: str, baseline: str) -> float:
        return (self.exploit[baseline] - self.exploit[arm]) * (self.high - self.low)

    def outcome(self, rng: np.random.Generator) -> Outcome:
        """A fresh world: each (arm, seed) drawn once, when first asked for, and the same thereafter."""
        seed_effect: dict[int, float] = {}
        drawn: dict[tuple[str, int], float] = {}

        def run(runs: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
            for a, s in runs:
                if (a, s) not in drawn:
                    if s not in seed_effect:
                        seed_effect[s] = self.seed_sd * rng.standard_normal()
                    mode = self.low if rng.random() < self.exploit[a] else self.high
                    drawn[(a, s)] = seed_effect[s] + mode + self.noise * rng.standard_normal()
            return {k: drawn[k] for k in runs}

        return run


def simulate(arms: SyntheticArms, baseline: str, singles: list[str], n_seeds: int, first: int, step: int, alpha: float,
             budget_runs: int, confirm_runs: int, n_sim: int, seed: int = 0) -> dict:
    """Run the racing `n_sim` times on fresh synthetic worlds within `budget_runs` runs (the confirmation's
    `confirm_runs` held back, as the real budget does). Returns how often it named each pair (or none), its
    runs, and for the same worlds the runs a fixed design (every arm on every seed, the same looks) needed to
    separate a pair."""
    rng = np.random.default_rng(seed)
    seeds = list(range(n_seeds))
    named: dict[str, int] = {}
    race_runs, fixed_runs, both = [], [], 0
    for _ in range(n_sim):
        world = arms.outcome(rng)
        spent = {"n": 0}

        def counted(runs, world=world, spent=spent):
            spent["n"] += len(runs)
            return world(runs)

        sel = select(counted, baseline, singles, seeds, first, step, alpha,
                     afford=lambda k, spent=spent: spent["n"] + k + confirm_runs <= budget_runs)
        key = "+".join(sorted(sel.decision.pair)) if sel.decision.pair else "none"
        named[key] = named.get(key, 0) + 1
        race_runs.append(sel.runs)
        # the fixed design on the same world: every arm on every seed, looked at after the same blocks
        for n in [first, *range(first + step, n_seeds + 1, step)]:
            if (1 + len(singles)) * n + confirm_runs > budget_runs:
                break
            full = world([(a, s) for a in [baseline, *singles] for s in seeds[:n]])
            gold = {a: {s: full[(a, s)] for s in seeds[:n]} for a in [baseline, *singles]}
            if decide(gold, baseline, singles, alpha).pair:
                if sel.decision.pair:
                    both += 1
                    fixed_runs.append((sel.runs, (1 + len(singles)) * n))
                break
    return {"n_sim": n_sim, "named": dict(sorted(named.items(), key=lambda kv: -kv[1])), "runs_mean": float(np.mean(race_runs)),
            "separated_by_both": both,
            "race_runs_when_both_separated": float(np.mean([r for r, _ in fixed_runs])) if fixed_runs else float("nan"),
            "fixed_runs_when_both_separated": float(np.mean([f for _, f in fixed_runs])) if fixed_runs else float("nan")}
