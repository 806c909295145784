"""Statistics on plain arrays, and every interval the project reports: the mean and its interval
(`mean_interval`, the one helper: normal or Student's t), a win rate, exact binomial shares, the mean over
clusters of runs with a bootstrap over whole clusters, Pearson correlations with Fisher-z intervals and
Benjamini-Hochberg q-values, the slope per decade with its t interval; the Mann-Kendall test
(pymannkendall), lag-1 autocorrelation, AR(1) noise and the trend test against an AR(1) null.

Pure numpy/scipy (pandas only for the table of correlations): every verdict, report and bench computes its
intervals with these.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import stdtrit

if TYPE_CHECKING:
    import pandas as pd

# ----- statistics ------------------------------------------------------------------------------
AR1_CAP = 0.99  # the null's autocorrelation at most (1 would be a random walk, whose S has no stationary law)


def z_value(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def mean_interval(x, confidence: float = 0.95, method: str = "normal") -> tuple[float, float, float]:
    """(mean, low, high) of a sample: the one mean-and-interval helper.

    method "normal": the normal approximation, for samples in the hundreds (held-out prompts); one value
    gives a zero-width interval. method "t": Student's t, for a handful of seeds; one value gives nan bounds
    (no interval), a constant sample a zero-width one.
    """
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("mean_interval needs a non-empty 1-D sample")
    m = float(x.mean())
    if method == "normal":
        half = z_value(confidence) * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else 0.0
    elif method == "t":
        if len(x) < 2:
            return m, math.nan, math.nan
        if np.ptp(x) == 0:
            return m, m, m
        half = float(stdtrit(len(x) - 1, 0.5 + confidence / 2)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    else:
        raise ValueError(f"mean_interval: method={method!r}; it accepts normal | t")
    return m, m - half, m + half


def mean_ci(x: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean with a normal-approximation interval (n is in the hundreds here)."""
    return mean_interval(x, confidence, "normal")


def win_rate(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """P(a > b) on paired samples, ties counted as half a win, with its interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    wins = (a > b) + 0.5 * (a == b)
    return mean_ci(wins, confidence)


def share_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """k of n, with the exact (Clopper-Pearson) binomial interval."""
    from scipy.stats import binomtest

    if n == 0:
        return math.nan, math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return k / n, float(ci.low), float(ci.high)


def cluster_mean_ci(groups: list[np.ndarray], confidence: float = 0.95) -> tuple[float, float, float]:
    """The mean over all runs, with a bootstrap interval that resamples whole clusters (worlds: runs of a world
    are not independent)."""
    from scipy.stats import bootstrap

    per = np.array([float(np.mean(g)) for g in groups])
    sizes = np.array([len(g) for g in groups], dtype=float)
    mean = float((per * sizes).sum() / sizes.sum())
    if len(per) < 2:
        return mean, math.nan, math.nan
    if np.all(per == per[0]) and per[0] in (0.0, 1.0):
        # every cluster alike: resampling clusters cannot move the mean; the exact interval over clusters says what n allows
        return mean, *share_ci(int(per[0]) * len(per), len(per), confidence)[1:]
    res = bootstrap((per, sizes), lambda p, s: (p * s).sum() / s.sum(), paired=True, confidence_level=confidence,
                    method="percentile", n_resamples=9999, random_state=0)
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def correlations(x: pd.DataFrame, y: pd.Series, confidence: float = 0.95) -> pd.DataFrame:
    """Pearson r of y with each column of x (one row per cluster), Fisher-z intervals, p and BH q-values."""
    import pandas as pd  # only the reports' tables need it: runs and verdicts import this module without it
    from scipy.stats import false_discovery_control, pearsonr

    rows = []
    for col in x.columns:
        xv, yv = x[col].to_numpy(dtype=float), y.to_numpy(dtype=float)
        keep = np.isfinite(xv) & np.isfinite(yv)
        xv, yv = xv[keep], yv[keep]
        if len(xv) < 4 or np.ptp(xv) == 0 or np.ptp(yv) == 0:
            continue
        res = pearsonr(xv, yv)
        ci = res.confidence_interval(confidence_level=confidence)
        rows.append({"param": col, "n": len(xv), "r": float(res.statistic), "lo": float(ci.low), "hi": float(ci.high),
                     "p": float(res.pvalue)})
    df = pd.DataFrame(rows, columns=["param", "n", "r", "lo", "hi", "p"])
    df["q"] = false_discovery_control(df["p"].to_numpy()) if len(df) else []
    return df.sort_values("p").reset_index(drop=True)


def r_critical(n: int) -> float:
    """The |r| above which a Pearson correlation over n points has p < 0.05 (two-sided); NaN below 4 points."""
    from scipy.stats import t as student_t

    if n < 4:
        return math.nan
    t = float(student_t.ppf(0.975, n - 2))
    return t / math.sqrt(n - 2 + t * t)


def trend(x: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> dict:
    """How y moves with log10 x: Spearman's rho (and p), and the least-squares slope per decade with its interval."""
    from scipy.stats import linregress, spearmanr
    from scipy.stats import t as student_t

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = np.log10(x[keep]), y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(len(x)), "rho": math.nan, "p": math.nan, "slope": math.nan, "lo": math.nan, "hi": math.nan}
    rho = spearmanr(x, y)
    fit = linregress(x, y)
    half = float(student_t.ppf(0.5 + confidence / 2, len(x) - 2)) * fit.stderr
    return {"n": int(len(x)), "rho": float(rho.statistic), "p": float(rho.pvalue), "slope": float(fit.slope),
            "lo": float(fit.slope - half), "hi": float(fit.slope + half)}


def mann_kendall(x: np.ndarray) -> dict[str, float]:
    """Mann-Kendall trend test (pymannkendall's original test, tie-corrected variance): S, z, the one-sided
    p-value for an increasing trend (it assumes independent points) and Sen's slope."""
    import pymannkendall
    from scipy.stats import norm

    x = np.asarray(x, dtype=float)
    n = len(x)
    if n < 3:
        return {"S": 0.0, "z": 0.0, "p_increasing": 1.0, "sen_slope": 0.0, "n": float(n)}
    r = pymannkendall.original_test(x)
    return {"S": float(r.s), "z": float(r.z), "p_increasing": float(norm.sf(r.z)), "sen_slope": float(r.slope), "n": float(n)}


def mk_s(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mann-Kendall S = sum over i < j of sign(x_j - x_i), along `axis` (vectorized for Monte Carlo nulls)."""
    x = np.moveaxis(np.asarray(x, dtype=float), axis, -1)
    i, j = np.triu_indices(x.shape[-1], 1)
    return np.sign(x[..., j] - x[..., i]).sum(-1)


def lag1_autocorr(x: np.ndarray) -> float:
    d = np.asarray(x, dtype=float) - np.mean(x)
    den = float((d**2).sum())
    return float((d[1:] * d[:-1]).sum() / den) if den > 0 else 0.0


def ar1_noise(rng: np.random.Generator, phi: float, size: int | tuple[int, ...]) -> np.ndarray:
    """Stationary AR(1) noise with unit marginal variance along the last axis: x_t = phi x_(t-1) + sqrt(1 - phi^2) e_t."""
    e = rng.standard_normal(size)
    out = np.empty_like(e)
    out[..., 0] = e[..., 0]
    scale = math.sqrt(1 - phi**2)
    for t in range(1, out.shape[-1]):
        out[..., t] = phi * out[..., t - 1] + scale * e[..., t]
    return out


def ar1_trend_test(x: np.ndarray, n_resamples: int = 999, seed: int = 0) -> dict[str, float]:
    """One-sided trend test that holds its level on autocorrelated series: Mann-Kendall S against AR(1) noise.

    The null is AR(1) noise with the series's own lag-1 autocorrelation, Kendall's bias correction
    r + (1 + 3r)/n applied (at n = 75 the raw estimate is ~0.05 too low), estimated without removing a trend:
    under no trend that is right, under a trend it only makes the null wider (conservative). The p-value
    is scipy.stats.monte_carlo_test's with `n_resamples` such series (a sieve bootstrap; deterministic via `seed`).
    """
    from scipy import stats

    x = np.asarray(x, dtype=float)
    n = len(x)
    r = lag1_autocorr(x)
    phi = float(np.clip(r + (1 + 3 * r) / n, 0.0, AR1_CAP))
    if n < 4 or np.ptp(x) == 0:
        return {"p": 1.0, "phi": phi, "lag1": r}

    rng = np.random.default_rng(seed)
    # scipy asks for (resamples, n): the series run along the last axis
    res = stats.monte_carlo_test(x, lambda size: ar1_noise(rng, phi, size), lambda y, axis: mk_s(y, axis),
                                 vectorized=True, n_resamples=n_resamples, alternative="greater")
    return {"p": float(res.pvalue), "phi": phi, "lag1": r}


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])
