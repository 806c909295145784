"""The one style of rlhf-sweep's figures, and the figures of a study report, a run and compare-fixes.

This module owns the style (`use_style`, `save`, colors, axis labels) and the figures of
`report.md` (Pareto front, over-optimization, algorithms, length and filler, importances, slices,
KL penalties, hypervolume), a run's trajectory (`rlhf-sweep run`), compare-fixes' figure and the
frontier bench's; the figures of world, phase and RM-scaling studies are `world_plots.py`'s, in
this style. Functions take plain data (lists, dicts, pandas frames) and a PNG path, draw, save and
return the path; gathering the data is the caller's job. The Agg backend is forced, so this
works on headless machines and inside sweep workers.

Units: KL is the exact sequence KL(pi || pi_ref) in nats; d = sqrt(KL); gold is the
world's helpfulness score h(x, y) (the careful human); RM scores are in standard units
of the RM on reference samples (0 = the reference's mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display needed, safe in worker processes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from rlhf_sweep.config import algorithms  # noqa: E402

DPI = 120
BETA_CMAP = "viridis"
BON_COLOR = "#c0392b"  # best-of-n baseline: one color in every figure
REF_COLOR = "0.35"
KL_LABEL = "KL(π ‖ π_ref), exact (nats per response)"
D_LABEL = "d = √KL  (√nats)"
GOLD_LABEL = "gold score h (human proxy)"
RM_LABEL = "RM score (std units of reference)"


def use_style() -> None:
    """The one style of every figure: seaborn whitegrid, colorblind palette, readable fonts."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind",
                  rc={"figure.dpi": DPI, "savefig.dpi": DPI, "axes.titleweight": "bold", "legend.frameon": True,
                      "legend.framealpha": 0.9, "axes.titlesize": 12, "axes.labelsize": 11})


def save(fig, path: str | Path) -> str:
    """Write `fig` as a PNG (parents created) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return str(path)


def trial_colors(n: int) -> list:
    """Distinct colors for n highlighted trials (consistent between figures of one report)."""
    return sns.color_palette("colorblind", n) if n <= 10 else sns.color_palette("husl", n)


def beta_norm(betas: Sequence[float]) -> LogNorm:
    """A log color scale over the betas (widened when they are all equal, so it stays valid)."""
    b = np.asarray([x for x in betas if x is not None and math.isfinite(x) and x > 0], dtype=float)
    lo, hi = (float(b.min()), float(b.max())) if len(b) else (0.01, 1.0)
    if hi <= lo * 1.001:
        lo, hi = lo / 2, hi * 2
    return LogNorm(vmin=lo, vmax=hi)


def _sqrt_x(ax, kl_max: float) -> None:
    # KL on a square-root axis: even spacing in d = sqrt(KL), Gao et al.'s variable, ticks in nats
    ax.set_xscale("function", functions=(lambda x: np.sqrt(np.clip(x, 0, None)), np.square))
    top = kl_max * 1.08 if kl_max > 0 else 1.0
    ax.set_xlim(0, top)
    ticks = [0.0]
    for t in (0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300):
        # keep ticks at least 7% of the axis apart (in sqrt units), so their labels never collide
        if t <= top and math.sqrt(t) - math.sqrt(ticks[-1]) >= 0.07 * math.sqrt(top):
            ticks.append(t)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])


def _beta_colorbar(fig, axes, norm: LogNorm) -> None:
    sm = plt.cm.ScalarMappable(norm=norm, cmap=BETA_CMAP)
    fig.colorbar(sm, ax=axes, label="β, KL coefficient (log scale)", fraction=0.03, pad=0.02)


# ----- study figures ------------------------------------------------------------------------------
def pareto(trials: pd.DataFrame, bon: pd.DataFrame | None, path: str | Path, ref: dict[str, float] | None = None,
           title: str = "") -> str:
    """Figure 1: gold/policy and rm/policy against kl/exact, one point per trial colored by beta.

    trials: columns number, beta, kl, gold, rm, front_gold, front_rm (bools: non-dominated in
    (metric up, KL down)). bon: columns n, kl, gold, rm (best-of-n from reference samples).
    ref: reference means {"gold": ..., "rm": ...} drawn as dotted lines.
    """
    use_style()
    norm = beta_norm(trials["beta"])
    has_bon = bon is not None and len(bon) > 0
    bon_kl_max = float(max(bon["kl"].max(), bon["kl_bound"].max() if "kl_bound" in bon else 0)) if has_bon else 0.0
    kl_max = float(max(trials["kl"].max(), bon_kl_max))
    # the zoom: where the gold front and the best-of-n curve live (the far, over-optimized trials squash it)
    front_gold = trials[trials["front_gold"]]
    zoom_kl = float(max(front_gold["kl"].max() if len(front_gold) else 0, bon_kl_max, 0.5)) * 1.15
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.4), constrained_layout=True)
    panels = ((axes[0], "gold", GOLD_LABEL, kl_max, "gold score vs KL"),
              (axes[1], "gold", GOLD_LABEL, zoom_kl, f"gold, zoom on the front (KL ≤ {zoom_kl:.3g})"),
              (axes[2], "rm", RM_LABEL, kl_max, "RM score vs KL"))
    for ax, key, ylabel, xmax, panel_title in panels:
        zoom = xmax < kl_max
        shown = trials[trials["kl"] <= xmax * 1.08]
        # trials without a beta (best-of-n's knob is n) in grey, not invisible
        ax.scatter(shown["kl"], shown[key], c=shown["beta"], cmap=plt.get_cmap(BETA_CMAP).with_extremes(bad="0.6"), norm=norm,
                   plotnonfinite=True, s=55, edgecolors="white",
                   linewidths=0.6, zorder=3, label="PPO trial, held-out (color: β)")
        front = trials[trials[f"front_{key}"]].sort_values("kl")
        if len(front):
            # the attainment curve: the best metric reachable with at most this much KL
            ax.plot(front["kl"], front[key], drawstyle="steps-post", color="black", lw=1.6, zorder=2,
                    label=f"non-dominated front ({len(front)} trials)")
            if zoom or key == "gold" and len(front) <= 3:  # trial numbers where they do not pile up
                for _, r in front.iterrows():
                    ax.annotate(f"t{int(r['number'])}", (r["kl"], r[key]), textcoords="offset points", xytext=(4, 5), fontsize=8)
        if has_bon:
            ax.plot(bon["kl"], bon[key], "o--", color=BON_COLOR, ms=4.5, lw=1.4, zorder=4,
                    label=f"best-of-n at its exact KL (n = 1…{int(bon['n'].max())})")
            if "kl_bound" in bon:
                ax.plot(bon["kl_bound"], bon[key], "o:", color=BON_COLOR, mfc="none", ms=4.5, lw=0.9, alpha=0.45, zorder=3,
                        label="best-of-n at the bound log n − (n−1)/n")
            for _, r in bon.iterrows():
                if int(r["n"]) in ((1, 2, 4, 16, 64, 256) if zoom else (1, 256)):
                    ax.annotate(f"n={int(r['n'])}", (r["kl"], r[key]), textcoords="offset points", xytext=(-4, -14),
                                fontsize=8, color=BON_COLOR)
        if ref and ref.get(key) is not None:
            ax.axhline(ref[key], color=REF_COLOR, ls=":", lw=1.2, label="reference policy (KL = 0)")
        _sqrt_x(ax, xmax)
        if zoom and len(shown):
            lo = min(shown[key].min(), bon[key].min() if has_bon else np.inf, ref.get(key, np.inf) if ref else np.inf)
            hi = max(shown[key].max(), bon[key].max() if has_bon else -np.inf)
            pad = 0.08 * (hi - lo if hi > lo else 1.0)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel(KL_LABEL + ", √ scale")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.legend(loc="best", fontsize=8)
    _beta_colorbar(fig, axes, norm)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def overoptimization(curves: list[dict], bon: dict | None, path: str | Path, title: str = "", trials: dict | None = None) -> str:
    """Figure 2: per-iteration gold and RM gains against d = sqrt(KL), with Gao et al. fits.

    curves: one dict per chosen trial: label, color, d, gold_gain, rm_gain (arrays over
    iterations) and fit (gao.GaoFit of the RL form on gold_gain). bon: d, gold_gain, rm_gain
    over n and fit (the best-of-n form on gold_gain), or None. trials: the held-out end
    points of every trial (d, gold_gain, rm_gain) and fit (the RL form across them), or None.
    """
    use_style()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    d_max = max([float(np.nanmax(c["d"])) for c in curves if len(c["d"])] + ([float(np.max(bon["d"]))] if bon else [])
                + ([float(np.nanmax(trials["d"]))] if trials else []) + [0.1])
    grid = np.linspace(0, d_max, 400)

    def upto(d) -> np.ndarray:  # a fitted curve is drawn over its own data only, never extrapolated
        return grid[grid <= float(np.nanmax(d)) * 1.05]

    def draw_gold(ax, legend: bool) -> None:
        lab = (lambda text: text) if legend else (lambda text: None)
        if trials:
            ax.scatter(trials["d"], trials["gold_gain"], marker="x", color="0.45", s=28, zorder=2)
            if trials["fit"].ok:
                g = upto(trials["d"])
                ax.plot(g, trials["fit"].predict(g), color="0.45", lw=1.5, ls="-.", zorder=2,
                        label=lab(f"every trial's held-out end point (x)  RL fit across trials: {trials['fit'].label()}"))
        for c in curves:
            ax.scatter(c["d"], c["gold_gain"], color=c["color"], s=10, alpha=0.35, zorder=2)
            if c["fit"].ok:
                g = upto(c["d"])
                ax.plot(g, c["fit"].predict(g), color=c["color"], lw=2, zorder=3, label=lab(f"{c['label']}  RL fit: {c['fit'].label()}"))
            elif legend:
                ax.plot([], [], color=c["color"], lw=2, label=f"{c['label']}  RL fit: too few points")
        if bon:
            ax.plot(bon["d"], bon["gold_gain"], "o", color=BON_COLOR, ms=5, zorder=4)
            if bon["fit"].ok:
                g = upto(bon["d"])
                ax.plot(g, bon["fit"].predict(g), "--", color=BON_COLOR, lw=2, zorder=4,
                        label=lab(f"best-of-n  BoN fit: {bon['fit'].label()}"))
        ax.axhline(0, color=REF_COLOR, lw=0.8, ls=":")

    draw_gold(axes[0], legend=True)
    # an inset on the rise: over-optimized trials stretch the axes until the hump near d ~ 1 is flat
    near = float(np.max(bon["d"])) if bon else 1.5
    if d_max > 2.5 * near:
        inset = axes[0].inset_axes([0.09, 0.07, 0.45, 0.45])  # lower left: falling gold leaves it empty
        draw_gold(inset, legend=False)
        inset.set_xlim(0, near * 1.1)
        ys = [np.asarray(c["gold_gain"])[np.asarray(c["d"]) <= near * 1.1] for c in curves]
        ys += [np.asarray(bon["gold_gain"])] if bon else []
        ys = np.concatenate([y[np.isfinite(y)] for y in ys] + [np.zeros(1)])
        lo, hi = np.percentile(ys, 1), np.percentile(ys, 99.5)
        inset.set_ylim(lo - 0.1 * (hi - lo), hi + 0.15 * (hi - lo))
        inset.set_title(f"zoom: d ≤ {near * 1.1:.2g}", fontsize=9)
        inset.tick_params(labelsize=8)
        axes[0].indicate_inset_zoom(inset, edgecolor="0.4")
    for c in curves:
        axes[1].scatter(c["d"], c["rm_gain"], color=c["color"], s=10, alpha=0.35, zorder=2)
    if trials:
        axes[1].scatter(trials["d"], trials["rm_gain"], marker="x", color="0.45", s=28, zorder=2)
    if bon:
        axes[1].plot(bon["d"], bon["rm_gain"], "o--", color=BON_COLOR, ms=5, lw=1.4)
    axes[1].axhline(0, color=REF_COLOR, lw=0.8, ls=":")
    for ax in axes:
        ax.set_xlabel(D_LABEL)
        ax.set_xlim(0, d_max * 1.05)
    axes[0].set_ylabel("gold gain over the reference, Δh")
    axes[0].set_title("gold: rises, then falls? (points: PPO iterations)")
    axes[1].set_ylabel("RM gain over the reference (std units)")
    axes[1].set_title("RM (proxy) keeps rising")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2 if len(labels) > 3 else 1, fontsize=8.5,
               title="Gao et al. fits: RL d(a − b ln d), best-of-n d(a − b d)", title_fontsize=9)
    if title:
        fig.suptitle(title)
    return save(fig, path)


ALGO_COLORS = algorithms.colors()  # the registry's; an algorithm it does not know is drawn grey


def algorithms(points: dict[str, pd.DataFrame], fits: dict[str, object], path: str | Path, baseline: pd.DataFrame | None = None,
               ref: dict[str, float] | None = None, budgets: Sequence[float] = (), title: str = "") -> str:
    """Every algorithm's frontier on one figure: held-out gold and RM score against exact KL, one colour per
    algorithm, its trials joined in KL order, and its Gao et al. fit (gao.GaoFit, RL or best-of-n form,
    on the gold gain over the reference; drawn over its own KL range only).

    points: algorithm -> frame with kl, gold, rm (one row per trial, seed-averaged). baseline: the study's
    best-of-n baseline path (n, kl, gold, rm) or None. ref: reference gold and rm (dotted lines, and the
    fits' zero). budgets: KL budgets marked as vertical lines.
    """
    use_style()
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.8), constrained_layout=True)
    kl_max = max([float(df["kl"].max()) for df in points.values() if len(df)] +
                 ([float(baseline["kl"].max())] if baseline is not None else []) + [max(budgets, default=1.0)])
    for ax, key, ylabel in ((axes[0], "gold", GOLD_LABEL), (axes[1], "rm", RM_LABEL)):
        for algo, df in points.items():
            color = ALGO_COLORS.get(algo, "0.3")
            d = df.sort_values("kl")
            ax.plot(d["kl"], d[key], "-", color=color, lw=1.0, alpha=0.6, zorder=2)
            ax.scatter(d["kl"], d[key], color=color, s=42, edgecolors="white", linewidths=0.6, zorder=3,
                       label=f"{algo} ({len(d)} trials)")
            fit = fits.get(algo)
            if key == "gold" and fit is not None and fit.ok and ref is not None and len(d):
                g = np.linspace(0, math.sqrt(float(d["kl"].max())), 200)
                ax.plot(g**2, ref["gold"] + fit.predict(g), "--", color=color, lw=1.6, zorder=2,
                        label=f"{algo} Gao fit ({fit.form}): {fit.label()}")
        if baseline is not None:
            ax.plot(baseline["kl"], baseline[key], ":", color=BON_COLOR, lw=1.4, zorder=1,
                    label=f"best-of-n baseline path, exact KL (n = 1…{int(baseline['n'].max())})")
        if ref and ref.get(key) is not None:
            ax.axhline(ref[key], color=REF_COLOR, ls=":", lw=1.0, label="reference policy (KL = 0)")
        for b in budgets:
            ax.axvline(b, color="0.6", lw=0.8, ls="-.", zorder=0)
        _sqrt_x(ax, kl_max)
        ax.set_xlabel(KL_LABEL + ", √ scale" + (f"; budgets {', '.join(f'{b:g}' for b in budgets)} nats" if budgets else ""))
        ax.set_ylabel(ylabel)
    axes[0].set_title("gold against exact KL, per algorithm")
    axes[1].set_title("RM (proxy) against exact KL, per algorithm")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def length_filler(trials: pd.DataFrame, curves: list[dict], bon: pd.DataFrame | None, path: str | Path,
                  ref: dict[str, float] | None = None, title: str = "") -> str:
    """Figure 3: response length and filler tokens against KL.

    trials: columns kl, len, filler, beta (held-out values per trial). curves: chosen trials'
    per-iteration paths (label, color, kl, len, filler). bon: n, kl, len, filler. ref:
    {"len": ..., "filler": ...} of the reference.
    """
    use_style()
    norm = beta_norm(trials["beta"])
    kl_max = float(max([trials["kl"].max()] + [float(np.nanmax(c["kl"])) for c in curves if len(c["kl"])]
                       + ([bon["kl"].max()] if bon is not None and len(bon) else [])))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    for ax, key, ylabel in ((axes[0], "len", "response length (tokens before EOS)"),
                            (axes[1], "filler", "filler tokens per response")):
        for c in curves:
            ax.scatter(c["kl"], c[key], color=c["color"], s=8, alpha=0.35, label=f"{c['label']} (per iteration)")
        ax.scatter(trials["kl"], trials[key], c=trials["beta"], cmap=plt.get_cmap(BETA_CMAP).with_extremes(bad="0.6"), norm=norm,
                   plotnonfinite=True, s=55, edgecolors="white",
                   linewidths=0.6, zorder=3, label="PPO trial, held-out (color: β)")
        if bon is not None and len(bon):
            ax.plot(bon["kl"], bon[key], "o--", color=BON_COLOR, ms=4.5, lw=1.4, zorder=4, label="best-of-n (RM picks)")
        if ref and ref.get(key) is not None:
            ax.axhline(ref[key], color=REF_COLOR, ls=":", lw=1.2, label="reference policy")
        _sqrt_x(ax, kl_max)
        ax.set_xlabel(KL_LABEL + ", √ scale")
        ax.set_ylabel(ylabel)
        ax.set_title("length vs KL" if key == "len" else "filler vs KL")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8.5)
    _beta_colorbar(fig, axes, norm)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def importances(imps: dict[str, dict[str, float]], path: str | Path, title: str = "") -> str:
    """Figure 4a: hyperparameter importances, one panel per objective ({objective: {param: importance}})."""
    use_style()
    n = len(imps)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 0.5 * max(len(v) for v in imps.values()) + 2.2),
                             constrained_layout=True, squeeze=False)
    for ax, (objective, values) in zip(axes[0], imps.items(), strict=True):
        df = pd.DataFrame({"param": list(values), "importance": list(values.values())})
        sns.barplot(data=df, y="param", x="importance", ax=ax, color=sns.color_palette("colorblind")[0])
        for i, v in enumerate(df["importance"]):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=9)
        ax.set_xlim(0, 1.15)
        ax.set_xlabel("importance (PED-ANOVA, sums to 1)")
        ax.set_ylabel("")
        ax.set_title(objective)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def slices(trials: pd.DataFrame, objectives: list[tuple[str, str]], params: list[tuple[str, bool, bool]],
           path: str | Path, title: str = "") -> str:
    """Figure 4b: each objective against each searched knob, one point per complete trial.

    trials: columns number, pareto (bool), one per objective metric and one per param.
    objectives: (metric, direction). params: (name, log scale, categorical).
    """
    use_style()
    rows, cols = len(objectives), len(params)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 1, 3.6 * rows), constrained_layout=True, squeeze=False)
    norm = plt.Normalize(vmin=float(trials["number"].min()), vmax=float(max(trials["number"].max(), trials["number"].min() + 1)))
    for i, (metric, direction) in enumerate(objectives):
        for j, (name, log, categorical) in enumerate(params):
            ax = axes[i][j]
            x = trials[name]
            if categorical:
                cats = list(dict.fromkeys(map(str, x)))
                x = pd.Series([cats.index(str(v)) for v in trials[name]], index=trials.index, dtype=float)
                x = x + np.random.default_rng(0).uniform(-0.12, 0.12, len(x))  # jitter: see every point
                ax.set_xticks(range(len(cats)), cats)
            ax.scatter(x, trials[metric], c=trials["number"], cmap="Blues", norm=norm, s=40, edgecolors="0.3", linewidths=0.4)
            best = trials["pareto"].astype(bool)
            ax.scatter(x[best], trials[metric][best], facecolors="none", edgecolors="black", s=110, linewidths=1.3,
                       label="Pareto-optimal")
            if log and not categorical:
                ax.set_xscale("log")
            ax.set_xlabel(name)
            ax.set_ylabel(f"{metric} ({direction})" + (", nats" if metric.startswith("kl/") else ""))
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    sm = plt.cm.ScalarMappable(norm=norm, cmap="Blues")
    fig.colorbar(sm, ax=axes, label="trial number (later = darker)", fraction=0.03, pad=0.02)
    if title:
        fig.suptitle(title)
    return save(fig, path)


# ----- one run ----------------------------------------------------------------------------------------
def trajectory(history: list[dict], path: str | Path, title: str = "") -> str:
    """The trajectory of one `rlhf-sweep run`: RM, gold, KL, length and beta against iteration.

    history: summary["history"] (one dict per iteration with rm, gold, kl/exact, kl/k1, kl/k3,
    len, filler, and the algorithm's beta: ppo/beta, rloo/beta, ...). A best-of-n history (bon/n,
    kl/bon_bound, no beta) is drawn against n' with the KL bound beside the exact KL.
    """
    use_style()
    df = pd.DataFrame(history)
    beta_key = next((c for c in df if c.endswith("/beta")), None)  # ppo/beta, rloo/beta, ...; best-of-n has none
    bon = "bon/n" in df  # best-of-n's history walks n' instead of iterations
    it = df["bon/n"] if bon else df["iteration"]
    fig, axes = plt.subplots(5 if beta_key else 4, 1, figsize=(8.5, 12 if beta_key else 10), sharex=True, constrained_layout=True)
    axes[0].plot(it, df["rm"], color="C0", label="RM score of policy samples")
    axes[0].set_ylabel(RM_LABEL.replace(" (", "\n("))
    axes[1].plot(it, df["gold"], color="C2", label="gold score of policy samples")
    axes[1].set_ylabel(GOLD_LABEL.replace(" (", "\n("))
    for key, style in (("kl/exact", "-"), ("kl/k1", "--"), ("kl/k3", ":"), ("kl/bon_bound", "--")):
        if key in df:
            label = {"kl/exact": " (full vocabulary)" if not bon else " (exact, empirical distribution)",
                     "kl/bon_bound": ": log n' - (n'-1)/n' (upper bound)"}.get(key, " (sampled tokens)")
            axes[2].plot(it, df[key], style, label=key + label)
    axes[2].set_ylabel("KL to reference\n(nats per response)")
    axes[3].plot(it, df["len"], color="C4", label="length (tokens)")
    if "filler" in df:
        axes[3].plot(it, df["filler"], color="C5", ls="--", label="filler tokens")
    axes[3].set_ylabel("tokens per response")
    if beta_key:
        axes[4].plot(it, df[beta_key], color="C7", label="β (KL coefficient)")
        axes[4].set_ylabel("β")
        axes[4].set_ylim(0, float(df[beta_key].max()) * 1.25 or 1.0)  # from 0: a constant β reads as constant
    if bon:
        axes[-1].set_xscale("log", base=2)
        axes[-1].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes[-1].set_xlabel("n' (best of n' reference samples, RM-chosen)")
    else:
        axes[-1].set_xlabel(f"{beta_key.split('/')[0].upper()} iteration")
        axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes:
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title or f"{'best-of-n' if bon else beta_key.split('/')[0].upper()} trajectory (policy samples of each iteration)")
    return save(fig, path)


def fixes_figure(diffs: dict[str, dict[str, dict]], metrics: Sequence[tuple[str, str]], points: dict[str, list[tuple[float, float]]],
                 path: str | Path, ref_gold: float | None = None, title: str = "") -> str:
    """`rlhf-sweep compare-fixes`: each arm minus the baseline per metric with its interval, and gold against KL.

    diffs: {arm: {metric: {"mean", "lo", "hi"}}} (paired by seed, the baseline left out);
    metrics: [(metric key, label)]; points: {arm: [(kl/exact, gold/policy) per seed]}, baseline
    included; ref_gold: the reference's mean gold (a dashed line).
    """
    use_style()
    arms = list(points)
    colors = dict(zip(arms, trial_colors(len(arms)), strict=True))
    fig = plt.figure(figsize=(15, 7.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 4)
    fixed = [a for a in arms if a in diffs]
    y = np.arange(len(fixed))
    for i, (key, label) in enumerate(metrics[:6]):
        ax = fig.add_subplot(grid[i // 3, i % 3])
        for j, arm in enumerate(fixed):
            d = diffs[arm][key]
            excl = d["lo"] > 0 or d["hi"] < 0
            ax.errorbar(d["mean"], j, xerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], fmt="o" if excl else "o",
                        color=colors[arm], mfc=colors[arm] if excl else "white", capsize=4, lw=2)
        ax.axvline(0, color=REF_COLOR, lw=1, ls="--")
        ax.set_yticks(y, fixed if i % 3 == 0 else [""] * len(fixed))
        ax.invert_yaxis()
        ax.set_title(f"Δ {label}", fontsize=11)
    ax = fig.add_subplot(grid[:, 3])
    for arm in arms:
        kl, gold = np.array(points[arm], dtype=float).T
        ax.scatter(kl, gold, color=colors[arm], alpha=0.45, s=25)
        ax.scatter(kl.mean(), gold.mean(), color=colors[arm], s=140, edgecolor="black", label=arm, zorder=3)
    if ref_gold is not None and math.isfinite(ref_gold):
        ax.axhline(ref_gold, color=REF_COLOR, ls="--", lw=1, label="reference")
    ax.set_xlabel(KL_LABEL.replace(", exact", "\nexact"))
    ax.set_ylabel(GOLD_LABEL)
    ax.set_title("gold against KL (dots: seeds; big: mean)", fontsize=11)
    ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "Each fix minus the baseline, paired by seed (filled: interval excludes 0)")
    return save(fig, path)


# ----- KL penalties ---------------------------------------------------------------------------------
GRADIENT_STYLE = {"unbiased": "-", "partial": "--", "biased": ":"}


def kl_placement(table: pd.DataFrame, pts: pd.DataFrame, fits: dict, labels: dict[str, str], gold_ref: float,
                 path: str | Path, title: str = "") -> str:
    """A study of KL penalties: exact KL against beta per penalty, and gold gain against d = sqrt(KL) with
    Gao et al.'s RL form fitted per penalty.

    table: penalty, beta, kl (seed mean); pts: penalty, gradient, beta, kl, gold (one row per trial x seed);
    fits: {penalty: gao.GaoFit} on (d, gold - gold_ref); labels: {penalty: legend text}, in drawing order.
    """
    use_style()
    names = list(labels)
    colors = dict(zip(names, trial_colors(len(names)), strict=True))
    gradient = {n: pts.loc[pts["penalty"] == n, "gradient"].iloc[0] for n in names}
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), constrained_layout=True)
    ax = axes[0]
    for n in names:
        t = table[table["penalty"] == n].sort_values("beta")
        p = pts[pts["penalty"] == n]
        ax.plot(t["beta"], t["kl"], GRADIENT_STYLE[gradient[n]], marker="o", color=colors[n], lw=2, label=labels[n])
        ax.scatter(p["beta"] * np.exp(np.random.default_rng(0).uniform(-0.06, 0.06, len(p))), p["kl"],
                   color=colors[n], s=12, alpha=0.5)  # the seeds, jittered along beta
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("β, KL coefficient (log scale)")
    ax.set_ylabel(KL_LABEL + " (log scale)")
    ax.set_title("KL reached at equal β")
    ax = axes[1]
    d_all = np.sqrt(np.clip(pts["kl"].to_numpy(dtype=float), 0, None))
    for n in names:
        p = pts[pts["penalty"] == n]
        d = np.sqrt(np.clip(p["kl"].to_numpy(dtype=float), 0, None))
        ax.scatter(d, p["gold"] - gold_ref, color=colors[n], s=18, alpha=0.7)
        f = fits.get(n)
        if f is not None and f.ok and len(d):
            grid = np.linspace(0, float(d.max()), 200)  # over its own points only, never extrapolated
            ax.plot(grid, f.predict(grid), GRADIENT_STYLE[gradient[n]], color=colors[n], lw=2,
                    label=f"{labels[n].split(' (')[0]}: {f.label()}")
    ax.axhline(0, color=REF_COLOR, lw=0.8, ls=":")
    ax.set_xlim(0, float(d_all.max()) * 1.05 if len(d_all) else 1.0)
    ax.set_xlabel(D_LABEL)
    ax.set_ylabel("gold gain over the reference, Δh")
    ax.set_title("gold against KL: the frontier of each penalty (RL form d(a − b ln d))")
    axes[0].legend(fontsize=8.5, loc="best", title="penalty (gradient)", title_fontsize=9)
    axes[1].legend(fontsize=8, loc="best", title="Gao RL fit per penalty", title_fontsize=9)
    if title:
        fig.suptitle(title)
    return save(fig, path)


# ----- hypervolume ------------------------------------------------------------------------------------
def hypervolume_curve(values: Sequence[float], numbers: Sequence[int], path: str | Path, objectives: Sequence[str] = (),
                      reference: str = "", share: float = 0.9, title: str = "") -> str:
    """A study's hypervolume after each complete trial (completion order), with the share-of-final line.

    values: the hypervolume once the k-th trial was in; numbers: their trial numbers; objectives: the
    metrics whose product is its unit; reference: the reference point (a footnote); share: the fraction
    of the final value marked by a line.
    """
    use_style()
    v = np.asarray(values, dtype=float)
    k = np.arange(1, len(v) + 1)
    fig, ax = plt.subplots(figsize=(8.5, 4.6), constrained_layout=True)
    ax.step(k, v, where="post", color="C0", lw=2, label="hypervolume of the front so far")
    ax.scatter(k, v, color="C0", s=18, zorder=3)
    gains = np.flatnonzero(np.diff(np.concatenate([[0.0], v])) > 0)
    for i in gains:  # the trials that moved the front
        ax.annotate(f"t{numbers[i]}", (k[i], v[i]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color="0.3")
    final = float(v[-1]) if len(v) else 0.0
    if final > 0:
        ax.axhline(share * final, color=REF_COLOR, ls="--", lw=1, label=f"{share:.0%} of the final hypervolume")
        hit = int(np.flatnonzero(v >= share * final)[0]) + 1
        ax.axvline(hit, color="C3", ls=":", lw=1.2, label=f"reached after {hit} of {len(v)} trials")
    ax.set_xlim(0.5, len(v) + 0.5)
    ax.set_ylim(0, final * 1.15 if final > 0 else 1.0)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("complete trials, in the order they finished")
    ax.set_ylabel("hypervolume" + (f" ({' × '.join(objectives)})" if objectives else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "Hypervolume after each trial", loc="left")
    if reference:
        fig.text(0.01, -0.02, f"reference point: {reference}", fontsize=8, color="0.3", ha="left", va="top", wrap=True)
    return save(fig, path)


def frontier_bench(runs: dict[str, list[dict]], path: str | Path, share: float = 0.9, title: str = "") -> str:
    """bench/frontier.py: hypervolume share of the reference front against trials and against wall minutes.

    runs: {sampler: [{"share": [share after each trial], "minutes": [wall minutes at each trial]} per seed]};
    one line per sampler (the median over seeds) with its spread (min to max) shaded.
    """
    use_style()
    fig, (a_trials, a_min) = plt.subplots(1, 2, figsize=(14, 5.2), constrained_layout=True, sharey=True)
    colors = dict(zip(runs, trial_colors(len(runs)), strict=True))
    styles = dict(zip(runs, ["-", "--", "-.", ":"] * len(runs), strict=False))  # lines that overlap stay apart
    t_end = max((m for rs in runs.values() for r in rs for m in r["minutes"][-1:]), default=1.0)
    grid = np.linspace(0, t_end, 400)
    for sampler, rs in runs.items():
        n = min(len(r["share"]) for r in rs)
        by_trial = np.array([r["share"][:n] for r in rs], dtype=float)
        k = np.arange(1, n + 1)
        med = np.median(by_trial, axis=0)
        a_trials.step(k, med, where="post", color=colors[sampler], ls=styles[sampler], lw=2, label=f"{sampler} (median of {len(rs)} seeds)")
        a_trials.fill_between(k, by_trial.min(0), by_trial.max(0), step="post", color=colors[sampler], alpha=0.18)
        # the share in force at each minute: a step function of the completion times (0 before the first)
        by_time = np.array([[r["share"][i - 1] if (i := np.searchsorted(r["minutes"], g, side="right")) else 0.0 for g in grid]
                            for r in rs], dtype=float)
        a_min.plot(grid, np.median(by_time, axis=0), color=colors[sampler], ls=styles[sampler], lw=2, label=sampler)
        a_min.fill_between(grid, by_time.min(0), by_time.max(0), color=colors[sampler], alpha=0.18)
    for ax in (a_trials, a_min):
        ax.axhline(share, color=REF_COLOR, ls="--", lw=1, label=f"{share:.0%} of the reference")
        ax.axhline(1.0, color="0.2", lw=0.8)
    a_trials.set_xlabel("complete trials, in the order they finished")
    a_min.set_xlabel("wall minutes since the sweep command started")
    a_trials.set_ylabel("hypervolume / the dense grid's hypervolume")
    a_trials.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    a_trials.legend(loc="lower right", fontsize=8)
    a_trials.set_title("per trial", loc="left")
    a_min.set_title("per wall minute", loc="left")
    fig.suptitle(title or "How fast each sampler finds the gold/KL front (line: median over seeds; band: min to max)")
    return save(fig, path)
