"""`rlhf-sweep explain RUN_DIR`: the three observations tied to their mechanisms, in words and numbers.

This module owns `explain.md`. It reads a run's `summary.json` (the diagnosis that
`evaluate.diagnose` computed during the run) and `samples.pt` (the raw held-out numbers
behind it) and writes three parts, each number with one sentence that reads it:
(a) the reward model, (b) PPO, (c) the KL term.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .evaluate import kl_growth
from .tables import fmt, md_table


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
                 f"samples, R^2 {_f(d['fit_r2_on_reference'])}). Among reference answers of equal gold, the RM scores the longer "
                 "one higher: the labelers' length preference became part of the reward.")
    share = d["share_of_rm_gain_from_length"]
    lines.append(f"- **Share of the RM gain explained by length: {_pct(share)}** (RM gain {_f(d['rm_gain'])} std units for "
                 f"{_f(d['length_gain'])} more tokens; filler explains {_pct(d['share_of_rm_gain_from_filler'])}, gold "
                 f"{_pct(d['share_of_rm_gain_from_gold'])}). "
                 + ("Length alone accounts for more than the whole gain, so the RM's preference for the policy is a "
                    "preference for longer answers, not better ones." if math.isfinite(share) and share >= 1 else
                    "Length is the main channel of the RM's preference for the policy, not gold." if math.isfinite(share) and share >= 0.5 else
                    "Length explains a minority of the RM gain here; the rest comes from what the RM rewards off the reference's distribution."))
    c = d.get("filler_curve")
    if c and c["k"]:
        peak, rm0 = c["rm_peak_k"], c["rm"][0]
        lines.append(f"- **Out of distribution: appending k filler tokens to {c['n']} reference answers moves the RM score by "
                     f"{_f(c['rm_gain_at_peak'], 3)} at its peak (k = {peak}) while gold changes by {_f(c['gold_change_at_peak'], 3)}**; "
                     f"the reference itself has {_f(c['ref_filler_mean'])} filler tokens on average (95th percentile "
                     f"{_f(c['ref_filler_p95'], 0)}, max {_f(c['ref_filler_max'], 0)}). "
                     + ("The RM keeps paying for filler well beyond anything it was trained on, which is the direction PPO follows."
                        if peak > c["ref_filler_p95"] else
                        "The RM's reward for filler peaks within the reference's range and then falls, which bounds how much filler PPO adds."))
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
                 + ("Longer, politer samples get positive advantages, so the policy gradient raises their probability every iteration."
                    if d["adv_length_corr_mean"] > 0.05 else
                    "Advantages barely track length here, so PPO is not pushed toward longer answers."))
    lines.append(f"- **Share of positive-advantage tokens that are filler: {_pct(d['filler_share_of_positive_adv_tokens'])}** "
                 f"against {_pct(d['filler_share_of_tokens_ref'])} of the reference's tokens. "
                 + ("Filler is over-represented among the tokens PPO reinforces: the exploit is credited token by token."
                    if d["filler_share_of_positive_adv_tokens"] > d["filler_share_of_tokens_ref"] else
                    "Filler is not over-represented among reinforced tokens."))
    lines.append(f"- **Clip fraction: {_pct(d['clipfrac_mean'])} of tokens on average ({_pct(d['clipfrac_last'])} at the last "
                 "iteration)**. Clipping bounds the size of each step, not its direction: the few clipped tokens leave the "
                 "surrogate free to keep moving probability toward what the advantages favour, one small step at a time.")
    lines.append("")
    return lines


def part_kl(s: dict) -> list[str]:
    d, m = s["diagnosis"]["kl"], s["metrics"]
    g = kl_growth(s["history"])  # the same function the diagnosis uses, on the run's history
    lines = ["## (c) The KL term: what the penalty actually charges", ""]
    e, last = g["early"], g["last"]
    lines.append(f"- **Sequence KL = per-token KL x tokens: {_f(e['seq_kl'])} = {_f(e['per_token_kl'], 3)} x {_f(e['tokens_per_seq'])} "
                 f"at iteration {e['iteration']}, {_f(last['seq_kl'])} = {_f(last['per_token_kl'], 3)} x {_f(last['tokens_per_seq'])} "
                 f"at iteration {last['iteration']}; length accounts for {_pct(g['share_of_growth_from_length'])} of the growth "
                 f"between them (log scale)**. The penalty is a sum over tokens, so every extra token adds to the sequence KL "
                 "even at a constant per-token divergence.")
    lines.append(f"- **At the starting length ({_f(g['start_tokens'])} tokens with EOS) the final per-token KL would sum to "
                 f"{_f(g['kl_at_start_length'])} nats, not {_f(last['seq_kl'])}: {_pct(g['share_of_final_kl_from_added_tokens'])} "
                 "of the final sequence KL is charged on tokens the policy added.** "
                 + ("The KL grows mostly because the policy moves further from the reference on every token; the added length "
                    "multiplies that." if g["share_of_final_kl_from_added_tokens"] < 0.5 else
                    "Most of the KL the penalty charges comes from the policy being longer, not from each token being stranger."))
    rows = [[str(r["iteration"]), _f(r["seq_kl"]), _f(r["per_token_kl"], 3), _f(r["tokens_per_seq"]), _f(r["len"])] for r in g["series"]]
    lines += ["", md_table(["iteration", "sequence KL", "per-token KL", "tokens/seq (incl. EOS)", "length"], rows), ""]
    lines.append(f"- **beta x KL = {_f(d['beta_times_kl'])} against an RM gain of {_f(d['rm_gain'])}** (beta {fmt(d['beta_final'])}, "
                 f"held-out KL {_f(m['kl/exact'])} nats/seq). "
                 + ("The RM pays more for drifting than the penalty charges, so the optimum of reward - beta x KL lies far from "
                    "the reference and the KL keeps growing." if d["beta_times_kl"] < d["rm_gain"] else
                    "The penalty charges at least as much as the RM pays, which holds the policy near the reference."))
    lines.append(f"- **k1 is negative on {_pct(d['k1_negative_token_share'])} of sampled tokens, and its sequence mean is "
                 f"{_f(d['k1_bias_vs_exact'], 3)} nats off the exact KL** (per-sequence spread {_f(d['k1_seq_std'])} for k1 vs "
                 f"{_f(d['exact_seq_std'])} exact). The sampled penalty sees only the log-probabilities of the drawn tokens: on "
                 "those tokens it can even pay the policy for drifting, and it is a noisy charge on the divergence it stands for.")
    lines.append("")
    return lines


def explain(run_dir: str | Path) -> Path:
    """Write RUN_DIR/explain.md from summary.json (and samples.pt when present); returns its path."""
    run = Path(run_dir)
    path = run / "summary.json"
    if not path.exists():
        raise ExplainError(f"{path} not found; give the directory of a finished run (rlhf-sweep run prints it)")
    s = json.loads(path.read_text())
    algo = s.get("config", {}).get("algo", "ppo")
    if algo != "ppo":
        raise ExplainError(f"{path} is an algo={algo} run; explain.md reads PPO's mechanisms (advantages, the KL penalty): "
                           "its summary.json holds the verdicts and the diagnosis that apply to it")
    if "diagnosis" not in s or "filler_curve" not in s["diagnosis"].get("reward_model", {}):
        raise ExplainError(f"{path} has no current diagnosis; rerun it with this version (rlhf-sweep run ...)")
    samples = None
    if (run / "samples.pt").exists():
        import torch

        samples = torch.load(run / "samples.pt", weights_only=False)
    m, o = s["metrics"], s["observations"]
    head = [
        f"# Why: {run}",
        "",
        f"Seed {s['config']['seed']}, beta {s['config']['ppo']['beta']}, {s['config']['ppo']['iterations']} PPO iterations. "
        f"The observations: (1) RM win rate {_f(m['rm/win_rate'], 3)} ({'holds' if o['rm_prefers_policy']['value'] else 'does not hold'}); "
        f"(2) gold win rate {_f(m['gold/win_rate'], 3)}, length {_f(m['len/policy'])} vs {_f(m['len/ref'])} "
        f"({'holds' if o['humans_prefer_reference']['value'] else 'does not hold'}); (3) KL {_f(m['kl/exact'])} nats/seq, "
        f"Mann-Kendall p = {o['kl_increasing']['p_value']:.2g} ({'holds' if o['kl_increasing']['value'] else 'does not hold'}).",
        "",
    ]
    text = "\n".join(head + part_reward_model(s, samples) + part_ppo(s) + part_kl(s))
    out = run / "explain.md"
    out.write_text(text)
    return out
