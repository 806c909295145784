"""Held-out evaluation, the three verdicts and the diagnosis that explains them.

`evaluate` samples the policy and the reference on the same held-out prompts
and returns the DESIGN §4 metric keys. The verdict functions are pure, so
they can be tested on synthetic numbers; `diagnose` ties each observation to
measured evidence (RM length bias, advantages that reward the exploit, a KL
penalty outrun by the RM's gain).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from . import kl as klmod
from .models import lm_logits, response_logits, response_mask, sample, token_logprobs
from .reward import RewardModel
from .world import EOS, World


# ----- statistics ------------------------------------------------------------------------------
def z_value(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def mean_ci(x: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean with a normal-approximation interval (n is in the hundreds here)."""
    x = np.asarray(x, dtype=float)
    m = float(x.mean())
    half = z_value(confidence) * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return m, m - half, m + half


def win_rate(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """P(a > b) on paired samples, ties counted as half a win, with its interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    wins = (a > b) + 0.5 * (a == b)
    return mean_ci(wins, confidence)


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


AR1_CAP = 0.99  # the null's autocorrelation at most (1 would be a random walk, whose S has no stationary law)


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


# ----- held-out evaluation ---------------------------------------------------------------------
@torch.no_grad()
def kl_terms(policy_lm: nn.Module, ref_lm: nn.Module, prompts: torch.Tensor, responses: torch.Tensor,
             temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-token exact KL, k1 and k3 on policy samples (masked to the response), between the
    distributions sampled from (both at `temperature`)."""
    seqs = torch.cat([prompts, responses], 1)
    logits = response_logits(lm_logits(policy_lm, seqs))
    ref_logits = response_logits(lm_logits(ref_lm, seqs))
    if temperature != 1:
        logits, ref_logits = logits / temperature, ref_logits / temperature
    lp, rlp = token_logprobs(logits, responses), token_logprobs(ref_logits, responses)
    mask = response_mask(responses)
    return {"exact": klmod.exact(logits, ref_logits) * mask, "k1": klmod.k1(lp, rlp) * mask, "k3": klmod.k3(lp, rlp) * mask, "mask": mask}


def _side(world: World, rm: RewardModel, prompts: torch.Tensor, responses: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
    from .reward import score

    f = world.features(prompts, responses)
    out = {k: v.numpy() for k, v in f.items()}
    out["gold"] = world.gold(prompts, responses, f).numpy()
    out["rm"] = score(rm, prompts, responses, device).numpy()
    return out


@torch.no_grad()
def evaluate(
    policy_lm: nn.Module,
    ref_lm: nn.Module,
    rm: RewardModel,
    world: World,
    n_prompts: int,
    confidence: float,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    temperature: float = 1.0,
) -> tuple[dict[str, float], dict]:
    """Paired samples from policy and reference on the same held-out prompts, both at the PPO
    sampling temperature (the policy as trained, against the reference it started from)."""
    T = world.cfg.max_new_tokens
    prompts = world.sample_prompts(n_prompts, rng)
    pol = sample(policy_lm, prompts.to(device), T, gen, temperature).cpu()
    ref = sample(ref_lm, prompts.to(device), T, gen, temperature).cpu()
    P, R = _side(world, rm, prompts, pol, device), _side(world, rm, prompts, ref, device)
    kt = {k: v.cpu() for k, v in kl_terms(policy_lm, ref_lm, prompts.to(device), pol.to(device), temperature).items()}
    m: dict[str, float] = {}
    for key in ("rm", "gold"):
        m[f"{key}/policy"], m[f"{key}/policy_lo"], m[f"{key}/policy_hi"] = mean_ci(P[key], confidence)
        m[f"{key}/ref"], m[f"{key}/ref_lo"], m[f"{key}/ref_hi"] = mean_ci(R[key], confidence)
        m[f"{key}/win_rate"], m[f"{key}/win_rate_lo"], m[f"{key}/win_rate_hi"] = win_rate(P[key], R[key], confidence)
    for name, side in (("policy", P), ("ref", R)):
        m[f"len/{name}"] = float(side["length"].mean())
        m[f"filler/{name}"] = float(side["filler"].mean())
        has = side["has_correct"]
        m[f"directness/{name}"] = float(side["first_correct"][has].mean()) if has.any() else float("nan")
        m[f"correct/{name}"] = float(has.mean())
        m[f"wrong/{name}"] = float((side["n_wrong"] > 0).mean())
        m[f"repeat/{name}"] = float((side["n_correct"] > 1).mean())  # the correct action more than once
        m[f"ended/{name}"] = float(side["ended"].mean())
    mask = kt["mask"]
    for est in ("exact", "k1", "k3"):
        m[f"kl/{est}"] = float(kt[est].sum(1).mean())
    m["kl/exact_per_token"] = float(kt["exact"].sum() / mask.sum())
    samples = {"prompts": prompts, "policy": pol, "ref": ref, "P": P, "R": R, "kl": kt}
    return m, samples


# ----- diagnosis: why the observations happen ---------------------------------------------------
def rm_slopes(rm_score: np.ndarray, gold: np.ndarray, length: np.ndarray, filler: np.ndarray) -> dict[str, float]:
    """Least squares rm ~ 1 + gold + length + filler: the RM's length and filler slopes holding gold fixed."""
    X = np.column_stack([np.ones_like(gold), gold, length, filler]).astype(float)
    coef, *_ = np.linalg.lstsq(X, rm_score.astype(float), rcond=None)
    resid = rm_score - X @ coef
    r2 = 1.0 - resid.var() / max(rm_score.var(), 1e-12)
    return {"gold": float(coef[1]), "length": float(coef[2]), "filler": float(coef[3]), "r2": float(r2)}


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


@torch.no_grad()
def rm_filler_curve(rm: nn.Module, world: World, prompts: torch.Tensor, responses: torch.Tensor, device: torch.device,
                    max_extra: int = 10) -> dict:
    """The RM's out-of-distribution shape: append k filler tokens (before EOS) to reference answers.

    Uses the reference answers that ended and have room for the largest k (90% of them or more),
    so every k scores the same answers. Returns mean RM and gold per k, and where the reference's own filler
    counts lie (how far k goes beyond them). No randomness: the fillers cycle F0, F1, ...
    """
    from .reward import score

    T = world.cfg.max_new_tokens
    f = world.features(prompts, responses)
    length = f["length"]
    if bool(f["ended"].any()):  # room for k more tokens in 90% of the answers that ended
        p90 = int(torch.quantile(length[f["ended"]].float(), 0.9).ceil())
        max_extra = max(0, min(max_extra, T - 1 - p90))
    else:
        max_extra = 0
    keep = f["ended"] & (length + 1 + max_extra <= T)
    p, r, length = prompts[keep], responses[keep], length[keep]
    out = {"k": [], "rm": [], "gold": [], "filler": [], "n": int(keep.sum())}
    rows = torch.arange(len(r))
    for k in range(max_extra + 1):
        y = r.clone()
        for j in range(k):
            y[rows, length + j] = world.vocab.filler0 + j % world.cfg.n_filler
        y[rows, length + k] = EOS
        fk = world.features(p, y)
        out["k"].append(k)
        out["rm"].append(float(score(rm, p, y, device).mean()))
        out["gold"].append(float(world.gold(p, y, fk).mean()))
        out["filler"].append(float(fk["filler"].float().mean()))
    ref_fill = f["filler"].float()
    out["ref_filler_mean"] = float(ref_fill.mean())
    out["ref_filler_p95"] = float(torch.quantile(ref_fill, 0.95))
    out["ref_filler_max"] = float(ref_fill.max())
    if out["rm"]:
        out["rm_peak_k"] = int(np.argmax(out["rm"]))
        out["rm_gain_at_peak"] = out["rm"][out["rm_peak_k"]] - out["rm"][0]
        out["gold_change_at_peak"] = out["gold"][out["rm_peak_k"]] - out["gold"][0]
    return out


def not_applicable(rule: str) -> dict:
    """A verdict that does not apply to this run's algorithm (e.g. a KL trend where nothing trains)."""
    return {"value": False, "applies": False, "rule": rule}


def diagnose(metrics: dict[str, float], samples: dict, history: list[dict], beta: float, ood: dict | None = None,
             prefix: str = "ppo") -> dict:
    """`prefix`: the training algorithm's history prefix (ppo, rloo, grpo, dpo); `beta` its final KL coefficient
    (NaN for best-of-n). Parts that need per-token KL (samples["kl"]) or advantages are NaN when absent."""
    R, kt = samples["R"], samples["kl"]
    # (a) the reward model: what it pays for, holding gold fixed, on reference samples
    slopes = rm_slopes(R["rm"], R["gold"], R["length"], R["filler"])
    d_rm = metrics["rm/policy"] - metrics["rm/ref"]
    d_len = metrics["len/policy"] - metrics["len/ref"]
    d_fill = metrics["filler/policy"] - metrics["filler/ref"]
    d_gold = metrics["gold/policy"] - metrics["gold/ref"]
    safe = d_rm if abs(d_rm) > 1e-9 else float("nan")
    # (b) PPO: how advantages lined up with the exploit over training
    adv_len = [h[f"{prefix}/adv_len_corr"] for h in history if f"{prefix}/adv_len_corr" in h]
    adv_fill = [h[f"{prefix}/adv_filler_corr"] for h in history if f"{prefix}/adv_filler_corr" in h]
    fill_share = [h[f"{prefix}/filler_pos_adv_share"] for h in history if f"{prefix}/filler_pos_adv_share" in h]
    # (c) the KL term: sequence KL = per-token KL x length; k1 on sampled tokens
    nan = float("nan")
    if kt is not None:
        mask = kt["mask"].bool()
        k1_tok = kt["k1"][mask].numpy()
        k1_seq, ex_seq = kt["k1"].sum(1).numpy(), kt["exact"].sum(1).numpy()
    first, last = history[0], history[-1]
    clipfrac = [h[f"{prefix}/clipfrac"] for h in history if f"{prefix}/clipfrac" in h]
    out = {
        "reward_model": {
            "rm_slope_per_token_holding_gold": slopes["length"],
            "rm_slope_per_filler_holding_gold": slopes["filler"],
            "rm_slope_per_gold": slopes["gold"],
            "fit_r2_on_reference": slopes["r2"],
            "rm_gain": d_rm,
            "gold_gain": d_gold,
            "length_gain": d_len,
            "filler_gain": d_fill,
            "share_of_rm_gain_from_length": slopes["length"] * d_len / safe,
            "share_of_rm_gain_from_filler": slopes["filler"] * d_fill / safe,
            "share_of_rm_gain_from_gold": slopes["gold"] * d_gold / safe,
        },
        "ppo": {
            "adv_length_corr_mean": float(np.mean(adv_len)) if adv_len else float("nan"),
            "adv_filler_corr_mean": float(np.mean(adv_fill)) if adv_fill else float("nan"),
            "filler_share_of_positive_adv_tokens": float(np.mean(fill_share)) if fill_share else float("nan"),
            "filler_share_of_tokens_ref": float(R["filler"].sum() / max(R["length"].sum() + len(R["length"]), 1)),
            "clipfrac_mean": float(np.mean(clipfrac)) if clipfrac else nan,
            "clipfrac_last": float(clipfrac[-1]) if clipfrac else nan,
        },
        "kl": {
            "seq_kl_first": first["kl/exact"],
            "seq_kl_last": last["kl/exact"],
            "per_token_kl_first": first["kl/exact_per_token"],
            "per_token_kl_last": last["kl/exact_per_token"],
            "len_first": first["len"],
            "len_last": last["len"],
            "growth": kl_growth(history),
            "beta_final": beta,
            "beta_times_kl": beta * metrics["kl/exact"],
            "rm_gain": d_rm,
            "k1_negative_token_share": float((k1_tok < 0).mean()) if kt is not None and len(k1_tok) else nan,
            "k1_bias_vs_exact": float(k1_seq.mean() - ex_seq.mean()) if kt is not None else nan,
            "k1_seq_std": float(k1_seq.std()) if kt is not None else nan,
            "exact_seq_std": float(ex_seq.std()) if kt is not None else nan,
        },
    }
    if ood is not None:
        out["reward_model"]["filler_curve"] = ood
    return out


def advantage_record(world: World, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """One rollout's raw numbers behind advantage_stats (kept in samples.pt, so tests can recompute)."""
    m, adv = batch["mask"], batch["advantages"]
    f = world.features(batch["prompts"], batch["responses"])
    is_fill = world.vocab.is_filler(batch["responses"]) & m.bool()
    pos = (adv > 0) & m.bool()
    return {
        "seq_adv": ((adv * m).sum(1) / m.sum(1).clamp(min=1)).numpy(),
        "length": f["length"].numpy(),
        "filler": f["filler"].numpy(),
        "pos_tokens": np.int64(pos.sum()),
        "pos_filler_tokens": np.int64((is_fill & pos).sum()),
    }


def advantage_stats_from(rec: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        "ppo/adv_len_corr": corr(rec["seq_adv"], rec["length"]),
        "ppo/adv_filler_corr": corr(rec["seq_adv"], rec["filler"]),
        # a torch division, as the history has always been computed (float32)
        "ppo/filler_pos_adv_share": float(torch.tensor(rec["pos_filler_tokens"]) / max(int(rec["pos_tokens"]), 1)),
    }


def advantage_stats(world: World, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """How one rollout's advantages line up with length and filler (for the diagnosis)."""
    return advantage_stats_from(advantage_record(world, batch))
