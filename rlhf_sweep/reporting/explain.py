"""`rlhf-sweep explain RUN_DIR`: the three observations tied to their mechanisms, in words and numbers.

This module owns `explain.md`. It reads a run's `summary.json` (the diagnosis that
`rlhf_sweep.evaluation.metrics.diagnose` computed during the run) and `samples.pt` (the raw held-out numbers
behind it) and writes three parts, each number with one sentence that reads it:
(a) the reward model, (b) PPO, (c) the KL term. Each sentence follows the sign and the size
of its own number: a reversed slope gets the reversed sentence, and one below the TINY_*
sizes says it is negligible instead of telling the puzzle's story.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from rlhf_sweep.evaluation.verdicts import kl_growth
from rlhf_sweep.maths import kl
from rlhf_sweep.run import layout
from rlhf_sweep.utils.tables import fmt, md_table

# Below these sizes a number is read as "about zero" (a sentence says so instead of giving it a direction).
TINY_SLOPE = 0.05  # RM std units per token
TINY_CORR = 0.05  # correlation of advantages with length or filler
TINY_SHARE = 0.10  # a share of a gain or of the KL
TINY_RM = 0.05  # RM std units
TINY_NATS = 0.05  # nats per sequence


class ExplainError(ValueError):
    """A run directory without what `explain` needs; one line naming the file and the fix."""


def _f(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.0%}"


def length_buckets(samples: dict) -> list[list[str]]:
    """Mean RM score and gold of reference samples by response length (raw evidence for part a)."""
    R = {k: np.asarray(v, dtype=float) for k, v in samples["R"].items()}
    rows = []
    for n in np.unique(R["length"]).astype(int):
        sel = R["length"] == n
        if sel.sum() >= 5:
            rows.append([str(n), str(int(sel.sum())), _f(R["rm"][sel].mean()), _f(R["gold"][sel].mean())])
    return rows


def part_reward_model(s: dict, samples: dict | None) -> list[str]:
    d = s["diagnosis"]["reward_model"]
    lines = ["## (a) The reward model: what it pays for", ""]
    lines.append(f"- **Length slope holding gold fixed: {_f(d['rm_slope_per_token_holding_gold'], 3)} std units per token** "
                 f"(filler slope {_f(d['rm_slope_per_filler_holding_gold'], 3)} per filler token, gold slope "
                 f"{_f(d['rm_slope_per_gold'], 3)} per gold unit; least squares on {s['config']['eval']['n_prompts']} reference "
                 f"samples, R^2 {_f(d['fit_r2_on_reference'])}). " + length_slope_sentence(d["rm_slope_per_token_holding_gold"]))
    lines.append(f"- **Share of the RM gain explained by length: {_pct(d['share_of_rm_gain_from_length'])}** (RM gain "
                 f"{_f(d['rm_gain'])} std units for {_f(abs(d['length_gain']))} {'more' if d['length_gain'] >= 0 else 'fewer'} tokens; "
                 f"filler explains {_pct(d['share_of_rm_gain_from_filler'])}, gold {_pct(d['share_of_rm_gain_from_gold'])}). "
                 + length_share_sentence(d["share_of_rm_gain_from_length"], d["rm_gain"], d["length_gain"]))
    c = d.get("filler_curve")
    if c and c["k"]:
        peak, rm0 = c["rm_peak_k"], c["rm"][0]
        lines.append(f"- **Out of distribution: appending k filler tokens to {c['n']} reference answers moves the RM score by "
                     f"{_f(c['rm_gain_at_peak'], 3)} at its peak (k = {peak}) while gold changes by {_f(c['gold_change_at_peak'], 3)}**; "
                     f"the reference itself has {_f(c['ref_filler_mean'])} filler tokens on average (95th percentile "
                     f"{_f(c['ref_filler_p95'], 0)}, max {_f(c['ref_filler_max'], 0)}). " + filler_curve_sentence(c))
        rows = [[str(k), _f(f), _f(r - rm0, 3), _f(g, 3)] for k, f, r, g in zip(c["k"], c["filler"], c["rm"], c["gold"], strict=True)]
        lines += ["", md_table(["extra filler k", "mean filler", "RM score - RM at k=0", "gold"], rows)]
    if samples is not None:
        rows = length_buckets(samples)
        if rows:
            lines += ["", "Reference samples by length (the raw evidence behind the slope):", "",
                      md_table(["length", "n", "mean RM", "mean gold"], rows)]
    lines.append("")
    return lines


def part_ppo(s: dict) -> list[str]:
    d = s["diagnosis"]["ppo"]
    lines = ["## (b) PPO: where the advantages point", ""]
    lines.append(f"- **Correlation of per-sequence advantage with length: {_f(d['adv_length_corr_mean'])}; with filler count: "
                 f"{_f(d['adv_filler_corr_mean'])}** (mean over {s['config']['ppo']['iterations']} iterations). "
                 + advantage_sentence(d["adv_length_corr_mean"], d["adv_filler_corr_mean"]))
    lines.append(f"- **Share of positive-advantage tokens that are filler: {_pct(d['filler_share_of_positive_adv_tokens'])}** "
                 f"against {_pct(d['filler_share_of_tokens_ref'])} of the reference's tokens. "
                 + filler_credit_sentence(d["filler_share_of_positive_adv_tokens"], d["filler_share_of_tokens_ref"]))
    lines.append(f"- **Clip fraction: {_pct(d['clipfrac_mean'])} of tokens on average ({_pct(d['clipfrac_last'])} at the last "
                 "iteration)**. " + clip_sentence(d["clipfrac_mean"]))
    lines.append("")
    return lines


def penalty_lines(s: dict) -> list[str]:
    """Which KL penalty the run used, what its expected gradient is (kl.PENALTIES), and what it charged."""
    p, h, m = s["config"]["ppo"], s["history"], s["metrics"]
    pen = kl.penalty(p["kl_estimator"], p["kl_in"])
    # what the penalty's own estimator charged per sequence (older runs: its logged twin, where there is one)
    key = "kl/penalty" if "kl/penalty" in h[-1] else {"k1": "kl/k1", "k3": "kl/k3", "exact": "kl/exact"}.get(pen.estimator)
    where = {"reward": "per token inside the return", "loss": "as a term of the PPO loss",
             "both": "per position in the PPO loss and, for the later positions, inside the return"}[pen.placement]
    gradient = ("the gradient of the sequence KL(pi || ref), so beta trades RM score against the KL the run reports"
                if pen.gradient == "unbiased" else
                f"not the gradient of the sequence KL(pi || ref): it minimizes {pen.minimizes}")
    lines = [f"- **Penalty: {pen.estimator} {where} (ppo.kl_in={pen.placement}, ppo.kl_estimator={pen.estimator}); "
             f"its expected update is {pen.gradient}** (rlhf_sweep/maths/kl.py): {gradient}."]
    if key is None:
        return lines
    first, last = h[0][key], h[-1][key]
    ex_first, ex_last = h[0]["kl/exact"], h[-1]["kl/exact"]
    gap = last - ex_last
    lines.append(
        f"- **What it charged: {_f(first)} -> {_f(last)} nats per sequence by its own estimate (first to last iteration), "
        f"while the exact KL went {_f(ex_first)} -> {_f(ex_last)}; at beta {fmt(h[-1]['ppo/beta'])} that is "
        f"{_f(h[-1]['ppo/beta'] * last)} per sequence at the end; the held-out exact KL is {_f(m['kl/exact'])} nats.** "
        + (f"Its estimate ended {_f(abs(gap))} nats {'above' if gap > 0 else 'below'} the exact KL"
           + (f" (k1 and k3 are unbiased values of the KL: their expected gap is zero, so this one is the sampling error of "
              f"one rollout of {s['config']['ppo']['batch_size']} responses)." if pen.estimator in ("k1", "k3") else
              " (k2 is a biased value of KL)." if pen.estimator == "k2" else ".")
           if pen.estimator != "exact" else "It charged the exact KL itself, with no sampling noise.")
        + ("" if pen.gradient == "unbiased" else
           " The charge is a number; what moves the policy is its gradient, which here is not the sequence KL's: "
           "`rlhf-sweep sweep kl_placement` measures how much KL each such penalty lets through against reward+k1 at equal beta."))
    return lines


def part_kl(s: dict) -> list[str]:
    d, m = s["diagnosis"]["kl"], s["metrics"]
    g = kl_growth(s["history"])  # the same function the diagnosis uses, on the run's history
    lines = ["## (c) The KL term: what the penalty actually charges", "", *penalty_lines(s)]
    e, last = g["early"], g["last"]
    lines.append(f"- **Sequence KL = per-token KL x tokens: {_f(e['seq_kl'])} = {_f(e['per_token_kl'], 3)} x {_f(e['tokens_per_seq'])} "
                 f"at iteration {e['iteration']}, {_f(last['seq_kl'])} = {_f(last['per_token_kl'], 3)} x {_f(last['tokens_per_seq'])} "
                 f"at iteration {last['iteration']}; length accounts for {_pct(g['share_of_growth_from_length'])} of the growth "
                 f"between them (log scale)**. " + kl_growth_sentence(g["log_growth"], g["share_of_growth_from_length"]))
    added = g["share_of_final_kl_from_added_tokens"]
    lines.append(f"- **At the starting length ({_f(g['start_tokens'])} tokens with EOS) the final per-token KL would sum to "
                 f"{_f(g['kl_at_start_length'])} nats, not {_f(last['seq_kl'])}: {_pct(added)} of the final sequence KL is "
                 f"charged on tokens the policy {'added' if not math.isfinite(added) or added >= 0 else 'dropped (a negative share)'}.** "
                 + added_tokens_sentence(added))
    rows = [[str(r["iteration"]), _f(r["seq_kl"]), _f(r["per_token_kl"], 3), _f(r["tokens_per_seq"]), _f(r["len"])] for r in g["series"]]
    lines += ["", md_table(["iteration", "sequence KL", "per-token KL", "tokens/seq (incl. EOS)", "length"], rows), ""]
    lines.append(f"- **beta x KL = {_f(d['beta_times_kl'])} against an RM gain of {_f(d['rm_gain'])}** (beta {fmt(d['beta_final'])}, "
                 f"held-out KL {_f(m['kl/exact'])} nats/seq). "
                 + penalty_sentence(d["beta_times_kl"], d["rm_gain"], bool(s["observations"]["kl_increasing"]["value"])))
    lines.append(f"- **k1 is negative on {_pct(d['k1_negative_token_share'])} of sampled tokens, and its sequence mean is "
                 f"{_f(abs(d['k1_bias_vs_exact']), 3)} nats {'below' if d['k1_bias_vs_exact'] < 0 else 'above'} the exact KL** "
                 f"(per-sequence spread {_f(d['k1_seq_std'])} for k1 vs {_f(d['exact_seq_std'])} exact). "
                 + k1_sentence(d["k1_negative_token_share"], d["k1_bias_vs_exact"], d["k1_seq_std"], d["exact_seq_std"]))
    lines.append("")
    return lines


def kl_verdict_words(v: dict) -> str:
    """Verdict 3's evidence in words: the trend test's p and the growth it implies (older summaries: p only)."""
    if "growth" in v:
        return f"trend p = {v['p_value']:.2g}, growth {v['growth']:+.0%} over the tested iterations"
    return f"Mann-Kendall p = {v['p_value']:.2g}"


# ----- one sentence per number, following its sign and size --------------------------------------
def _ok(*xs: float) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def length_slope_sentence(slope: float) -> str:
    if not _ok(slope):
        return "The fit gives no length slope."
    if abs(slope) < TINY_SLOPE:
        return ("Among reference answers of equal gold, the RM barely tells longer from shorter ones (under "
                f"{TINY_SLOPE} std units per token): length is not what this RM pays for.")
    if slope > 0:
        return ("Among reference answers of equal gold, the RM scores the longer one higher: the labelers' length "
                "preference became part of the reward.")
    return ("Among reference answers of equal gold, the RM scores the shorter one higher: this RM penalises length, "
            "so length is not the channel of any gain it gives the policy.")


def length_share_sentence(share: float, rm_gain: float, length_gain: float) -> str:
    if not _ok(share, rm_gain) or rm_gain <= TINY_RM:
        return ("The RM does not score the policy above the reference here, so there is no RM gain for length to explain."
                if _ok(rm_gain) and rm_gain <= TINY_RM else "The share cannot be computed (no RM gain).")
    if share >= 1:
        return ("Length alone accounts for more than the whole gain, so the RM's preference for the policy is a "
                "preference for longer answers, not better ones.")
    if share >= 0.5:
        return "Length is the main channel of the RM's preference for the policy, not gold."
    if share >= TINY_SHARE:
        return "Length explains a minority of the RM gain here; the rest comes from what the RM rewards off the reference's distribution."
    if share > -TINY_SHARE:
        return "Length explains almost none of the RM gain here."
    return ("Length works against the RM gain here (the policy's length change lowers its RM score), so the gain comes "
            f"from elsewhere{'; the policy is shorter than the reference' if length_gain < 0 else ''}.")


def filler_curve_sentence(c: dict) -> str:
    peak, gain = c["rm_peak_k"], c["rm_gain_at_peak"]
    if peak == 0 or gain < TINY_RM:
        return "The RM does not pay for appended filler: its score is highest (or within noise of it) with none."
    falls = c["rm"][-1] < c["rm"][peak] - TINY_RM
    if peak > c["ref_filler_p95"]:
        return ("The RM keeps paying for filler well beyond anything it was trained on, which is the direction PPO follows."
                if not falls else "The RM pays for filler beyond the reference's range before it falls, so PPO can gain by padding past what it saw.")
    return ("The RM's reward for filler peaks within the reference's range and then falls, which bounds how much filler PPO adds."
            if falls else "The RM's reward for filler levels off within the reference's range.")


def advantage_sentence(len_corr: float, fill_corr: float) -> str:
    if not _ok(len_corr):
        return "No advantage statistics were recorded."
    what = ("longer, politer" if _ok(fill_corr) and fill_corr > TINY_CORR else "longer") if len_corr > 0 else (
        "shorter, plainer" if _ok(fill_corr) and fill_corr < -TINY_CORR else "shorter")
    if abs(len_corr) <= TINY_CORR:
        return "Advantages barely track length here, so PPO is not pushed toward longer or shorter answers."
    if len_corr > 0:
        return f"The {what} samples get positive advantages, so the policy gradient raises their probability every iteration."
    return f"The {what} samples get the positive advantages, so the policy gradient pushes toward shorter answers."


def filler_credit_sentence(pos_share: float, ref_share: float) -> str:
    if not _ok(pos_share, ref_share) or ref_share <= 0:
        return "There is no filler in the reference to compare with."
    ratio = pos_share / ref_share
    if ratio > 1 + TINY_SHARE:
        return "Filler is over-represented among the tokens PPO reinforces: the exploit is credited token by token."
    if ratio < 1 - TINY_SHARE:
        return "Filler is under-represented among reinforced tokens: PPO credits content, not padding."
    return "Filler is about as common among reinforced tokens as in the reference: PPO neither favours nor avoids it."


def clip_sentence(clipfrac: float) -> str:
    if not _ok(clipfrac):
        return ""
    if clipfrac < 0.2:
        return ("Clipping bounds the size of each step, not its direction: the few clipped tokens leave the surrogate "
                "free to keep moving probability toward what the advantages favour, one small step at a time.")
    return ("Clipping is active on a large share of tokens, so each update is cut short; it still does not change the "
            "direction the advantages point in, only how fast the policy follows them.")


def kl_growth_sentence(log_growth: float, share_from_length: float) -> str:
    if not _ok(log_growth) or log_growth <= 0.01:
        return "The sequence KL did not grow between these iterations."
    if not _ok(share_from_length) or share_from_length <= TINY_SHARE:
        return ("The growth is all per-token divergence: the responses did not get longer, so the sum over tokens added nothing."
                if _ok(share_from_length) and share_from_length <= 0 else
                "The growth is almost all per-token divergence; longer responses add little to it.")
    return ("The penalty is a sum over tokens, so every extra token adds to the sequence KL even at a constant "
            "per-token divergence.")


def added_tokens_sentence(added: float) -> str:
    if not _ok(added):
        return ""
    if added <= 0:
        return "The policy is not longer than at the start, so none of the KL comes from added tokens."
    if added < TINY_SHARE:
        return "Hardly any of the KL comes from the added length; it is per-token divergence."
    if added < 0.5:
        return ("The KL grows mostly because the policy moves further from the reference on every token; the added length "
                "multiplies that.")
    return "Most of the KL the penalty charges comes from the policy being longer, not from each token being stranger."


def penalty_sentence(beta_kl: float, rm_gain: float, kl_increasing: bool) -> str:
    if not _ok(beta_kl, rm_gain):
        return ""
    if rm_gain <= TINY_RM:
        return "The RM pays nothing for drifting here, so the penalty has nothing to hold back."
    if beta_kl < rm_gain:
        return ("The RM pays more for drifting than the penalty charges, so the optimum of reward - beta x KL lies far from "
                "the reference" + (" and the KL keeps growing." if kl_increasing else "; the KL has nonetheless stopped growing."))
    return "The penalty charges at least as much as the RM pays, which holds the policy near the reference."


def k1_sentence(neg_share: float, bias: float, k1_std: float, exact_std: float) -> str:
    if not _ok(neg_share, bias):
        return ""
    head = "The sampled penalty sees only the log-probabilities of the drawn tokens"
    pays = (": on those tokens it can even pay the policy for drifting" if neg_share >= 0.01 else
            ", but it is almost never negative here")
    if abs(bias) < TINY_NATS:
        size = "; on average it matches the exact KL"
    else:
        size = "; on average it under-charges the divergence" if bias < 0 else "; on average it over-charges the divergence"
    noisy = ", and it is a noisier charge than the exact KL." if _ok(k1_std, exact_std) and k1_std > exact_std else "."
    return head + pays + size + noisy


def explain(run_dir: str | Path) -> Path:
    """Write RUN_DIR/explain.md from summary.json (and samples.pt when present); returns its path."""
    run = Path(run_dir)
    path = layout.summary_path(run)
    try:
        s = layout.read_summary(path)
    except layout.SummaryError as e:
        raise ExplainError(str(e)) from None
    algo = s.get("config", {}).get("algo", "ppo")
    if algo != "ppo":
        raise ExplainError(f"{path} is an algo={algo} run; explain.md reads PPO's mechanisms (advantages, the KL penalty): "
                           "its summary.json holds the verdicts and the diagnosis that apply to it")
    if "diagnosis" not in s or "filler_curve" not in s["diagnosis"].get("reward_model", {}):
        raise ExplainError(f"{path} has no current diagnosis; rerun it with this version (rlhf-sweep run ...)")
    samples = None
    if layout.samples_path(run).exists():
        try:
            samples = layout.read_samples(run)
        except Exception as e:  # the summary still explains; only the recomputed numbers need the samples
            print(f"warning: {layout.samples_path(run)} is unreadable ({type(e).__name__}); explaining from summary.json alone",
                  file=sys.stderr)
            samples = None
    m, o = s["metrics"], s["observations"]
    head = [
        f"# Why: {run}",
        "",
        f"Seed {s['config']['seed']}, beta {s['config']['ppo']['beta']}, {s['config']['ppo']['iterations']} PPO iterations. "
        f"The observations: (1) RM win rate {_f(m['rm/win_rate'], 3)} ({'holds' if o['rm_prefers_policy']['value'] else 'does not hold'}); "
        f"(2) gold win rate {_f(m['gold/win_rate'], 3)}, length {_f(m['len/policy'])} vs {_f(m['len/ref'])} "
        f"({'holds' if o['humans_prefer_reference']['value'] else 'does not hold'}); (3) KL {_f(m['kl/exact'])} nats/seq, "
        f"{kl_verdict_words(o['kl_increasing'])} ({'holds' if o['kl_increasing']['value'] else 'does not hold'}).",
        "",
    ]
    text = "\n".join(head + part_reward_model(s, samples) + part_ppo(s) + part_kl(s))
    out = run / "explain.md"
    out.write_text(text)
    return out
