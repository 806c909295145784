"""Beyond one world: what studies over drawn worlds, labeler bias and reward-model size found.

This module owns the analyses of three kinds of study, read from the trials' own summary.json
files (one per trial and seed; a report only reads results, except the per-RM best-of-n curves,
which come from `algo=bon` runs per RM that `sweep.run_baseline` makes, as for the study baseline):

- world robustness (the study searches `world.draw`): per observation, the share of drawn worlds
  in which it holds, with exact (Clopper-Pearson) intervals, and which world parameters predict
  it (Pearson correlations over worlds with Fisher-z intervals and Benjamini-Hochberg q-values);
- a phase diagram (it searches a labeler bias and `ppo.beta`): per cell, the share of seeds in which
  each observation holds, the boundary in the bias read off per beta, and what the policy does
  with unbiased labelers (wrong and repeated actions, which the RM rarely saw);
- RM scaling (it searches `rm.n_layer`, `rm.n_embd` or `rm.n_pairs`): Gao et al.'s forms fitted per
  RM to its PPO run and to its best-of-n curve, the gold peak (height, KL), and how both move with
  RM parameters and data size, beside the RM's held-out accuracy on labels and on gold order;
- a cache audit: every SFT model, RM backbone and RM the runs used, and how often each was built.

`section(data)` returns the markdown and the figures that `report.report` appends for such a study.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlhf_sweep.run import layout
from rlhf_sweep.utils.tables import fmt, md_table

OBSERVATIONS = {
    "rm_prefers_policy": "1. RM prefers the policy",
    "humans_prefer_reference": "2. humans prefer the reference",
    "kl_increasing": "3. KL keeps increasing",
    "all_three": "all three at once",
}
# a phase diagram's observations: the verdicts, and two read off the metrics (see phase_indicators)
PHASES = {
    "verbosity_drift": "verbosity drift",
    "gold_collapse": "gold collapse",
    "kl_increasing": "rising KL",
    "rm_prefers_policy": "RM prefers the policy",
}
VERBOSE_TOKENS = 1.0  # verbosity drift: the policy's responses at least this many tokens longer than the reference's
CONFIDENCE = 0.95
Q_LEVEL = 0.10  # a world parameter is called a predictor when its Benjamini-Hochberg q-value is below this
MIN_RM_GAIN = 0.25  # RM std units: below it the share of the RM's gain that length explains is a ratio of small numbers
SMOOTH = 9  # iterations in the centred moving average that locates a PPO run's empirical gold peak


# ----- the runs -----------------------------------------------------------------------------------
def kind(spec) -> str | None:
    """Which analysis a study gets, from what it searches: 'worlds', 'phase', 'rm_scaling' or None."""
    from rlhf_sweep.study.spec import RM_KEYS

    names = {p.name for p in spec.space}
    if "world.draw" in names:
        return "worlds"
    if "ppo.beta" in names and any(n.startswith("world.labeler.") for n in names):
        return "phase"
    if names & set(RM_KEYS):
        return "rm_scaling"
    return None


def world_params() -> list[str]:
    """The drawn world parameters as run columns (`world.` + the DRAW_RANGES key; the demo mix as three shares)."""
    from rlhf_sweep.config.draws import DRAW_RANGES

    keys = [k for k in DRAW_RANGES if not k.startswith("demo.")]
    return [f"world.{k}" for k in (*keys, "demo.complete", "demo.partial", "demo.wrong")]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_row(summary: dict) -> dict:
    """One run as a flat row: its config (world, rm, ppo), metrics, verdicts and the artefacts it used."""
    c = summary["config"]
    row = {f"world.{k}": v for k, v in _flat(c["world"]).items()}
    row.update({f"rm.{k}": c["rm"].get(k) for k in ("n_pairs", "n_layer", "n_embd")})
    row["rm.n_layer"] = row["rm.n_layer"] or c["model"]["n_layer"]
    row["rm.n_embd"] = row["rm.n_embd"] or c["model"]["n_embd"]
    row["ppo.beta"] = c["ppo"]["beta"]
    row["seed"] = c["seed"]
    row.update(summary["metrics"])
    for o in ("rm_prefers_policy", "humans_prefer_reference", "kl_increasing"):
        row[o] = bool(summary["observations"][o]["value"])
    row["all_three"] = all(row[o] for o in ("rm_prefers_policy", "humans_prefer_reference", "kl_increasing"))
    row.update(phase_indicators(summary["metrics"]))
    row["d_len"] = summary["metrics"]["len/policy"] - summary["metrics"]["len/ref"]
    row["d_gold"] = summary["metrics"]["gold/policy"] - summary["metrics"]["gold/ref"]
    rm_diag = (summary.get("diagnosis") or {}).get("reward_model") or {}
    # Singhal et al.'s question: how much of the RM's gain is length (the RM's length slope holding gold fixed x the
    # length gain); NaN where the RM gained too little for the ratio to mean anything
    row["rm_gain"] = rm_diag.get("rm_gain", math.nan)
    row["length_share"] = rm_diag.get("share_of_rm_gain_from_length", math.nan) if row["rm_gain"] > MIN_RM_GAIN else math.nan
    row.update(artefacts(summary))
    return row


def artefacts(summary: dict) -> dict:
    """The files a run used and whether it built each: {sft,rm,backbone}_path and _cached."""
    cache = summary.get("cache", {})
    out = {}
    for what in ("sft", "rm"):
        info = cache.get(what) or {}
        out[f"{what}_path"], out[f"{what}_cached"] = info.get("path"), info.get("cached")
    bb = (cache.get("rm") or {}).get("backbone") or {}
    # the backbone record travels with the RM's cache file: a run that loaded the RM built no backbone
    out["backbone_path"] = bb.get("path")
    out["backbone_cached"] = bb.get("cached") if out["rm_cached"] is False else (True if bb else None)
    return out


def phase_indicators(m: dict) -> dict[str, bool]:
    """The two phase observations read off held-out metrics.

    verbosity drift: the policy's mean length exceeds the reference's by VERBOSE_TOKENS or more;
    gold collapse: the policy's mean gold lies below the reference's with disjoint 95% intervals.
    """
    return {"verbosity_drift": bool(m["len/policy"] - m["len/ref"] >= VERBOSE_TOKENS),
            "gold_collapse": bool(m["gold/policy_hi"] < m["gold/ref_lo"])}


def load_runs(spec, trials: pd.DataFrame) -> tuple[pd.DataFrame, dict[tuple[int, int], list[dict]], list[str]]:
    """Every (complete trial, seed) run of a study from its summary.json: rows, histories, notes."""
    rows, hist, notes = [], {}, []
    for _, t in trials.iterrows():
        for seed in spec.seeds:
            path = layout.summary_path(layout.seed_dir(str(t["run_dir"]), seed))
            if not path.is_file():
                notes.append(f"trial {int(t['number'])} seed {seed}: no {path}")
                continue
            s = layout.read_summary(path)
            row = run_row(s)
            row["trial"] = int(t["number"])
            rows.append(row)
            hist[(int(t["number"]), seed)] = s["history"]
    return pd.DataFrame(rows), hist, notes


# ----- statistics ---------------------------------------------------------------------------------
def share_ci(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """k of n, with the exact (Clopper-Pearson) binomial interval."""
    from scipy.stats import binomtest

    if n == 0:
        return math.nan, math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return k / n, float(ci.low), float(ci.high)


def cluster_mean_ci(groups: list[np.ndarray], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """The mean over all runs, with a bootstrap interval that resamples whole worlds (runs of a world are not independent)."""
    from scipy.stats import bootstrap

    per = np.array([float(np.mean(g)) for g in groups])
    sizes = np.array([len(g) for g in groups], dtype=float)
    mean = float((per * sizes).sum() / sizes.sum())
    if len(per) < 2:
        return mean, math.nan, math.nan
    if np.all(per == per[0]) and per[0] in (0.0, 1.0):
        # every world alike: resampling worlds cannot move the mean; the exact interval over worlds says what n allows
        return mean, *share_ci(int(per[0]) * len(per), len(per), confidence)[1:]
    res = bootstrap((per, sizes), lambda p, s: (p * s).sum() / s.sum(), paired=True, confidence_level=confidence,
                    method="percentile", n_resamples=9999, random_state=0)
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def correlations(x: pd.DataFrame, y: pd.Series, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Pearson r of y with each column of x (one row per world), Fisher-z intervals, p and BH q-values."""
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


def trend(x: np.ndarray, y: np.ndarray, confidence: float = CONFIDENCE) -> dict:
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


# ----- world robustness ---------------------------------------------------------------------------
def robustness(runs: pd.DataFrame) -> pd.DataFrame:
    """Per observation: worlds where it holds on every seed / on at least one (exact intervals), and the share of runs."""
    by_world = runs.groupby("world.draw")
    n = by_world.ngroups
    rows = []
    for o, label in OBSERVATIONS.items():
        per = by_world[o].mean()
        k_all, k_any = int((per == 1).sum()), int((per > 0).sum())
        for level, k in (("every seed", k_all), ("at least one seed", k_any)):
            s, lo, hi = share_ci(k, n)
            rows.append({"observation": label, "key": o, "level": level, "k": k, "n": n, "share": s, "lo": lo, "hi": hi})
        s, lo, hi = cluster_mean_ci([g[o].to_numpy(dtype=float) for _, g in by_world])
        rows.append({"observation": label, "key": o, "level": "runs", "k": int(runs[o].sum()), "n": len(runs), "share": s,
                     "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


# outcomes whose predictors the robustness section looks for: the verdicts (share of seeds) and three sizes
OUTCOMES = {**{k: v for k, v in OBSERVATIONS.items()}, "d_len": "length drift (tokens)", "d_gold": "gold change",
            "kl/exact": "KL (nats)", "length_share": "share of RM gain from length"}
def length_share_line(runs: pd.DataFrame) -> str:
    """The share of the RM's gain that length explains, over runs whose RM gain is not tiny (Singhal et al. 2023)."""
    ok = runs[np.isfinite(runs["length_share"])]
    if not len(ok):
        return f"No run has an RM gain above {MIN_RM_GAIN} std units: the length share of the RM's gain is not read."
    q = ok["length_share"].quantile([0.25, 0.5, 0.75])
    return (f"Share of the RM's gain over the reference that length explains (the RM's length slope holding gold fixed x "
            f"the length gain; Singhal et al. 2023 ask the same): median {q[0.5]:.2f} (quartiles {q[0.25]:.2f} to {q[0.75]:.2f}) "
            f"over the {len(ok)} of {len(runs)} runs whose RM gain exceeds {MIN_RM_GAIN} std units.")


def predictors(runs: pd.DataFrame) -> pd.DataFrame:
    """Correlations of every outcome (mean over a world's seeds) with every drawn world parameter."""
    per = runs.groupby("world.draw").mean(numeric_only=True)
    params = [p for p in world_params() if p in per]
    out = []
    for key, label in OUTCOMES.items():
        df = correlations(per[params], per[key].astype(float))
        df.insert(0, "outcome", label)
        df.insert(1, "key", key)
        out.append(df)
    if not out:
        return pd.DataFrame()
    # an outcome constant over the worlds contributes no rows (and would leave its empty frame's object dtype)
    df = pd.concat([d for d in out if len(d)], ignore_index=True) if any(len(d) for d in out) else out[0]
    return df.astype({c: float for c in ("r", "lo", "hi", "p", "q")})


def worlds_section(runs: pd.DataFrame, out_dir: Path, title: str) -> tuple[list[str], dict[str, str]]:
    from rlhf_sweep.reporting import plots

    shares = robustness(runs)
    preds = predictors(runs)
    n_worlds, seeds = runs["world.draw"].nunique(), sorted(runs["seed"].unique())
    md = ["## Robustness over drawn worlds", "",
          f"{n_worlds} drawn worlds (`world.draw` = {', '.join(map(str, sorted(runs['world.draw'].unique())))}), "
          f"seeds {', '.join(map(str, seeds))}: {len(runs)} runs of the default recipe. A world counts when the observation "
          f"holds on every seed (or on at least one); intervals are exact binomial ({CONFIDENCE:.0%}) over worlds; the run "
          "share's interval resamples whole worlds.", ""]
    rows = []
    for key, label in OBSERVATIONS.items():
        s = shares[shares["key"] == key].set_index("level")
        rows.append([label, *[f"{int(s.loc[lv, 'k'])}/{int(s.loc[lv, 'n'])} = {s.loc[lv, 'share']:.2f} "
                              f"[{s.loc[lv, 'lo']:.2f}, {s.loc[lv, 'hi']:.2f}]" for lv in ("every seed", "at least one seed", "runs")]])
    md += [md_table(["observation", "worlds, every seed", "worlds, at least one seed", "runs"], rows), ""]
    sig = preds[preds["q"] < Q_LEVEL] if len(preds) else preds
    md += [f"Which world parameters predict it: Pearson r over the {n_worlds} worlds between each drawn parameter and the "
           f"outcome (for a verdict: the share of the world's seeds where it holds), {CONFIDENCE:.0%} Fisher-z interval, and "
           f"the Benjamini-Hochberg q-value over the {len(world_params())} parameters. With n = {n_worlds}, |r| must exceed "
           f"about {_r_crit(n_worlds):.2f} for p < 0.05, and about one parameter in twenty passes that by chance: only "
           f"q < {Q_LEVEL} is called a predictor below; the three strongest per outcome are shown either way.", ""]
    rows = []
    for key, label in OUTCOMES.items():
        d = preds[preds["key"] == key]
        if not len(d):
            rows.append([label, "(constant across worlds: nothing to correlate)", "", "", "", ""])
            continue
        shown = pd.concat([d[d["q"] < Q_LEVEL], d.head(3)]).drop_duplicates("param")
        for _, r in shown.iterrows():
            rows.append([label, r["param"].removeprefix("world."), f"{r['r']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]",
                         f"{r['p']:.2g}", f"{r['q']:.2g}", "yes" if r["q"] < Q_LEVEL else "no"])
    md += [md_table(["outcome", "world parameter", "r [95% CI]", "p", "q (BH)", "predictor"], rows), ""]
    if not len(sig):
        md += [f"No world parameter reaches q < {Q_LEVEL} for any outcome.", ""]
    md += [length_share_line(runs), ""]
    files = {"world_robustness": plots.world_robustness(shares, preds, OUTCOMES, out_dir / "world_robustness.png", title=title)}
    md += [f"**Figure, `world_robustness.png`**: left, the share of worlds where each observation holds (every seed, "
           f"at least one, and of runs) with its interval; right, r of each outcome with each world parameter "
           f"(outlined: q < {Q_LEVEL}).", "", "![world robustness](world_robustness.png)", ""]
    return md, files


def _r_crit(n: int) -> float:
    from scipy.stats import t as student_t

    if n < 4:
        return math.nan
    t = float(student_t.ppf(0.975, n - 2))
    return t / math.sqrt(n - 2 + t * t)


# ----- phase diagram ---------------------------------------------------------------------------------
def bias_key(spec) -> str:
    """The labeler knob a phase study searches (world.labeler.length_bias in the shipped study)."""
    return next(p.name for p in spec.space if p.name.startswith("world.labeler."))


def phase_cells(runs: pd.DataFrame, bias: str) -> pd.DataFrame:
    """One row per (bias, beta) cell: seeds, the share of seeds where each phase observation holds, and means."""
    agg = {**{k: (k, "mean") for k in PHASES}, "seeds": ("seed", "count"), "d_len": ("d_len", "mean"),
           "d_gold": ("d_gold", "mean"), "kl": ("kl/exact", "mean"), "rm_win": ("rm/win_rate", "mean"),
           "gold_win": ("gold/win_rate", "mean"), "d_filler": ("filler/policy", "mean"), "filler_ref": ("filler/ref", "mean"),
           "wrong": ("wrong/policy", "mean"), "wrong_ref": ("wrong/ref", "mean"),
           "repeat": ("repeat/policy", "mean"), "repeat_ref": ("repeat/ref", "mean"),
           "humans": ("humans_prefer_reference", "mean"), "length_share": ("length_share", "median")}
    cells = runs.groupby([bias, "ppo.beta"]).agg(**agg).reset_index()
    cells["d_filler"] = cells["d_filler"] - cells["filler_ref"]
    return cells


def boundary(cells: pd.DataFrame, bias: str, key: str, beta: float) -> tuple[float | None, float | None]:
    """Where `key` starts to hold along the bias at one beta: (last bias where it does not, first from which it
    holds on a majority of seeds at that and every larger bias). (None, b0): it holds from the smallest bias;
    (b_max, None): it never holds for good."""
    c = cells[np.isclose(cells["ppo.beta"], beta)].sort_values(bias)
    holds = (c[key] > 0.5).to_numpy()
    b = c[bias].to_numpy(dtype=float)
    if not len(b):
        return None, None
    for i in range(len(b)):
        if holds[i:].all():
            return (None if i == 0 else float(b[i - 1])), float(b[i])
    return float(b[-1]), None


def boundary_text(lo: float | None, hi: float | None, bias: str) -> str:
    name = bias.rsplit(".", 1)[-1]
    if hi is None:
        return f"not for good up to {name} = {fmt(lo)}"
    if lo is None:
        return f"already at {name} = {fmt(hi)} (the smallest)"
    return f"between {name} = {fmt(lo)} and {fmt(hi)}"


def phase_section(runs: pd.DataFrame, spec, out_dir: Path, title: str) -> tuple[list[str], dict[str, str]]:
    from rlhf_sweep.config.schema import PPOConfig
    from rlhf_sweep.reporting import plots

    bias = bias_key(spec)
    cells = phase_cells(runs, bias)
    biases, betas = sorted(cells[bias].unique()), sorted(cells["ppo.beta"].unique())
    default_beta = PPOConfig().beta
    fixed = ", ".join(f"{k}={v}" for k, v in spec.fixed.items()) or "none"
    md = ["## Phase diagram: labeler bias x beta", "",
          f"`{bias}` in {', '.join(map(fmt, biases))} x `ppo.beta` in {', '.join(map(fmt, betas))}, "
          f"seeds {', '.join(map(str, spec.seeds))} (fixed: {fixed}). Per cell, the share of seeds where each observation "
          f"holds: verbosity drift = policy at least {VERBOSE_TOKENS:g} token longer than the reference; gold collapse = the "
          "policy's mean gold below the reference's with disjoint 95% intervals; rising KL = verdict 3 (autocorrelation-robust trend and a rise of eval.trend_min_growth); RM "
          "prefers the policy = its verdict. The boundary at a beta: the bias from which the observation holds on a majority "
          "of seeds at that and every larger bias in the grid.", ""]
    rows = []
    for beta in betas:
        rows.append([fmt(beta) + (" (default)" if math.isclose(beta, default_beta) else ""),
                     *[boundary_text(*boundary(cells, bias, k, beta), bias) for k in PHASES]])
    md += [md_table(["beta", *PHASES.values()], rows), ""]
    md += ["Per cell (mean over seeds): length change, gold change, KL, the median share of the RM's gain that length "
           "explains, and the share of seeds where each observation holds.", ""]
    md += [md_table([bias.rsplit(".", 1)[-1], "beta", "seeds", "Δlen", "Δgold", "KL", "length share", *PHASES.values()],
                    [[r[bias], r["ppo.beta"], int(r["seeds"]), r["d_len"], r["d_gold"], r["kl"], r["length_share"], *[r[k] for k in PHASES]]
                     for _, r in cells.sort_values([bias, "ppo.beta"]).iterrows()]), ""]
    md += [length_share_line(runs), ""]
    md += unbiased_lines(cells, bias)
    panels = []
    annot = {"verbosity_drift": ("d_len", "Δlen {:+.1f}"), "gold_collapse": ("d_gold", "Δh {:+.2f}"), "kl_increasing": ("kl", "KL {:.0f}"),
             "rm_prefers_policy": ("rm_win", "win {:.2f}")}
    for key, label in PHASES.items():
        col, text = annot[key]
        grid = np.full((len(betas), len(biases)), np.nan)
        notes = np.full((len(betas), len(biases)), "", dtype=object)
        for _, r in cells.iterrows():
            i, j = betas.index(r["ppo.beta"]), biases.index(r[bias])
            grid[i, j] = r[key]
            notes[i, j] = text.format(r[col])
        edges = []
        for beta in betas:
            lo, hi = boundary(cells, bias, key, beta)
            edges.append(None if hi is None else (biases.index(hi) - 0.5))
        panels.append({"title": label, "share": grid, "notes": notes, "edges": edges})
    files = {"phase": plots.phase_diagram(panels, [fmt(b) for b in biases], [fmt(b) for b in betas], bias, out_dir / "phase.png",
                                          title=title)}
    md += ["**Figure, `phase.png`**: one heat-map per observation, x = labeler bias, y = beta; color = share of seeds where "
           "it holds, text = the cell's mean size; the black line is the boundary read off above.", "", "![phase diagram](phase.png)", ""]
    return md, files


def unbiased_lines(cells: pd.DataFrame, bias: str) -> list[str]:
    """What over-optimization remains with unbiased labelers (bias 0), measured and named."""
    zero = cells[np.isclose(cells[bias], 0.0)].sort_values("ppo.beta")
    if not len(zero):
        return []
    rows = [[r["ppo.beta"], int(r["seeds"]), r["d_gold"], r["gold_win"], r["d_len"], r["d_filler"],
             f"{r['wrong']:.2f} vs {r['wrong_ref']:.2f}", f"{r['repeat']:.2f} vs {r['repeat_ref']:.2f}", r["kl"]] for _, r in zero.iterrows()]
    md = [f"### With unbiased labelers ({bias.rsplit('.', 1)[-1]} = 0)", "",
          md_table(["beta", "seeds", "Δgold", "gold win rate", "Δlen", "Δfiller", "wrong action: policy vs ref",
                    "repeated correct action: policy vs ref", "KL"], rows), ""]
    falls = zero[zero["d_gold"] < 0]
    if len(falls):
        worst = falls.loc[falls["d_gold"].idxmin()]
        named = []
        if worst["wrong"] > worst["wrong_ref"] + 0.05:
            named.append(f"wrong actions ({worst['wrong']:.0%} of responses, reference {worst['wrong_ref']:.0%})")
        if worst["repeat"] > worst["repeat_ref"] + 0.05:
            named.append(f"a repeated correct action ({worst['repeat']:.0%}, reference {worst['repeat_ref']:.0%})")
        how = " and ".join(named) if named else "neither wrong nor repeated actions beyond the reference's rates"
        md += [f"Gold still falls below the reference at beta {', '.join(fmt(b) for b in falls['ppo.beta'])} without any length "
               f"bias (at beta {fmt(worst['ppo.beta'])}: Δgold {worst['d_gold']:+.2f}, length change {worst['d_len']:+.1f} tokens). "
               f"What the policy found there: {how}; the RM learnt from reference samples, where these are rare, so it never "
               "learnt that they cost gold.", ""]
    else:
        md += ["With unbiased labelers gold does not fall below the reference at any beta of the grid.", ""]
    return md


# ----- RM scaling --------------------------------------------------------------------------------
def rm_params(cfg) -> int:
    """Parameters of a reward model of cfg's RM size in cfg's world (backbone + scalar head; tied embeddings once)."""
    from rlhf_sweep.config.schema import rm_model
    from rlhf_sweep.models.lm import build_lm
    from rlhf_sweep.models.reward import RewardModel
    from rlhf_sweep.simulation.world import PROMPT_LEN, World

    arch = rm_model(cfg)
    lm = build_lm(arch, World(cfg.world).vocab.size, PROMPT_LEN + cfg.world.max_new_tokens)
    return int(sum(p.numel() for p in RewardModel(lm, arch.n_embd).parameters()))


def empirical_peak(history: pd.DataFrame, gold_ref: float) -> tuple[float, float]:
    """The PPO run's highest gold gain (centred moving average over SMOOTH iterations) and the KL where it happens."""
    gain = (history["gold"].astype(float) - gold_ref).rolling(SMOOTH, center=True, min_periods=1).mean()
    kl = history["kl/exact"].astype(float).rolling(SMOOTH, center=True, min_periods=1).mean()
    i = int(np.nanargmax(gain.to_numpy()))
    return float(gain.iloc[i]), float(kl.iloc[i])


def fit_peak(fit, d_max: float) -> tuple[float, float, bool]:
    """(gold gain at the fitted peak, KL there, whether the peak lies inside the reached d)."""
    if not fit.ok or not math.isfinite(fit.peak_d):
        return math.nan, math.nan, False
    d = fit.peak_d
    return float(fit.predict(np.array([d]))[0]), d * d, bool(d <= d_max)


def scaling_table(data, runs: pd.DataFrame, say=print) -> tuple[pd.DataFrame, list[dict]]:
    """One row per RM (trial): size, data, accuracy, the RL fit to its PPO run, the best-of-n fit, the gold peaks."""
    from rlhf_sweep.config.compose import compose
    from rlhf_sweep.maths import gao
    from rlhf_sweep.reporting.report import bon_baseline, rl_fit
    from rlhf_sweep.study.spec import trial_spec

    spec, df = data.spec, data.trials
    rows, curves = [], []
    for _, t in df.sort_values("number").iterrows():
        n = int(t["number"])
        mine = runs[runs["trial"] == n]
        if not len(mine) or n not in data.histories:
            continue
        params = {p.name: (t[p.name].item() if isinstance(t[p.name], np.generic) else t[p.name]) for p in spec.space}
        cfg = compose(spec.trial_overrides(params, spec.seeds[0]))
        h = data.histories[n]
        fit = rl_fit(h, float(t["gold_ref"]))
        d_rl = float(np.sqrt(np.nanmax(h["kl/exact"].to_numpy(dtype=float))))
        rl_gain, rl_kl, rl_in = fit_peak(fit, d_rl)
        emp_gain, emp_kl = empirical_peak(h, float(t["gold_ref"]))
        one = trial_spec(spec, params)
        trial_dir = layout.trial_dir(data.out_dir, n)  # its RM's best-of-n runs (sweep.run_trial) sit beside its seeds
        bon, missing = bon_baseline(trial_dir, one)
        if bon is None:  # the RM's PPO side still counts; its best-of-n columns stay empty until `sweep` runs it again
            say(f"trial {n}: {missing}; its best-of-n columns are n/a")
            d_bon = bon_gains = bon_fit = None
            bon_gain = bon_kl = bon_a = bon_b = bon_r2 = bon_256 = math.nan
            bon_in = True
        else:
            d_bon = np.sqrt(bon["kl"].to_numpy())
            bon_gains = bon["gold"].to_numpy() - bon["gold"].iloc[0]
            bon_fit = gao.fit_bon(d_bon, bon_gains)
            bon_gain, bon_kl, bon_in = fit_peak(bon_fit, float(d_bon.max()))
            bon_a, bon_b, bon_r2, bon_256 = bon_fit.a, bon_fit.b, bon_fit.r2, float(bon_gains[-1])
        label = f"{int(mine['rm.n_layer'].iloc[0])} x {int(mine['rm.n_embd'].iloc[0])}"
        rows.append({"trial": n, "size": label, "n_layer": int(mine["rm.n_layer"].iloc[0]), "n_embd": int(mine["rm.n_embd"].iloc[0]),
                     "params": rm_params(cfg), "n_pairs": int(mine["rm.n_pairs"].iloc[0]), "seeds": len(mine),
                     "acc_labels": float(mine["rm/acc_labels"].mean()), "acc_gold": float(mine["rm/acc_gold"].mean()),
                     "rl_a": fit.a, "rl_b": fit.b, "rl_r2": fit.r2, "rl_peak_gain": rl_gain, "rl_peak_kl": rl_kl, "rl_peak_inside": rl_in,
                     "emp_peak_gain": emp_gain, "emp_peak_kl": emp_kl, "kl_final": float(mine["kl/exact"].mean()),
                     "gold_final": float(mine["d_gold"].mean()),
                     "bon_a": bon_a, "bon_b": bon_b, "bon_r2": bon_r2, "bon_peak_gain": bon_gain, "bon_peak_kl": bon_kl,
                     "bon_peak_inside": bon_in, "bon_gain_256": bon_256})
        d = np.sqrt(np.clip(h["kl/exact"].to_numpy(dtype=float), 0, None))
        curves.append({"label": f"{label}, {rows[-1]['n_pairs']} pairs", "d": d, "gain": h["gold"].to_numpy(dtype=float) - float(t["gold_ref"]),
                       "fit": fit, "bon_d": d_bon, "bon_gain": bon_gains, "bon_fit": bon_fit})
    return pd.DataFrame(rows), curves


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


def scaling_section(data, runs: pd.DataFrame, out_dir: Path, title: str, say=print) -> tuple[list[str], dict[str, str]]:
    from rlhf_sweep.reporting import plots

    table, curves = scaling_table(data, runs, say)
    if not len(table):
        return ["## RM scaling", "", "_no complete trial with a history_", ""], {}
    trends = scaling_trends(table)
    beta = runs["ppo.beta"].iloc[0]
    md = ["## Reward-model scaling (Gao et al. 2022)", "",
          f"{len(table)} reward models: sizes {', '.join(sorted(table['size'].unique(), key=lambda s: table.loc[table['size'] == s, 'params'].iloc[0]))} "
          f"(layers x width; {table['params'].min():,} to {table['params'].max():,} parameters, {table['params'].max() / table['params'].min():.0f}x) x "
          f"{', '.join(map(str, sorted(table['n_pairs'].unique())))} labeled pairs. Each RM of another size than the policy starts "
          "from an SFT model of its own size trained on the same demonstrations; the pairs always come from the policy's reference. "
          f"Each RM is optimized by PPO at beta {fmt(beta)} (the policy and its reference stay the default size) and by best-of-n "
          "over 256 reference samples per prompt. Gao et al.'s forms against d = √KL: RL d(a − b ln d) on the PPO run's "
          "per-iteration gold gain, best-of-n d(a − b d) on the best-of-n curve; peaks from the fits (\"inside\": the peak lies "
          "within the KL reached) and, for PPO, the observed highest gold gain (moving average over "
          f"{SMOOTH} iterations).", ""]
    cols = ["size", "params", "n_pairs", "acc_labels", "acc_gold", "rl_a", "rl_b", "rl_r2", "rl_peak_gain", "rl_peak_kl",
            "emp_peak_gain", "emp_peak_kl", "bon_a", "bon_b", "bon_r2", "bon_peak_gain", "bon_peak_kl"]
    heads = ["RM", "params", "pairs", "acc labels", "acc gold", "RL a", "RL b", "RL R²", "RL peak Δgold", "RL peak KL",
             "PPO max Δgold", "KL there", "BoN a", "BoN b", "BoN R²", "BoN peak Δgold", "BoN peak KL"]
    t = table.sort_values(["params", "n_pairs"])
    md += [md_table(heads, [[*(r[c] for c in cols[:9]), f"{r['rl_peak_kl']:.3g}" + ("" if r["rl_peak_inside"] else " (beyond)"),
                              r["emp_peak_gain"], r["emp_peak_kl"], r["bon_a"], r["bon_b"], r["bon_r2"], r["bon_peak_gain"],
                              (f"{r['bon_peak_kl']:.3g}" + ("" if r["bon_peak_inside"] else " (beyond)")) if math.isfinite(r["bon_peak_kl"]) else "n/a"]
                             for _, r in t.iterrows()]), ""]
    md += [f"Trends over the {len(table)} RMs (the grid is balanced, so each axis is read across the other): Spearman's rho "
           "against log10 of RM parameters and of labeled pairs, the least-squares slope per decade with its 95% interval, "
           "and how the direction compares with Gao et al. (a higher gold peak at a larger KL, and better accuracy, for "
           "larger RMs and more data; coefficients that change smoothly with log size).", ""]
    md += [md_table(["quantity", "against", "n", "rho", "p", "slope per decade [95% CI]", "direction", "vs Gao et al."],
                    [[r["quantity"], r["against"], r["n"], r["rho"], r["p"], f"{r['slope']:+.3g} [{r['lo']:+.3g}, {r['hi']:+.3g}]",
                      r["direction"], r["gao"]] for _, r in trends.iterrows()]), ""]
    files = {"rm_scaling_params": plots.rm_scaling(table, "params", out_dir / "rm_scaling_params.png", title=title),
             "rm_scaling_data": plots.rm_scaling(table, "n_pairs", out_dir / "rm_scaling_data.png", title=title),
             "rm_scaling_curves": plots.rm_scaling_curves(curves, out_dir / "rm_scaling_curves.png", title=title)}
    md += ["**Figures**: `rm_scaling_params.png` and `rm_scaling_data.png`: the fitted coefficients, the gold peaks "
           "(fitted and observed) and the RM's held-out accuracies against RM parameters (one line per data size) and against "
           "labeled pairs (one line per RM size); `rm_scaling_curves.png`: every RM's PPO gold gain against d with its RL fit, "
           "and its best-of-n curve with its fit.", "",
           "![RM scaling: parameters](rm_scaling_params.png)", "", "![RM scaling: data](rm_scaling_data.png)", "",
           "![RM scaling: curves](rm_scaling_curves.png)", ""]
    return md, files


# ----- the cache audit -------------------------------------------------------------------------
ARTEFACTS = {"sft": "SFT references", "backbone": "RM backbones", "rm": "reward models"}


def cache_audit(runs: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per kind of artefact: how many distinct files the runs used, how many runs used them, how many builds each
    had (a run that found it uncached built it), and the files built more than once (none when caching holds)."""
    out = {}
    for what in ARTEFACTS:
        col = f"{what}_path"
        if col not in runs:
            continue
        used = runs[runs[col].notna()]
        builds = used[used[f"{what}_cached"] == False].groupby(col).size()  # noqa: E712 (a column of True/False/None)
        out[what] = {"files": int(used[col].nunique()), "runs": int(len(used)), "built": int(builds.sum()),
                     "built_twice": sorted(builds[builds > 1].index)}
    return out


def all_study_runs(studies_dir: Path) -> pd.DataFrame:
    """Every run of every study under `studies_dir` (outputs/studies/*/trials/*/seed-*/summary.json), for the audit."""
    rows = []
    for path in layout.study_run_summaries(studies_dir):
        try:
            rows.append({"study": path.parts[-5], **artefacts(layout.read_summary(path))})
        except (OSError, ValueError):
            continue
    return pd.DataFrame(rows)


def audit_lines(runs: pd.DataFrame, studies_dir: Path) -> list[str]:
    def one(audit: dict) -> list[list]:
        return [[ARTEFACTS[w], a["files"], a["runs"], a["built"], ", ".join(Path(p).name for p in a["built_twice"]) or "none"]
                for w, a in audit.items()]

    md = ["## Cache audit", "", "Every artefact the runs used, from their summary.json (`cache`): a run that found it uncached "
          "built it (under its file lock, so concurrent workers wait and then load it). Caching holds when no file was built twice.", ""]
    md += [md_table(["artefact", "files", "runs using them", "built by these runs", "built more than once"], one(cache_audit(runs))), ""]
    every = all_study_runs(studies_dir)
    if len(every):
        md += [f"Across every study under `{studies_dir}` ({every['study'].nunique()} studies, {len(every)} runs):", "",
               md_table(["artefact", "files", "runs using them", "built", "built more than once"], one(cache_audit(every))), ""]
    return md


# ----- the report section ----------------------------------------------------------------------
def section(data, say=print) -> tuple[str, dict[str, str]]:
    """Markdown and figures for a worlds / phase / RM-scaling study ('' and {} for any other study)."""
    what = kind(data.spec)
    if what is None:
        return "", {}
    runs, _, notes = load_runs(data.spec, data.trials)
    if not len(runs):
        return "\n## World analyses\n\n_no run summaries found_\n", {}
    title = f"study {data.name}: {len(runs)} runs"
    if what == "worlds":
        md, files = worlds_section(runs, data.out_dir, title)
    elif what == "phase":
        md, files = phase_section(runs, data.spec, data.out_dir, title)
    else:
        md, files = scaling_section(data, runs, data.out_dir, title, say)
    md += audit_lines(runs, data.out_dir.parent)
    if notes:
        md += ["Runs missing from the analysis:", "", *[f"- {n}" for n in notes], ""]
    return "\n" + "\n".join(md) + "\n", files
