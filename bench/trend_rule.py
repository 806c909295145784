"""Verdict 3's trend rule on simulated KL series: false positives without a trend, power with one.

Series of the length the default run tests (the last half of 150 iterations: 75 points): AR(1) noise with
phi from 0.5 to 0.95 around a level, with and without a linear rise. For each phi it prints how often each
test says "increasing" at alpha = 0.05: the plain Mann-Kendall test (independent points), pymannkendall's
Hamed-Rao correction, the AR(1) Monte Carlo test verdict 3 uses (rlhf_sweep.maths.stats.ar1_trend_test), and the whole
rule (that test and a rise of at least eval.trend_min_growth of the level). Then the power of the rule on
rising series, for rises given as a share of the level over the 75 iterations.

The noise around the level is `--noise` of the level (marginal sd): the default, 0.05, is about what the
default run's exact-KL series shows around its trend (per-iteration batches of 64 prompts); pass the
value measured on a run with --noise. Usage: python bench/trend_rule.py [--series 1000] [--noise 0.05]
[--resamples 999]; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from rlhf_sweep.evaluation.verdicts import kl_growth_share
from rlhf_sweep.maths.stats import ar1_noise, ar1_trend_test, mann_kendall

PHIS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
N = 75  # the default run: the last 50% of 150 iterations
ALPHA = 0.05


def verdicts(x: np.ndarray, min_growth: float, resamples: int) -> dict[str, bool]:
    import pymannkendall

    mk = mann_kendall(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hr = pymannkendall.hamed_rao_modification_test(x, alpha=2 * ALPHA)  # two-sided at 2 alpha = one-sided at alpha
    ar = ar1_trend_test(x, resamples)
    test = ar["p"] < ALPHA and mk["S"] > 0
    return {"plain MK": mk["p_increasing"] < ALPHA, "Hamed-Rao": hr.trend == "increasing", "AR(1) test": test,
            "rule": test and kl_growth_share(mk["sen_slope"], x) >= min_growth}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=1000, help="series per phi")
    ap.add_argument("--noise", type=float, default=0.05, help="noise sd as a share of the level")
    ap.add_argument("--min-growth", type=float, default=0.25)
    ap.add_argument("--resamples", type=int, default=999)
    a = ap.parse_args()
    rng = np.random.default_rng(2024)
    t0 = time.perf_counter()
    names = ("plain MK", "Hamed-Rao", "AR(1) test", "rule")
    fp: dict[float, dict[str, float]] = {}
    print(f"no trend: share of {a.series} AR(1) series of {N} points called 'increasing' at alpha {ALPHA} (noise {a.noise:.0%} of the level)")
    print(f"{'phi':>5s}" + "".join(f"{n:>12s}" for n in names))
    for phi in PHIS:
        hits = np.zeros(len(names))
        for _ in range(a.series):
            v = verdicts(1.0 + a.noise * ar1_noise(rng, phi, N), a.min_growth, a.resamples)
            hits += [v[n] for n in names]
        fp[phi] = dict(zip(names, (hits / a.series).tolist(), strict=True))
        print(f"{phi:5.2f}" + "".join(f"{fp[phi][n]:12.3f}" for n in names))
    pooled = {n: float(np.mean([fp[p][n] for p in PHIS])) for n in names}
    print(f"{'all':>5s}" + "".join(f"{pooled[n]:12.3f}" for n in names))
    rises = (0.1, 0.25, 0.5, 1.0)
    power: dict[str, dict[float, float]] = {}
    print(f"\npower of the rule: share of {a.series // 4} rising series called 'increasing' (rise over {N} iterations, share of the level)")
    print(f"{'phi':>5s}" + "".join(f"{f'+{r:.0%}':>10s}" for r in rises))
    for phi in (0.5, 0.9):
        power[str(phi)] = {}
        for r in rises:
            k = a.series // 4
            trend = np.linspace(1.0 - r / 2, 1.0 + r / 2, N)  # a rise of r around the level 1
            power[str(phi)][str(r)] = float(np.mean([verdicts(trend + a.noise * ar1_noise(rng, phi, N), a.min_growth, a.resamples)["rule"]
                                                     for _ in range(k)]))
        print(f"{phi:5.2f}" + "".join(f"{power[str(phi)][str(r)]:10.3f}" for r in rises))
    print(f"({time.perf_counter() - t0:.0f} s)")
    print(json.dumps({"false_positive": {str(p): fp[p] for p in PHIS}, "false_positive_all_phi": pooled, "power": power,
                      "noise": a.noise, "min_growth": a.min_growth, "n": N}))


if __name__ == "__main__":
    main()
