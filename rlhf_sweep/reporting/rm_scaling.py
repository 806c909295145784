"""Reward-model scaling (Gao et al. 2022): the report section of a study that searches `rm.n_layer`,
`rm.n_embd` or `rm.n_pairs`.

This module owns one row per RM (trial): its size, parameters (as the run's summary.json counted them),
data, held-out accuracy on labels and on gold order, Gao et al.'s RL form fitted to its PPO run and the
best-of-n form to its best-of-n curve (the `algo=bon` runs in the trial's own directory, which
`study.workers.run_trial` makes), the gold peaks (fitted, and PPO's observed one), and how each moves with RM
parameters and data size. The fits and peaks are rlhf_sweep.maths.gao's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_sweep.maths import gao
from rlhf_sweep.maths.stats import trend
from rlhf_sweep.reporting import world_plots
from rlhf_sweep.reporting.study_data import bon_baseline, bon_curve, rl_fit
from rlhf_sweep.run import layout
from rlhf_sweep.study.spec import trial_spec
from rlhf_sweep.utils.tables import fmt, md_table

SMOOTH = 9  # iterations in the centred moving average that locates a PPO run's empirical gold peak


def empirical_peak(history: pd.DataFrame, gold_ref: float) -> tuple[float, float]:
    """The PPO run's highest gold gain (centred moving average over SMOOTH iterations) and the KL where it happens."""
    gain = (history["gold"].astype(float) - gold_ref).rolling(SMOOTH, center=True, min_periods=1).mean()
    kl = history["kl/exact"].astype(float).rolling(SMOOTH, center=True, min_periods=1).mean()
    i = int(np.nanargmax(gain.to_numpy()))
    return float(gain.iloc[i]), float(kl.iloc[i])



def peak_columns(peak: gao.Peak) -> tuple[float, float, str, str]:
    """(gold gain at the fitted peak, KL there, its status, the table's KL cell): the gain and KL are numbers only
    for a peak the data identify inside the reached d (gao.Peak), NaN otherwise, so that neither the trends nor
    the figures use a peak the data do not support."""
    if not peak.inside:
        return math.nan, math.nan, peak.status, peak.kl_text()
    return peak.gain, peak.kl, peak.status, peak.kl_text()


def rm_params(runs: pd.DataFrame) -> int | None:
    """The RM's parameters as its first run's summary.json recorded them; None where the summary predates them."""
    n = runs["rm.params"].iloc[0] if "rm.params" in runs else None
    return int(n) if n is not None and pd.notna(n) else None


def params_range(params: pd.Series) -> str:
    """The smallest and largest RM parameter counts and their ratio, over the RMs whose runs recorded them."""
    known = params.dropna().astype(int)
    if not len(known):
        return "parameters n/a"
    return f"{known.min():,} to {known.max():,} parameters, {known.max() / known.min():.0f}x"


def params_cell(n) -> int | str:
    return int(n) if pd.notna(n) else "n/a"


def scaling_table(data, runs: pd.DataFrame, say=print) -> tuple[pd.DataFrame, list[dict]]:
    """One row per RM (trial): size, data, accuracy, the RL fit to its PPO run, the best-of-n fit, the gold peaks."""
    spec, df = data.spec, data.trials
    rows, curves = [], []
    for _, t in df.sort_values("number").iterrows():
        n = int(t["number"])
        mine = runs[runs["trial"] == n]
        if not len(mine) or n not in data.histories:
            continue
        params = {p.name: (t[p.name].item() if isinstance(t[p.name], np.generic) else t[p.name]) for p in spec.space}
        h = data.histories[n]
        fit = rl_fit(h, float(t["gold_ref"]))
        d_rl = float(np.sqrt(np.nanmax(h["kl/exact"].to_numpy(dtype=float))))
        rl_gain, rl_kl, rl_status, rl_text = peak_columns(fit.peak(d_rl))
        emp_gain, emp_kl = empirical_peak(h, float(t["gold_ref"]))
        one = trial_spec(spec, params)
        trial_dir = layout.trial_dir(data.out_dir, n)  # its RM's best-of-n runs (study.workers.run_trial) sit beside its seeds
        bon, missing = bon_baseline(trial_dir, one)
        if bon is None:  # the RM's PPO side still counts; its best-of-n columns stay empty until `sweep` runs it again
            say(f"trial {n}: {missing}; its best-of-n columns are n/a")
            d_bon = bon_gains = bon_fit = None
            bon_gain = bon_kl = bon_a = bon_b = bon_r2 = bon_256 = math.nan
            bon_status, bon_text = "", "n/a"
        else:
            curve = bon_curve(bon)
            d_bon, bon_gains, bon_fit = curve["d"], curve["gold_gain"], curve["fit"]
            bon_gain, bon_kl, bon_status, bon_text = peak_columns(bon_fit.peak(float(d_bon.max())))
            bon_a, bon_b, bon_r2, bon_256 = bon_fit.a, bon_fit.b, bon_fit.r2, float(bon_gains[-1])
        label = f"{int(mine['rm.n_layer'].iloc[0])} x {int(mine['rm.n_embd'].iloc[0])}"
        rows.append({"trial": n, "size": label, "n_layer": int(mine["rm.n_layer"].iloc[0]), "n_embd": int(mine["rm.n_embd"].iloc[0]),
                     "params": rm_params(mine), "n_pairs": int(mine["rm.n_pairs"].iloc[0]), "seeds": len(mine),
                     "acc_labels": float(mine["rm/acc_labels"].mean()), "acc_gold": float(mine["rm/acc_gold"].mean()),
                     "rl_a": fit.a, "rl_b": fit.b, "rl_r2": fit.r2, "rl_peak_gain": rl_gain, "rl_peak_kl": rl_kl, "rl_peak_status": rl_status,
                     "rl_peak_text": rl_text,
                     "emp_peak_gain": emp_gain, "emp_peak_kl": emp_kl, "kl_final": float(mine["kl/exact"].mean()),
                     "gold_final": float(mine["d_gold"].mean()),
                     "bon_a": bon_a, "bon_b": bon_b, "bon_r2": bon_r2, "bon_peak_gain": bon_gain, "bon_peak_kl": bon_kl,
                     "bon_peak_status": bon_status, "bon_peak_text": bon_text, "bon_gain_256": bon_256})
        d = gao.sqrt_kl(h["kl/exact"].to_numpy(dtype=float))
        curves.append({"label": f"{label}, {rows[-1]['n_pairs']} pairs", "d": d, "gain": h["gold"].to_numpy(dtype=float) - float(t["gold_ref"]),
                       "fit": fit, "bon_d": d_bon, "bon_gain": bon_gains, "bon_fit": bon_fit})
    table = pd.DataFrame(rows)
    if len(table):  # counts from runs that predate them are None: a numeric column either way (NaN there)
        table["params"] = pd.to_numeric(table["params"])
    return table, curves


SCALING_QUANTITIES = {
    "acc_labels": "RM accuracy on held-out labels",
    "acc_gold": "RM accuracy on held-out gold order",
    "rl_a": "RL fit a",
    "rl_b": "RL fit b",
    "rl_peak_gain": "RL fitted peak Δgold",
    "rl_peak_kl": "RL fitted peak KL",
    "emp_peak_gain": "PPO highest Δgold (observed)",
    "emp_peak_kl": "KL at PPO's highest Δgold (observed)",
    "bon_a": "best-of-n fit a",
    "bon_b": "best-of-n fit b",
    "bon_peak_gain": "best-of-n fitted peak Δgold",
    "bon_gain_256": "best-of-256 Δgold (observed)",
}
# What Gao et al. 2022 report as the RM grows or sees more comparisons (their Figs. 1-3, 6): better accuracy, a higher
# gold peak reached at a larger KL; the coefficients change smoothly (roughly logarithmically) with RM size.
GAO_EXPECTS = {"acc_labels": +1, "acc_gold": +1, "rl_peak_gain": +1, "emp_peak_gain": +1, "emp_peak_kl": +1, "rl_peak_kl": +1,
               "bon_peak_gain": +1, "bon_gain_256": +1}


def scaling_trends(table: pd.DataFrame) -> pd.DataFrame:
    """Each quantity against RM parameters and against data size (log10), over all RMs of the study."""
    rows = []
    for key, label in SCALING_QUANTITIES.items():
        for axis, col in (("RM parameters", "params"), ("labeled pairs", "n_pairs")):
            tr = trend(table[col].to_numpy(), table[key].to_numpy())
            expect = GAO_EXPECTS.get(key)
            direction = "n/a" if not math.isfinite(tr["rho"]) else ("up" if tr["rho"] > 0 else "down")
            significant = math.isfinite(tr["p"]) and tr["p"] < 0.05
            if expect is None or direction == "n/a":
                verdict = "no stated expectation" if expect is None else "n/a"
            elif not significant:
                verdict = "no clear trend (p >= 0.05)"
            else:
                verdict = "matches" if (tr["rho"] > 0) == (expect > 0) else "opposite"
            rows.append({"quantity": label, "key": key, "against": axis, **tr, "direction": direction, "gao": verdict})
    return pd.DataFrame(rows)


def scaling_rows(t: pd.DataFrame) -> list[list]:
    """The scaling table's rows: a fitted peak's gain is printed only where it is identified inside (a blank
    otherwise), its KL cell is gao.Peak.kl_text (the KL and its interval, or the status words)."""
    def gain(v: float) -> float | str:
        return v if math.isfinite(v) else ""

    return [[r["size"], params_cell(r["params"]), r["n_pairs"], r["acc_labels"], r["acc_gold"], r["rl_a"], r["rl_b"],
             r["rl_r2"], gain(r["rl_peak_gain"]), r["rl_peak_text"], r["emp_peak_gain"], r["emp_peak_kl"], r["bon_a"],
             r["bon_b"], r["bon_r2"], gain(r["bon_peak_gain"]), r["bon_peak_text"]] for _, r in t.iterrows()]


def identified_sentence(table: pd.DataFrame) -> str:
    """How many RMs' fits identify a peak inside the reached KL, for PPO and for best-of-n: follows the table."""
    def count(col: str) -> str:
        known = table[col][table[col] != ""]
        return f"{int((known == gao.INSIDE).sum())} of {len(known)}"

    return (f"Fitted peaks identified inside the reached KL: RL {count('rl_peak_status')}, best-of-n "
            f"{count('bon_peak_status')} (the others print their status instead of a number).")


def scaling_section(data, runs: pd.DataFrame, out_dir: Path, title: str, say=print) -> tuple[list[str], dict[str, str]]:
    table, curves = scaling_table(data, runs, say)
    if not len(table):
        return ["## RM scaling", "", "_no complete trial with a history_", ""], {}
    trends = scaling_trends(table)
    beta = runs["ppo.beta"].iloc[0]
    md = ["## Reward-model scaling (Gao et al. 2022)", "",
          f"{len(table)} reward models: sizes {', '.join(sorted(table['size'].unique(), key=lambda s: table.loc[table['size'] == s, 'params'].iloc[0]))} "
          f"(layers x width; {params_range(table['params'])}) x "
          f"{', '.join(map(str, sorted(table['n_pairs'].unique())))} labeled pairs. Each RM of another size than the policy starts "
          "from an SFT model of its own size trained on the same demonstrations; the pairs always come from the policy's reference. "
          f"Each RM is optimized by PPO at beta {fmt(beta)} (the policy and its reference stay the default size) and by best-of-n "
          "over 256 reference samples per prompt. Gao et al.'s forms against d = √KL: RL d(a − b ln d) on the PPO run's "
          "per-iteration gold gain, best-of-n d(a − b d) on the best-of-n curve; peaks from the fits, printed (KL with its "
          f"{gao.CONFIDENCE:.0%} interval, and the gain there) only where the data identify one inside the KL reached: R² at least "
          f"{gao.R2_FLOOR:g}, b's interval above 0 and the peak's interval below the largest KL reached; otherwise "
          "\"beyond the reached KL\" (the peak's interval lies past it) or \"not identified\". For PPO also the observed "
          f"highest gold gain (moving average over {SMOOTH} iterations). The trends and figures use the identified peaks only.", ""]
    heads = ["RM", "params", "pairs", "acc labels", "acc gold", "RL a", "RL b", "RL R²", "RL peak Δgold", "RL peak KL",
             "PPO max Δgold", "KL there", "BoN a", "BoN b", "BoN R²", "BoN peak Δgold", "BoN peak KL"]
    t = table.sort_values(["params", "n_pairs"])
    md += [md_table(heads, scaling_rows(t)), "", identified_sentence(table), ""]
    unknown = table[table["params"].isna()]
    if len(unknown):
        which = ", ".join(f"trial {r.trial} ({r.size}, {r.n_pairs} pairs)" for r in unknown.itertuples())
        md += [f"RM parameters n/a for {which}: the summary.json of its runs predates `models.rm_params`, which runs "
               "of this version record.", ""]
    md += [f"Trends over the {len(table)} RMs (the grid is balanced, so each axis is read across the other): Spearman's rho "
           "against log10 of RM parameters and of labeled pairs, the least-squares slope per decade with its 95% interval, "
           "and how the direction compares with Gao et al. (a higher gold peak at a larger KL, and better accuracy, for "
           "larger RMs and more data; coefficients that change smoothly with log size).", ""]
    md += [md_table(["quantity", "against", "n", "rho", "p", "slope per decade [95% CI]", "direction", "vs Gao et al."],
                    [[r["quantity"], r["against"], r["n"], r["rho"], r["p"], f"{r['slope']:+.3g} [{r['lo']:+.3g}, {r['hi']:+.3g}]",
                      r["direction"], r["gao"]] for _, r in trends.iterrows()]), ""]
    files = {"rm_scaling_params": world_plots.rm_scaling(table, "params", out_dir / "rm_scaling_params.png", title=title),
             "rm_scaling_data": world_plots.rm_scaling(table, "n_pairs", out_dir / "rm_scaling_data.png", title=title),
             "rm_scaling_curves": world_plots.rm_scaling_curves(curves, out_dir / "rm_scaling_curves.png", title=title)}
    md += ["**Figures**: `rm_scaling_params.png` and `rm_scaling_data.png`: the fitted coefficients, the gold peaks "
           "(fitted and observed) and the RM's held-out accuracies against RM parameters (one line per data size) and against "
           "labeled pairs (one line per RM size); `rm_scaling_curves.png`: every RM's PPO gold gain against d with its RL fit, "
           "and its best-of-n curve with its fit.", "",
           "![RM scaling: parameters](rm_scaling_params.png)", "", "![RM scaling: data](rm_scaling_data.png)", "",
           "![RM scaling: curves](rm_scaling_curves.png)", ""]
    return md, files
