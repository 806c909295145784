"""What each KL penalty does, in a study that searches them (studies/kl_placement.yaml).

This module owns the report section on KL penalties: from a study's complete trials (each a
(ppo.kl_estimator, ppo.kl_in) pair at some beta, over several seeds, as the trial's own
summary.json records its config) it gathers the held-out exact KL and gold per seed, compares
every penalty with the default reward+k1 at equal beta (how much more KL it lets through) and at
equal KL (whether its gold-vs-KL frontier differs, against Gao et al.'s RL form fitted to
reward+k1), and writes the markdown that reads those numbers. `report.py` calls it when the study
searches the KL penalty; the figure is drawn by `plots.kl_placement`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from optuna.trial import TrialState

from rlhf_sweep.maths import gao
from rlhf_sweep.maths import kl as klmod
from rlhf_sweep.maths.stats import mean_interval
from rlhf_sweep.run import layout
from rlhf_sweep.utils.tables import fmt, md_table

REFERENCE = "reward_k1"  # the default penalty, unbiased: what every other one is compared with
KEYS = ("kl_penalty", "ppo.kl_in", "ppo.kl_estimator")
CONFIDENCE = 0.95


def searched(spec) -> bool:
    """Whether a study searches the KL penalty (by the kl_penalty group or the two config keys)."""
    return any(p.name in KEYS for p in spec.space)


def label(name: str) -> str:
    placement, estimator = name.split("_", 1)
    return f"{placement}+{estimator}"


def trial_config(run_dir: str | None, seeds: list[int]) -> dict | None:
    """The config a trial ran with, from the summary.json of its first seed that has one; None when none has."""
    if not run_dir:
        return None
    found = [p for _, p in layout.seed_summaries(run_dir, seeds) if p.is_file()]
    return layout.read_summary(found[0])["config"] if found else None


def points(spec, ostudy) -> tuple[pd.DataFrame, list[str]]:
    """One row per complete trial and seed: penalty, gradient, beta, seed, kl (held-out exact), gold; and a note
    per trial left out.

    Each trial's penalty and beta are read from the config its own summary.json records; per-seed
    values from the trial's `per_seed` record (the objectives), else its seed means (seed -1).
    """
    rows, notes = [], []
    for t in ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_dir = t.user_attrs.get("run_dir")
        config = trial_config(run_dir, spec.seeds)
        if config is None:
            notes.append(f"KL penalties: trial {t.number} left out: no seed of it has a {layout.SUMMARY} in {run_dir} "
                         "to say which penalty and beta it ran (its run files were moved or deleted)")
            continue
        ppo = config["ppo"]
        pen = klmod.penalty(ppo["kl_estimator"], ppo["kl_in"])
        base = {"trial": t.number, "penalty": pen.name, "gradient": pen.gradient, "beta": float(ppo["beta"])}
        per_seed = t.user_attrs.get("per_seed") or {}
        got = [(int(s), m) for s, m in per_seed.items() if m and m.get("kl/exact") is not None and m.get("gold/policy") is not None]
        if not got:
            m = t.user_attrs.get("metrics") or {}
            got = [(-1, m)] if m.get("kl/exact") is not None and m.get("gold/policy") is not None else []
        rows += [{**base, "seed": s, "kl": float(m["kl/exact"]), "gold": float(m["gold/policy"])} for s, m in got]
    return pd.DataFrame(rows, columns=["trial", "penalty", "gradient", "beta", "seed", "kl", "gold"]), notes


@dataclass
class Comparison:
    """One penalty against the reference: KL at equal beta, gold at equal KL, and its own Gao fit."""

    name: str
    gradient: str
    minimizes: str
    fit: gao.GaoFit
    kl_ratio: float = math.nan  # geometric mean over (beta, seed) pairs of KL / KL of the reference
    kl_ratio_ci: tuple[float, float] = (math.nan, math.nan)
    n_pairs: int = 0
    ratio_by_beta: dict[float, float] = field(default_factory=dict)  # seed-mean KL / seed-mean KL of the reference
    gold_offset: float = math.nan  # mean gold gain minus the reference's fitted frontier, at equal KL
    gold_offset_ci: tuple[float, float] = (math.nan, math.nan)
    n_inside: int = 0  # points within the KL range the reference reached (compared)
    n_outside: int = 0  # points beyond it (not compared: the fit would be extrapolated)


@dataclass
class Analysis:
    points: pd.DataFrame
    gold_ref: float
    reference: str
    table: pd.DataFrame  # per penalty and beta: seed means and spreads of kl and gold
    comparisons: dict[str, Comparison]


def _mean_ci(x: np.ndarray) -> tuple[float, tuple[float, float]]:
    """The mean and its t interval; no interval where the points do not spread beyond rounding."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2 or float(np.ptp(x)) <= 1e-9 * max(1.0, float(np.abs(x).max())):
        return float(x.mean()) if len(x) else math.nan, (math.nan, math.nan)
    mean, lo, hi = mean_interval(x, CONFIDENCE, "t")
    return mean, (lo, hi)


def _gain(df: pd.DataFrame, gold_ref: float) -> tuple[np.ndarray, np.ndarray]:
    return gao.sqrt_kl(df["kl"].to_numpy(dtype=float)), df["gold"].to_numpy(dtype=float) - gold_ref


def analyse(pts: pd.DataFrame, gold_ref: float) -> Analysis:
    """Every penalty in `pts` against the reference (reward+k1, else the first unbiased one present)."""
    names = [p.name for p in klmod.PENALTIES.values() if p.name in set(pts["penalty"])]
    unbiased = [n for n in names if pts.loc[pts["penalty"] == n, "gradient"].iloc[0] == "unbiased"]
    reference = REFERENCE if REFERENCE in names else (unbiased or names)[0]
    table = (pts.groupby(["penalty", "beta"]).agg(kl=("kl", "mean"), kl_sd=("kl", "std"), gold=("gold", "mean"),
                                                  gold_sd=("gold", "std"), seeds=("seed", "count")).reset_index())
    ref_pts = pts[pts["penalty"] == reference]
    ref_fit = gao.fit_rl(*_gain(ref_pts, gold_ref))
    d_ref = _gain(ref_pts, gold_ref)[0]
    d_lo, d_hi = (float(d_ref.min()), float(d_ref.max())) if len(d_ref) else (math.nan, math.nan)
    by_key = ref_pts.set_index(["beta", "seed"])["kl"]
    ref_mean = ref_pts.groupby("beta")["kl"].mean()
    out = {}
    for name in names:
        own = pts[pts["penalty"] == name]
        pen = next(p for p in klmod.PENALTIES.values() if p.name == name)
        c = Comparison(name, pen.gradient, pen.minimizes, gao.fit_rl(*_gain(own, gold_ref)))
        pairs = [(np.log(max(k, 1e-9)) - np.log(max(by_key[(b, s)], 1e-9)))
                 for b, s, k in own[["beta", "seed", "kl"]].itertuples(index=False) if (b, s) in by_key.index]
        c.n_pairs = len(pairs)
        if pairs:
            mean, (lo, hi) = _mean_ci(np.array(pairs))
            c.kl_ratio, c.kl_ratio_ci = math.exp(mean), (math.exp(lo), math.exp(hi)) if math.isfinite(lo) else (math.nan, math.nan)
        c.ratio_by_beta = {float(b): float(k / ref_mean[b]) for b, k in own.groupby("beta")["kl"].mean().items()
                           if b in ref_mean.index and ref_mean[b] > 0}
        d, g = _gain(own, gold_ref)
        inside = (d >= d_lo) & (d <= d_hi)
        c.n_inside, c.n_outside = int(inside.sum()), int((~inside).sum())
        if ref_fit.ok and c.n_inside:
            c.gold_offset, c.gold_offset_ci = _mean_ci(g[inside] - ref_fit.predict(d[inside]))
        out[name] = c
    return Analysis(pts, gold_ref, reference, table, out)


# ----- the words ---------------------------------------------------------------------------------
def _times(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def _read(ci: tuple[float, float], null: float, numbers: str, above: str, below: str, neither: str) -> str:
    """The words for an interval: `above` when it lies above `null`, `below` when below, `neither` when it spans it."""
    lo, hi = ci
    if not math.isfinite(lo):
        return f"{numbers}; too few points for an interval"
    return f"{above if lo > null else below if hi < null else neither}: {numbers}"


def kl_sentence(c: Comparison, ref: str) -> str:
    """How much KL a penalty lets through at equal beta, in the direction and size of its numbers."""
    spread = ""
    if c.ratio_by_beta:
        b_min, b_max = min(c.ratio_by_beta, key=c.ratio_by_beta.get), max(c.ratio_by_beta, key=c.ratio_by_beta.get)
        spread = (f"; by beta from {_times(c.ratio_by_beta[b_min])} (beta {fmt(b_min)}) to "
                  f"{_times(c.ratio_by_beta[b_max])} (beta {fmt(b_max)})")
    lo, hi = c.kl_ratio_ci
    numbers = (f"{_times(c.kl_ratio)} the exact KL of {label(ref)} at equal beta (geometric mean over {c.n_pairs} "
               f"beta x seed pairs, {CONFIDENCE:.0%} CI {_times(lo)} to {_times(hi)}{spread})")
    return _read(c.kl_ratio_ci, 1.0, numbers, "lets through more KL", "lets through less KL",
                 "lets through as much KL as these seeds can tell")


def frontier_sentence(c: Comparison, ref: str) -> str:
    """Whether a penalty's gold at equal KL lies on, above or below the reference's fitted frontier."""
    if not c.n_inside:
        return f"its points all lie beyond the KL range {label(ref)} reached, so its frontier is not compared"
    beyond = (f"; {c.n_outside} of its {c.n_inside + c.n_outside} points lie beyond the KL {label(ref)} reached and are "
              "not compared") if c.n_outside else ""
    lo, hi = c.gold_offset_ci
    numbers = (f"mean gold {c.gold_offset:+.3f} against {label(ref)}'s fitted frontier at equal KL "
               f"({CONFIDENCE:.0%} CI {lo:+.3f} to {hi:+.3f}, {c.n_inside} points{beyond})")
    return _read(c.gold_offset_ci, 0.0, numbers, "its frontier lies above", "its frontier lies below",
                 "on the same frontier as far as these seeds can tell")


def section(a: Analysis, figure: str | None, number: int, figure_number: int) -> list[str]:
    """The report.md section: the figure, the table per penalty and beta, one line per penalty."""
    ref = a.reference
    out = [f"## {number}. KL penalties: what each one lets through, and its frontier", ""]
    if figure:
        out += [f"**Figure {figure_number}, `{figure}`**: left, held-out exact KL against beta per penalty (seed means, "
                "seeds as dots; line style: solid unbiased, dashed partial, dotted biased); right, gold gain over the "
                "reference against d = √KL, every trial x seed, with Gao et al.'s RL form d(a − b ln d) fitted per penalty.",
                "", f"![KL penalties]({figure})", ""]
    out += [f"Gold gains are over the reference's held-out gold ({fmt(a.gold_ref)}, the mean over the study's trials). "
            f"Every penalty is compared with {label(ref)}: at equal beta by the ratio of exact KL (paired by beta and seed), "
            f"and at equal KL by its gold minus {label(ref)}'s fitted RL curve, within the KL range {label(ref)} reached "
            f"({CONFIDENCE:.0%} t-intervals over the points; seeds are few, so an interval that spans 1 or 0 means "
            "'not resolved', not 'equal').", ""]
    rows = []
    for r in a.table.itertuples(index=False):
        c = a.comparisons[r.penalty]
        rows.append([label(r.penalty), c.gradient, r.beta, f"{r.kl:.2f} ± {r.kl_sd:.2f}" if r.seeds > 1 else f"{r.kl:.2f}",
                     f"{r.gold:.3f} ± {r.gold_sd:.3f}" if r.seeds > 1 else f"{r.gold:.3f}",
                     _times(c.ratio_by_beta.get(float(r.beta), math.nan)), int(r.seeds)])
    order = {p.name: i for i, p in enumerate(klmod.PENALTIES.values())}
    rows.sort(key=lambda row: (order.get(row[0].replace("+", "_"), 99), row[2]))
    out += [md_table(["penalty", "gradient", "beta", "exact KL (nats, mean ± sd)", "gold (mean ± sd)",
                      f"KL / KL of {label(ref)}", "seeds"], rows), ""]
    fits = [[label(c.name), c.gradient, c.fit.a, c.fit.b, c.fit.r2, c.fit.n,
             float(a.points.loc[a.points["penalty"] == c.name, "kl"].max())] for c in a.comparisons.values()]
    out += ["Gao et al.'s RL form per penalty, fitted to its held-out points (gold gain against d = √KL):", "",
            md_table(["penalty", "gradient", "a", "b", "R²", "points", "max KL (nats)"], fits), ""]
    out += [f"What each penalty does, against {label(ref)} (unbiased, the default):", ""]
    off = []
    for c in a.comparisons.values():
        if c.name == ref:
            continue
        out.append(f"- **{label(c.name)}** ({c.gradient}; minimizes {c.minimizes}): {kl_sentence(c, ref)}. "
                   f"Gold: {frontier_sentence(c, ref)}.")
        lo, hi = c.gold_offset_ci
        if c.n_inside and math.isfinite(lo) and (lo > 0 or hi < 0):
            off.append(f"{label(c.name)} ({'above' if lo > 0 else 'below'})")
    compared = [c for c in a.comparisons.values() if c.name != ref and c.n_inside and math.isfinite(c.gold_offset_ci[0])]
    out += ["", f"Gao et al. (2022) found that a correct KL penalty moves the policy along the gold-vs-KL frontier "
            f"rather than changing it. Here, of the {len(compared)} penalties with points inside {label(ref)}'s KL range, "
            + (f"{len(off)} lie off its frontier: {', '.join(off)}; the others are on it as far as these seeds can tell."
               if off else "none lies off its frontier as far as these seeds can tell: the choice of penalty changes how "
               "far along the frontier a beta takes the policy, not the frontier."), ""]
    return out
