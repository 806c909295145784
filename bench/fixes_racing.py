"""compare-fixes' statistics and racing on simulated arms shaped like a real comparison.

Reads the per-seed gold of a finished `rlhf-sweep compare-fixes` (its fixes.json) and fits
fixes.SyntheticArms to it: every run either exploits the RM or only pads (two gold levels, split by
2-means over all runs), with per-run noise, a per-seed effect shared by the arms, and per arm the
share of its runs that exploit. Then, on worlds drawn from that fit:

1. interval coverage at 10 seeds, nominal 95%, of the paired differences of each fix against the
   baseline: the Student-t interval compare-fixes reports, scipy's BCa and percentile bootstraps;
2. the racing (fixes.select, as compare-fixes runs it: first block, seeds per look, alpha, the
   confirmation's runs held back) within `--budget-runs` runs, in three worlds:
   - pair:  the fitted top two fixes as fitted, the other two with the baseline's exploit rate
            (a best pair exists): how often it names exactly that pair;
   - equal: every fix with the baseline's exploit rate: how often it says "no stable pair";
   - tied:  every fix with the mean of the fitted fixes' rates (all help, equally): the same;
   - near tie: the fitted best fix as fitted, the next two at the mean of their rates, the last
            with the baseline's (no pair is best): how often it names one anyway;
   - fitted: the fitted rates as they are;
   - half, strong: the fitted top two exploit at half the baseline's rate / never, the other two at
            the baseline's: how large a pair's gain must be for the budget to find it;
   and how many runs it spent against every arm on every seed until the same separation.

The budget in runs defaults to what the study file's `budget_minutes` affords at the comparison's
own wall seconds per run (its wall time over the runs it made), so the racing is judged at the
default budget's number of runs.

Usage: python bench/fixes_racing.py FIXES_JSON [--budget-runs N] [--max-seeds N] [--sims 1000]; prints tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rlhf_sweep.fixes import racing
from rlhf_sweep.fixes.spec import load_spec


def fit(result: dict) -> tuple[racing.SyntheticArms, str, list[str]]:
    """SyntheticArms from a comparison's per-seed gold (selection arms, on the seeds each ran)."""
    base = result["baseline"]
    arms = result["arms"]
    singles = [a for a in arms if a != base]
    gold = {a: dict(zip(r["seeds"], r["per_seed"]["gold/policy"], strict=True)) for a, r in arms.items()}
    values = np.array([v for g in gold.values() for v in g.values()])
    lo, hi = np.percentile(values, 25), np.percentile(values, 75)
    for _ in range(50):  # 2-means in one dimension
        cut = (lo + hi) / 2
        lo, hi = values[values < cut].mean(), values[values >= cut].mean()
    cut = (lo + hi) / 2
    resid = {a: {s: v - (lo if v < cut else hi) for s, v in g.items()} for a, g in gold.items()}
    all_resid = np.array([v for r in resid.values() for v in r.values()])
    # the seed effect: the covariance of residuals of two arms on the same seed, averaged over pairs of arms
    covs = []
    names = list(resid)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(set(resid[a]) & set(resid[b]))
            if len(common) > 2:
                covs.append(np.cov([resid[a][s] for s in common], [resid[b][s] for s in common])[0, 1])
    seed_var = max(0.0, float(np.mean(covs))) if covs else 0.0
    noise = float(np.sqrt(max(1e-6, all_resid.var() - seed_var)))
    exploit = {a: float(np.mean([v < cut for v in g.values()])) for a, g in gold.items()}
    return racing.SyntheticArms(exploit=exploit, high=float(hi), low=float(lo), noise=noise, seed_sd=float(np.sqrt(seed_var))), base, singles


def coverage(arms: racing.SyntheticArms, base: str, singles: list[str], n: int = 10, per_arm: int = 600, seed: int = 0) -> dict[str, float]:
    from scipy import stats

    rng = np.random.default_rng(seed)
    hits = {"t": 0, "BCa": 0, "percentile": 0}
    total = 0
    for a in singles:
        truth = arms.effect(a, base)
        d = np.empty((per_arm, n))
        for i in range(per_arm):
            w = arms.outcome(rng)([(x, s) for x in (base, a) for s in range(n)])
            d[i] = [w[(a, s)] - w[(base, s)] for s in range(n)]
        for row in d:
            _, lo, hi = racing.paired_interval(row, np.zeros(n))
            hits["t"] += lo <= truth <= hi
        for method, key in (("BCa", "BCa"), ("percentile", "percentile")):
            ci = stats.bootstrap((d,), np.mean, axis=-1, vectorized=True, n_resamples=1999, method=method, random_state=1).confidence_interval
            hits[key] += int(np.sum((ci.low <= truth) & (truth <= ci.high)))
        total += per_arm
    return {k: v / total for k, v in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fixes_json")
    ap.add_argument("--budget-runs", type=int, help="runs the budget affords (default: the study file's budget_minutes at the "
                    "comparison's wall seconds per run)")
    ap.add_argument("--sims", type=int, default=1000)
    ap.add_argument("--max-seeds", type=int, help="selection seeds per arm at most (default: the study file's); with a matching "
                    "--budget-runs it asks how many seeds the procedure would need")
    a = ap.parse_args()
    result = json.loads(Path(a.fixes_json).read_text())
    spec = load_spec(max_seeds=a.max_seeds)
    arms, base, singles = fit(result)
    made = result.get("runs_this_invocation") or 0
    per_run = result["wall_seconds"] / made if made else float("nan")
    budget = a.budget_runs or (int(spec.budget_minutes * 60 // per_run) if made else None)
    if not budget:
        raise SystemExit(f"{a.fixes_json} made no runs of its own (all were reused), so its wall time per run is unknown; "
                         "give --budget-runs N")
    confirm_runs = (1 + 3) * spec.confirm_seeds
    t0 = time.perf_counter()
    print(f"fit to {a.fixes_json}: gold {arms.high:.3f} (pads) or {arms.low:.3f} (exploits), noise {arms.noise:.3f}, seed effect {arms.seed_sd:.3f}")
    print("exploit rate: " + ", ".join(f"{k} {v:.2f}" for k, v in arms.exploit.items()))
    print("true effect vs baseline: " + ", ".join(f"{k} {arms.effect(k, base):+.3f}" for k in singles))
    cov = coverage(arms, base, singles)
    print("coverage of nominal 95% intervals, 10 seeds: " + ", ".join(f"{k} {v:.3f}" for k, v in cov.items()))
    ranked = sorted(singles, key=lambda x: arms.exploit[x])
    worlds = {
        "pair": {**arms.exploit, **{x: arms.exploit[base] for x in ranked[2:]}},
        "equal": {**arms.exploit, **{x: arms.exploit[base] for x in singles}},
        "tied": {**arms.exploit, **{x: float(np.mean([arms.exploit[y] for y in singles])) for x in singles}},
        "near tie": {**arms.exploit, **{x: float(np.mean([arms.exploit[y] for y in ranked[1:3]])) for x in ranked[1:3]},
                     ranked[3]: arms.exploit[base]},
        "fitted": dict(arms.exploit),
        "half": {**arms.exploit, **{x: arms.exploit[base] / 2 for x in ranked[:2]}, **{x: arms.exploit[base] for x in ranked[2:]}},
        "strong": {**arms.exploit, **{x: 0.0 for x in ranked[:2]}, **{x: arms.exploit[base] for x in ranked[2:]}},
    }
    out = {"fit": {"high": arms.high, "low": arms.low, "noise": arms.noise, "seed_sd": arms.seed_sd, "exploit": arms.exploit},
           "coverage": cov, "budget_runs": budget, "sims": a.sims, "worlds": {}}
    how = "--budget-runs" if a.budget_runs else f"{spec.budget_minutes:.0f} min at {per_run:.1f} s of wall time per run"
    print(f"\nracing within {budget} runs ({how}; {confirm_runs} held back for the confirmation), first block {spec.seeds}, "
          f"{spec.seeds_per_round} seeds per look, at most {spec.max_seeds} seeds, alpha {spec.alpha}; {a.sims} worlds each")
    print(f"{'world':8s} {'true pair':36s} {'named it':>9s} {'no pair':>8s} {'runs':>6s}  fixed design vs racing, same separation")
    print("(named it: the true pair, or any pair where none is best)")
    for name, rates in worlds.items():
        w = racing.SyntheticArms(exploit=rates, high=arms.high, low=arms.low, noise=arms.noise, seed_sd=arms.seed_sd)
        effects = {x: w.effect(x, base) for x in singles}
        top = sorted(singles, key=lambda x: -effects[x])
        separated = len(top) == 2 or effects[top[1]] > effects[top[2]] + 1e-9
        true_pair = "+".join(sorted(top[:2])) if separated and effects[top[1]] > 0 else "none"
        r = racing.simulate(w, base, singles, spec.max_seeds, spec.seeds, spec.seeds_per_round, spec.alpha, budget, confirm_runs, a.sims)
        named = (r["named"].get(true_pair, 0) if true_pair != "none" else a.sims - r["named"].get("none", 0)) / a.sims
        nopair = r["named"].get("none", 0) / a.sims
        both = (f"{r['fixed_runs_when_both_separated']:.0f} vs {r['race_runs_when_both_separated']:.0f} runs ({r['separated_by_both']} worlds)"
                if r["separated_by_both"] else "neither separated")
        print(f"{name:8s} {true_pair:36s} {named:9.3f} {nopair:8.3f} {r['runs_mean']:6.1f}  {both}")
        out["worlds"][name] = {"exploit": rates, "effects": effects, "true_pair": true_pair, "named_true_pair": named, "no_pair": nopair, **r}
    print(f"({time.perf_counter() - t0:.0f} s)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
