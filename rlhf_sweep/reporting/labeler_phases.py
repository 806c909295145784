"""A phase diagram of labeler bias x beta: the report section of a study that searches a labeler bias
(`world.labeler.*`) and `ppo.beta`.

This module owns, per (bias, beta) cell, the share of seeds in which each phase observation holds, the
boundary in the bias read off per beta, and what the policy does with unbiased labelers (wrong and repeated
actions, which the RM rarely saw).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_sweep.config.schema import PPOConfig
from rlhf_sweep.reporting import world_plots
from rlhf_sweep.reporting.world_runs import PHASES, VERBOSE_TOKENS, length_share_line
from rlhf_sweep.utils.tables import fmt, md_table


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
    files = {"phase": world_plots.phase_diagram(panels, [fmt(b) for b in biases], [fmt(b) for b in betas], bias, out_dir / "phase.png",
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

