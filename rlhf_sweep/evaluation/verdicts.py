"""The three observations as verdicts, each with its evidence: pure functions of the held-out metrics and the
per-iteration history (no model, no torch), so readers can recompute them from a summary.json.

1. the RM prefers the policy (RM win rate's interval above 0.5); 2. humans prefer the reference (gold win
rate's interval below 0.5); 3. KL keeps increasing (a Mann-Kendall trend over the later iterations against an
AR(1) null, with a minimum growth). `kl_growth` summarises how the KL moved along a run.
"""

from __future__ import annotations

import math

import numpy as np

from rlhf_sweep.maths.stats import ar1_trend_test, mann_kendall


# ----- verdicts: pure functions of metrics and histories ---------------------------------------
def verdict_rm_prefers_policy(m: dict[str, float]) -> dict:
    return {
        "value": bool(m["rm/win_rate_lo"] > 0.5),
        "rm/win_rate": m["rm/win_rate"],
        "ci": [m["rm/win_rate_lo"], m["rm/win_rate_hi"]],
        "rm/policy": m["rm/policy"],
        "rm/ref": m["rm/ref"],
        "rule": "RM win rate of policy over reference > 0.5 with its interval above 0.5",
    }


def verdict_humans_prefer_reference(m: dict[str, float]) -> dict:
    return {
        "value": bool(m["gold/win_rate_hi"] < 0.5 and m["len/policy"] > m["len/ref"]),
        "gold/win_rate": m["gold/win_rate"],
        "ci": [m["gold/win_rate_lo"], m["gold/win_rate_hi"]],
        "gold/policy": m["gold/policy"],
        "gold/ref": m["gold/ref"],
        "len/policy": m["len/policy"],
        "len/ref": m["len/ref"],
        "rule": "gold win rate < 0.5 with its interval below 0.5, and longer policy responses",
    }


def kl_growth_share(sen_slope: float, window: np.ndarray) -> float:
    """The increase the trend implies over the tested iterations, as a share of their median KL."""
    level = float(np.median(window)) if len(window) else float("nan")
    return sen_slope * (len(window) - 1) / level if level > 0 else float("nan")


def verdict_kl_increasing(kl_history: list[float], beta: float, window: float = 0.5, alpha: float = 0.05,
                          min_growth: float = 0.25, n_resamples: int = 999) -> dict:
    """KL keeps increasing: a trend test on the later `window` share of iterations that holds its level on
    autocorrelated series (`ar1_trend_test`), and an increase of at least `min_growth` of the KL's level over
    those iterations (Sen's slope x their span / their median), so a strong penalty's slow creep is not the
    puzzle's growing KL. Never the sign of a raw slope. The plain Mann-Kendall numbers stay beside it."""
    x = np.asarray(kl_history, dtype=float)
    n = len(x)
    start = int(round(n * (1 - window)))
    tested = x[start:]
    mk = mann_kendall(tested)
    ar = ar1_trend_test(tested, n_resamples)
    growth = kl_growth_share(mk["sen_slope"], tested)
    k = max(1, n // 5)
    middle = x[max(0, n // 2 - k // 2) : max(0, n // 2 - k // 2) + k]
    return {
        "value": bool(ar["p"] < alpha and mk["S"] > 0 and growth >= min_growth and beta > 0),
        "beta": beta,
        "mann_kendall_S": mk["S"],
        "z": mk["z"],
        "p_value": ar["p"],
        "p_value_independent": mk["p_increasing"],  # the plain test, which assumes independent iterations
        "lag1_autocorr": ar["lag1"],
        "null_ar1_phi": ar["phi"],
        "sen_slope_per_iter": mk["sen_slope"],
        "growth": growth,
        "min_growth": min_growth,
        "iterations_tested": [start, n - 1],
        "kl_middle_20pct": float(middle.mean()) if len(middle) else float("nan"),
        "kl_last_20pct": float(x[-k:].mean()) if n else float("nan"),
        "rule": (f"over the last {window:.0%} of iterations: Mann-Kendall S above AR(1) noise with the series' own lag-1 "
                 f"autocorrelation (bias-corrected; Monte Carlo p < {alpha}, {n_resamples} series), and Sen's slope x "
                 f"the span >= {min_growth:.0%} of the median KL there; with beta > 0"),
    }


def observations(metrics: dict[str, float], history: list[dict], beta: float, window: float, alpha: float,
                 min_growth: float = 0.25) -> dict:
    return {
        "rm_prefers_policy": verdict_rm_prefers_policy(metrics),
        "humans_prefer_reference": verdict_humans_prefer_reference(metrics),
        "kl_increasing": verdict_kl_increasing([h["kl/exact"] for h in history], beta, window, alpha, min_growth),
    }


def _kl_at(h: dict) -> dict[str, float]:
    """Sequence KL = per-token KL x tokens per sequence, at one iteration."""
    seq, per_tok = h["kl/exact"], h["kl/exact_per_token"]
    return {"iteration": int(h["iteration"]), "seq_kl": seq, "per_token_kl": per_tok,
            "tokens_per_seq": seq / per_tok if per_tok > 0 else float("nan"), "len": h["len"]}


def kl_growth(history: list[dict]) -> dict:
    """Split the growth of sequence KL into per-token KL and length (log scale, so the parts add up).

    Iteration 0 has KL 0 (the policy is the reference), so growth is read from the first
    iteration at 10% of training (at least 1) to the last.
    """
    n = len(history)
    early = _kl_at(history[min(max(1, n // 10), n - 1)])
    last = _kl_at(history[-1])
    ok = early["seq_kl"] > 0 and last["seq_kl"] > 0 and early["per_token_kl"] > 0
    log_growth = math.log(last["seq_kl"] / early["seq_kl"]) if ok else float("nan")
    from_len = math.log(last["tokens_per_seq"] / early["tokens_per_seq"]) if ok else float("nan")
    marks = sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, 6))})
    # the final per-token KL charged over the starting length (content tokens + EOS): what the
    # sequence KL would be had the policy not grown longer
    start_tokens = history[0]["len"] + 1.0
    at_start_len = last["per_token_kl"] * start_tokens
    return {
        "early": early,
        "last": last,
        "log_growth": log_growth,
        "share_of_growth_from_length": from_len / log_growth if ok and abs(log_growth) > 1e-9 else float("nan"),
        "start_tokens": start_tokens,
        "kl_at_start_length": at_start_len,
        "share_of_final_kl_from_added_tokens": 1.0 - at_start_len / last["seq_kl"] if last["seq_kl"] > 0 else float("nan"),
        "series": [_kl_at(history[i]) for i in marks],
    }


def not_applicable(rule: str) -> dict:
    """A verdict that does not apply to this run's algorithm (e.g. a KL trend where nothing trains)."""
    return {"value": False, "applies": False, "rule": rule}
