"""Robustness over drawn worlds: the report section of a study that searches `world.draw`.

This module owns, per observation, the share of drawn worlds in which it holds (on every seed, on at least
one) with exact (Clopper-Pearson) intervals and the share of runs with an interval that resamples whole
worlds; and which world parameters predict each outcome (Pearson correlations over worlds with Fisher-z
intervals and Benjamini-Hochberg q-values). The statistics are rlhf_sweep.maths.stats'.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rlhf_sweep.maths.stats import cluster_mean_ci, correlations, r_critical, share_ci
from rlhf_sweep.reporting import world_plots
from rlhf_sweep.reporting.world_runs import CONFIDENCE, OBSERVATIONS, length_share_line, world_params
from rlhf_sweep.utils.tables import md_table

Q_LEVEL = 0.10  # a world parameter is called a predictor when its Benjamini-Hochberg q-value is below this


def robustness(runs: pd.DataFrame) -> pd.DataFrame:
    """Per observation: worlds where it holds on every seed / on at least one (exact intervals), and the share of runs."""
    by_world = runs.groupby("world.draw")
    n = by_world.ngroups
    rows = []
    for o, label in OBSERVATIONS.items():
        per = by_world[o].mean()
        k_all, k_any = int((per == 1).sum()), int((per > 0).sum())
        for level, k in (("every seed", k_all), ("at least one seed", k_any)):
            s, lo, hi = share_ci(k, n, CONFIDENCE)
            rows.append({"observation": label, "key": o, "level": level, "k": k, "n": n, "share": s, "lo": lo, "hi": hi})
        s, lo, hi = cluster_mean_ci([g[o].to_numpy(dtype=float) for _, g in by_world], CONFIDENCE)
        rows.append({"observation": label, "key": o, "level": "runs", "k": int(runs[o].sum()), "n": len(runs), "share": s,
                     "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


# outcomes whose predictors the robustness section looks for: the verdicts (share of seeds) and three sizes
OUTCOMES = {**{k: v for k, v in OBSERVATIONS.items()}, "d_len": "length drift (tokens)", "d_gold": "gold change",
            "kl/exact": "KL (nats)", "length_share": "share of RM gain from length"}


def predictors(runs: pd.DataFrame) -> pd.DataFrame:
    """Correlations of every outcome (mean over a world's seeds) with every drawn world parameter."""
    per = runs.groupby("world.draw").mean(numeric_only=True)
    params = [p for p in world_params() if p in per]
    out = []
    for key, label in OUTCOMES.items():
        df = correlations(per[params], per[key].astype(float), CONFIDENCE)
        df.insert(0, "outcome", label)
        df.insert(1, "key", key)
        out.append(df)
    if not out:
        return pd.DataFrame()
    # an outcome constant over the worlds contributes no rows (and would leave its empty frame's object dtype)
    df = pd.concat([d for d in out if len(d)], ignore_index=True) if any(len(d) for d in out) else out[0]
    return df.astype({c: float for c in ("r", "lo", "hi", "p", "q")})


def worlds_section(runs: pd.DataFrame, out_dir: Path, title: str) -> tuple[list[str], dict[str, str]]:
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
           f"about {r_critical(n_worlds):.2f} for p < 0.05, and about one parameter in twenty passes that by chance: only "
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
    files = {"world_robustness": world_plots.world_robustness(shares, preds, OUTCOMES, out_dir / "world_robustness.png", title=title)}
    md += [f"**Figure, `world_robustness.png`**: left, the share of worlds where each observation holds (every seed, "
           f"at least one, and of runs) with its interval; right, r of each outcome with each world parameter "
           f"(outlined: q < {Q_LEVEL}).", "", "![world robustness](world_robustness.png)", ""]
    return md, files


