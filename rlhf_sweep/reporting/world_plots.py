"""The figures of studies beyond one world: robustness over drawn worlds, the phase diagram of labeler bias x
beta, and reward-model scaling; in the one style of `plots.py` (its helpers, colors and labels).

Functions take plain data (the frames of `drawn_worlds.py`, `labeler_phases.py`, `rm_scaling.py`) and a
PNG path, draw, save and return the path.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from rlhf_sweep.reporting.plots import BON_COLOR, D_LABEL, REF_COLOR, save, trial_colors, use_style


def world_robustness(shares: pd.DataFrame, preds: pd.DataFrame, outcomes: dict[str, str], path: str | Path,
                     title: str = "") -> str:
    """Drawn worlds: the share of worlds where each observation holds (with intervals), and the correlations of
    each outcome with each world parameter.

    shares: observation, level (every seed | at least one seed | runs), share, lo, hi. preds: key (an outcome),
    param, r, q. outcomes: outcome key -> label (the heat-map's rows).
    """
    use_style()
    fig, axes = plt.subplots(1, 2, figsize=(16, 6.2), constrained_layout=True, gridspec_kw={"width_ratios": [1, 1.6]})
    ax = axes[0]
    levels = list(dict.fromkeys(shares["level"]))
    obs = list(dict.fromkeys(shares["observation"]))
    width = 0.8 / len(levels)
    for i, lv in enumerate(levels):
        s = shares[shares["level"] == lv].set_index("observation").loc[obs]
        y = np.arange(len(obs)) + (i - (len(levels) - 1) / 2) * width
        ax.barh(y, s["share"], height=width, label=lv, color=sns.color_palette("colorblind")[i], alpha=0.85)
        ax.errorbar(s["share"], y, xerr=[s["share"] - s["lo"], s["hi"] - s["share"]], fmt="none", ecolor="0.2", capsize=3, lw=1)
    ax.set_yticks(range(len(obs)), obs)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share (95% interval)")
    ax.set_title("where the observations hold")
    ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    ax = axes[1]
    if len(preds):
        r = preds.pivot_table(index="key", columns="param", values="r").reindex([k for k in outcomes if k in set(preds["key"])]).astype(float)
        q = preds.pivot_table(index="key", columns="param", values="q").reindex(r.index)[r.columns]
        sns.heatmap(r, ax=ax, cmap="RdBu_r", vmin=-1, vmax=1, annot=True, fmt=".2f", annot_kws={"fontsize": 7},
                    cbar_kws={"label": "Pearson r over worlds"})
        for i in range(r.shape[0]):
            for j in range(r.shape[1]):
                if np.isfinite(q.iat[i, j]) and q.iat[i, j] < 0.1:
                    ax.add_patch(plt.Rectangle((j, i), 1, 1, fill=False, edgecolor="black", lw=2))
        ax.set_yticklabels([outcomes[k] for k in r.index], rotation=0)
        ax.set_xticklabels([c.removeprefix("world.") for c in r.columns], rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("")
        ax.set_ylabel("")
    ax.set_title("which world parameters go with it (outlined: q < 0.1)")
    if title:
        fig.suptitle(title)
    return save(fig, path)


def phase_diagram(panels: list[dict], biases: list[str], betas: list[str], bias_name: str, path: str | Path, title: str = "") -> str:
    """A heat-map per observation over labeler bias (x) x beta (y).

    panels: title, share (len(betas) x len(biases), the share of seeds where it holds), notes (the same shape,
    text per cell), edges (per beta: the x position of the boundary, or None).
    """
    use_style()
    n = len(panels)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 0.55 * len(betas) * rows + 2.4 * rows), constrained_layout=True,
                             squeeze=False)
    for ax, p in zip(axes.flat, panels, strict=False):
        im = ax.imshow(p["share"], cmap="YlOrRd", vmin=0, vmax=1, aspect="auto", origin="lower")
        for i in range(len(betas)):
            for j in range(len(biases)):
                if np.isfinite(p["share"][i, j]):
                    ax.text(j, i, p["notes"][i, j], ha="center", va="center", fontsize=7.5,
                            color="white" if p["share"][i, j] > 0.6 else "black")
        for i, e in enumerate(p["edges"]):
            if e is not None:
                ax.plot([e, e], [i - 0.5, i + 0.5], color="black", lw=3)
        ax.set_xticks(range(len(biases)), biases)
        ax.set_yticks(range(len(betas)), betas)
        ax.set_xlabel(bias_name)
        ax.set_ylabel("β (KL coefficient)")
        ax.set_title(p["title"])
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="share of seeds where it holds", fraction=0.05)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save(fig, path)


RM_SCALING_PANELS = (
    (("rl_a",), "RL fit a"), (("rl_b",), "RL fit b"), (("bon_a",), "best-of-n fit a"), (("bon_b",), "best-of-n fit b"),
    (("rl_peak_gain", "emp_peak_gain", "bon_peak_gain"), "gold peak Δh (RL fit, PPO observed, BoN fit;\nfitted: identified inside only)"),
    (("rl_peak_kl", "emp_peak_kl", "bon_peak_kl"), "KL at the gold peak (nats;\nfitted: identified inside only)"),
    (("acc_labels", "acc_gold"), "RM held-out accuracy (labels, gold order)"),
    (("kl_final", ), "PPO final KL (nats)"),
)


def rm_scaling(table: pd.DataFrame, x: str, path: str | Path, title: str = "") -> str:
    """Gao et al.'s coefficients, gold peaks and RM accuracies against RM parameters (x="params", one line per data
    size) or against labeled pairs (x="n_pairs", one line per RM size). table: one row per RM (rm_scaling.scaling_table)."""
    use_style()
    group = "n_pairs" if x == "params" else "size"
    keys = sorted(table[group].unique(), key=lambda g: table.loc[table[group] == g, "params"].iloc[0] if group == "size" else g)
    colors = dict(zip(keys, trial_colors(len(keys)), strict=True))
    styles = ("-", "--", ":")
    markers = ("o", "s", "^")
    fig, axes = plt.subplots(2, 4, figsize=(19, 8.5), constrained_layout=True)
    for ax, (cols, label) in zip(axes.flat, RM_SCALING_PANELS, strict=True):
        for g in keys:
            sub = table[table[group] == g].sort_values(x)
            for k, col in enumerate(cols):
                vals = sub[col].to_numpy(dtype=float)
                if label.startswith("KL at"):
                    vals = np.where(vals > 0, vals, np.nan)
                # a fitted peak the data do not identify inside the reached KL is NaN in the table: no marker
                ax.plot(sub[x], vals, styles[k], color=colors[g], lw=1.5)
                ax.scatter(sub[x], vals, marker=markers[k], color=colors[g], s=30, zorder=3)
        ax.set_xscale("log")
        xs = sorted(table[x].unique())
        ax.set_xticks(xs, [_short(v) for v in xs], fontsize=8)
        ax.xaxis.set_minor_locator(plt.NullLocator())
        if label.startswith("KL at"):  # peaks across RMs can span decades of KL: log scale
            ax.set_yscale("log")
        ax.set_xlabel("RM parameters" if x == "params" else "labeled pairs")
        ax.set_title(label, fontsize=10.5)
    handles = [plt.Line2D([], [], color=colors[g], lw=2, label=(f"{g} pairs" if group == "n_pairs" else f"RM {g}")) for g in keys]
    handles += [plt.Line2D([], [], color="0.3", ls=s, marker=m, label=lab) for s, m, lab in
                zip(styles, markers, ("1st quantity in the title", "2nd", "3rd"), strict=True)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8.5)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def _short(v: float) -> str:
    return f"{v / 1e6:.3g}M" if v >= 1e6 else f"{v / 1e3:.3g}k" if v >= 1e3 else f"{v:g}"


def rm_scaling_curves(curves: list[dict], path: str | Path, title: str = "") -> str:
    """Small multiples, one per RM: PPO's per-iteration gold gain against d with the RL fit, and the best-of-n
    curve with its fit. curves: label, d, gain, fit, bon_d, bon_gain, bon_fit (the last three None without a best-of-n)."""
    use_style()
    n = max(1, len(curves))
    cols = min(6, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.9 * rows), constrained_layout=True, squeeze=False, sharey=True)
    for ax, c in zip(axes.flat, curves, strict=False):
        ax.scatter(c["d"], c["gain"], s=5, alpha=0.4, color="C0")
        top = max(float(np.nanmax(c["d"])), float(np.max(c["bon_d"])) if c["bon_d"] is not None else 0.0)
        g = np.linspace(0, top, 200)
        if c["fit"].ok:
            gr = g[g <= float(np.nanmax(c["d"]))]
            ax.plot(gr, c["fit"].predict(gr), color="C0", lw=1.8, label="PPO, RL fit")
        if c["bon_d"] is not None:  # None: the RM's best-of-n has not run yet
            ax.plot(c["bon_d"], c["bon_gain"], "o", ms=3, color=BON_COLOR)
        if c["bon_fit"] is not None and c["bon_fit"].ok:
            gb = g[g <= float(np.max(c["bon_d"]))]
            ax.plot(gb, c["bon_fit"].predict(gb), "--", color=BON_COLOR, lw=1.5, label="best-of-n, BoN fit")
        ax.axhline(0, color=REF_COLOR, lw=0.8, ls=":")
        ax.set_title(c["label"], fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(D_LABEL, fontsize=8.5)
    for ax in axes[:, 0]:
        ax.set_ylabel("gold gain Δh", fontsize=8.5)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8.5)
    if title:
        fig.suptitle(title)
    return save(fig, path)
