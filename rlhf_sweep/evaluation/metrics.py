"""Held-out evaluation and the diagnosis that explains the three verdicts (`verdicts.py` holds those).

`evaluate` samples the policy and the reference on the same held-out prompts
and returns the DESIGN §4 metric keys, each mean with its interval
(rlhf_sweep.maths.stats). `diagnose` ties each observation to measured
evidence (RM length bias, advantages that reward the exploit, a KL penalty
outrun by the RM's gain); `rm_filler_curve` and the advantage records are
what it reads besides the held-out samples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rlhf_sweep.evaluation.verdicts import kl_growth
from rlhf_sweep.maths import kl as klmod
from rlhf_sweep.maths.stats import corr, mean_ci, win_rate
from rlhf_sweep.models.lm import lm_logits, response_logits, response_mask, sample, token_logprobs
from rlhf_sweep.models.reward import RewardModel, score
from rlhf_sweep.simulation.world import EOS, World


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


@torch.no_grad()
def rm_filler_curve(rm: nn.Module, world: World, prompts: torch.Tensor, responses: torch.Tensor, device: torch.device,
                    max_extra: int = 10) -> dict:
    """The RM's out-of-distribution shape: append k filler tokens (before EOS) to reference answers.

    Uses the reference answers that ended and have room for the largest k (90% of them or more),
    so every k scores the same answers. Returns mean RM and gold per k, and where the reference's own filler
    counts lie (how far k goes beyond them). No randomness: the fillers cycle F0, F1, ...
    """
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
