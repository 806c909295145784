"""Study reports: `rlhf-sweep report STUDY`, also run at the end of every sweep.

This module owns the report of a study and `report.md`:
- the trials from the Optuna storage (objectives, params, the seed-averaged metrics each
  trial stored) as one frame, with its Pareto fronts; the histories and the best-of-n
  baseline it reads through `study_data.py` (results only: it never builds a model);
- when the trials span several algorithms (`algo`): every algorithm's frontier on one figure
  and a table of best gold, its KL, and gold at fixed KL budgets;
- Gao et al. fits (RL form per trial, best-of-n form on the baseline; rlhf_sweep.maths.gao),
  PED-ANOVA importances, the hypervolume after each trial;
- the figures (drawn by `plots.py`), `report.md` with the sections of KL-penalty studies
  (`kl_penalties.py`) and of world, phase and RM-scaling studies (`world_studies.py`), and
  their upload as artifacts of the study's MLflow parent run.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from rlhf_sweep.config import algorithms
from rlhf_sweep.maths import gao, hypervolume
from rlhf_sweep.reporting import kl_penalties, plots, world_studies
from rlhf_sweep.reporting.study_data import StudyData, bon_baseline, bon_curve, histories, rl_fit, spec_of
from rlhf_sweep.run import preflight, tracking
from rlhf_sweep.study.spec import StudyError, StudySpec
from rlhf_sweep.study.storage import hide_password, load_study
from rlhf_sweep.utils.tables import fmt, md_table

MAX_CURVES = 6  # trials drawn in the over-optimization figure
MIN_IMPORTANCE_TRIALS = 10  # PED-ANOVA compares the top 10% of trials with all: fewer is noise
HV_SHARE = 0.9  # the report says after how many trials the study's hypervolume reached this share of its final value
HV_MOVING = 0.05  # a last quarter of the trials that added this share of the final hypervolume or more: the front still moved

# keys whose change alters the reference or the RM: the best-of-n baseline cannot follow them
MODEL_KEYS = ("world.", "model", "sft.", "rm.")

FIGURES = {
    "pareto": "Pareto frontier: gold and RM score against exact KL, every trial colored by β, the non-dominated front "
              "as a line, and the best-of-n baseline at its exact KL (hollow: where the bound log n − (n−1)/n puts it)",
    "algorithms": "Algorithms: gold and RM score against exact KL, one colour per algorithm (its trials joined in KL "
                  "order), Gao et al.'s fit per algorithm, the best-of-n baseline path, and the KL budgets of the table",
    "overoptimization": "Over-optimization: per-iteration gold and RM gain against d = √KL for chosen trials, "
                        "with Gao et al.'s RL form fitted to gold and the best-of-n form fitted to the best-of-n curve",
    "length_filler": "Length and filler tokens against KL: held-out values per trial, per-iteration paths of the chosen "
                     "trials, and what best-of-n selection does to them",
    "importance": "Hyperparameter importances per objective (Optuna's PED-ANOVA)",
    "slices": "Slices: each objective against each searched knob, one point per complete trial",
    "kl_placement": "KL penalties: exact KL against beta per penalty, and gold against KL with Gao et al.'s RL form per penalty",
    "hypervolume": "Hypervolume after each trial: the area of the objective plane the front dominates up to the "
                   "reference point, as the trials finished; labels name the trials that moved the front",
}


# ----- the trials ------------------------------------------------------------------------------------
def non_dominated(kl: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Mask of points not dominated in (value up, KL down): no other point has KL <= and value >=, one strictly."""
    kl, value = np.asarray(kl, dtype=float), np.asarray(value, dtype=float)
    out = np.ones(len(kl), dtype=bool)
    for i in range(len(kl)):
        better = (kl <= kl[i]) & (value >= value[i]) & ((kl < kl[i]) | (value > value[i]))
        out[i] = not better.any()
    return out


# each algorithm's KL knob, as its runs record it in their metrics (the registry's cards)
ALGO_KNOB = algorithms.knob_metrics()
# algorithms that train nothing pick from reference samples: Gao et al.'s best-of-n form fits them, the RL form the rest
SELECTS_ONLY = {a.name for a in algorithms.registered() if not a.trains}


def _beta(t) -> float:
    if "ppo.beta" in t.params:
        return float(t.params["ppo.beta"])
    m = t.user_attrs.get("metrics") or {}
    return float(next((v for k, v in m.items() if k.endswith("/beta") and v is not None), math.nan))


def trial_frame(spec: StudySpec, ostudy) -> pd.DataFrame:
    """One row per complete trial: number, params, objective values, beta and the held-out metrics."""
    complete = ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pareto = {t.number for t in ostudy.best_trials} if complete else set()
    rows = []
    for t in complete:
        m = t.user_attrs.get("metrics") or {}
        cons = t.constraints
        algo = str(t.params.get("algo", spec.fixed.get("algo", "ppo")))
        row = {"number": t.number, "algo": algo, "knob": m.get(ALGO_KNOB.get(algo, "ppo/beta")),
               "seconds": t.user_attrs.get("seconds"), "beta": _beta(t), "pareto": t.number in pareto,
               "feasible": all(v <= 0 for v in cons.values()) if cons else True,
               "kl": m.get("kl/exact"), "gold": m.get("gold/policy"), "rm": m.get("rm/policy"),
               "len": m.get("len/policy"), "filler": m.get("filler/policy"),
               "gold_ref": m.get("gold/ref"), "rm_ref": m.get("rm/ref"), "len_ref": m.get("len/ref"),
               "filler_ref": m.get("filler/ref"), "run_id": t.user_attrs.get("mlflow_run_id"),
               "run_dir": t.user_attrs.get("run_dir"), "threads": t.user_attrs.get("threads")}
        row.update({name: t.params.get(name) for name in spec.param_names})
        row.update({o.metric: v for o, v in zip(spec.objectives, t.values, strict=True)})
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        for c in ("kl", "gold", "rm", "len", "filler", "gold_ref", "rm_ref", "len_ref", "filler_ref"):
            df[c] = df[c].astype(float)
        feas = df["feasible"].to_numpy()
        for key in ("gold", "rm"):
            mask = np.zeros(len(df), dtype=bool)
            mask[feas] = non_dominated(df.loc[feas, "kl"].to_numpy(), df.loc[feas, key].to_numpy())
            df[f"front_{key}"] = mask
    return df


# ----- algorithms -------------------------------------------------------------------------------------
BUDGETS = (1.0, 3.0, 10.0)  # KL budgets (nats) of the algorithms table


def algo_frontier(kl: np.ndarray, gold: np.ndarray, gold_ref: float) -> tuple[np.ndarray, np.ndarray]:
    """An algorithm's gold frontier: its non-dominated trials (no other has less KL and more gold) with the
    reference (KL 0, gold_ref) in front, sorted by KL. Gold never falls along it: a budget can always be
    spent on less KL."""
    kl = np.concatenate([[0.0], np.asarray(kl, dtype=float)])
    gold = np.concatenate([[gold_ref], np.asarray(gold, dtype=float)])
    keep = non_dominated(kl, gold)
    order = np.argsort(kl[keep], kind="stable")
    return kl[keep][order], gold[keep][order]


def gold_at_budget(kl: np.ndarray, gold: np.ndarray, gold_ref: float, budget: float) -> float:
    """Gold reachable with at most `budget` nats: linear interpolation in KL between the two frontier points
    around it (a mixture of the two policies reaches that gold at no more KL, since KL is convex); NaN
    when no trial reached the budget (what more KL would buy is unknown)."""
    if not len(kl) or budget > float(np.max(kl)):
        return math.nan
    fk, fg = algo_frontier(kl, gold, gold_ref)
    return float(np.interp(budget, fk, fg))


def algorithm_rows(df: pd.DataFrame, budgets: tuple[float, ...] = BUDGETS) -> tuple[list[list], dict[str, gao.GaoFit]]:
    """Per algorithm: trials, knob range, best gold and its KL and knob, gold at each budget, Gao et al.'s
    fit (best-of-n form for bon, RL form otherwise) on the trials' held-out end points, wall time."""
    rows, fits = [], {}
    for algo, g in df.groupby("algo", sort=False):
        g = g.sort_values("kl")
        ref = float(g["gold_ref"].mean())
        fit = gao.fit_kl("bon" if algo in SELECTS_ONLY else "rl", g["kl"].to_numpy(dtype=float), g["gold"].to_numpy(dtype=float) - ref)
        fits[algo] = fit
        best = g.loc[g["gold"].idxmax()]
        peak = fit.peak(math.sqrt(float(g["kl"].max()))).kl_text() if fit.ok else "n/a"
        falls = bool(best["kl"] < g["kl"].max() and g.iloc[-1]["gold"] < best["gold"])
        knobs = g["knob"].dropna()
        rows.append([algo, len(g), f"{float(knobs.min()):g}…{float(knobs.max()):g}" if len(knobs) else "",
                     float(best["gold"]), float(best["kl"]), f"{float(best['knob']):g}" if best["knob"] is not None else "",
                     *[gold_at_budget(g["kl"].to_numpy(), g["gold"].to_numpy(), ref, b) for b in budgets],
                     f"{fit.form}: {fit.label()}", peak, "yes" if falls else "no",
                     float(g["seconds"].astype(float).sum()) / 60])
    return rows, fits


def write_report(name: str, storage: str, uri: str | None, out_dir: Path) -> None:
    """The study's figures and report.md at the end of `rlhf-sweep sweep`. A failure is one warning
    line: the study is stored either way, and `rlhf-sweep report` can redo it."""

    try:
        print(f"report: {report(name, storage=storage, tracking_uri=uri, out=str(out_dir))}", flush=True)
    except (Exception, KeyboardInterrupt) as e:
        print(f"warning: the study report failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
              f"the study is intact: `rlhf-sweep report {name} --storage {hide_password(storage)} --out {out_dir}` retries it", flush=True)


# ----- chosen trials and importances ---------------------------------------------------------------------------
def choose_trials(df: pd.DataFrame, have: set[int]) -> list[int]:
    """Trials for the over-optimization figure: front members spread over KL, plus the lowest and highest beta."""
    df = df[df["number"].isin(have)]
    if not len(df):
        return []
    front = df[df["front_gold"]].sort_values("kl")
    picks = []
    if len(front):
        idx = np.unique(np.linspace(0, len(front) - 1, min(len(front), MAX_CURVES - 2)).round().astype(int))
        picks += [int(front.iloc[i]["number"]) for i in idx]
    by_beta = df.dropna(subset=["beta"]).sort_values("beta")
    if len(by_beta):
        picks += [int(by_beta.iloc[0]["number"]), int(by_beta.iloc[-1]["number"])]
    picks = list(dict.fromkeys(picks))[:MAX_CURVES]
    beta = dict(zip(df["number"], df["beta"], strict=True))
    return sorted(picks, key=lambda n: (beta.get(n, math.nan), n))


def param_importances(ostudy, spec: StudySpec, n_complete: int) -> tuple[dict[str, dict[str, float]], list[str]]:
    """PED-ANOVA importances of the searched knobs per objective, or notes saying why not."""
    if spec.trials:
        return {}, ["importances: not computed, the study runs planned trials (no search whose knobs could matter)"]
    if len(spec.space) < 2:
        return {}, [f"importances: only one knob ({spec.space[0].name}) is searched, so its importance is trivially 1"]
    if n_complete < MIN_IMPORTANCE_TRIALS:
        return {}, [f"importances: not computed, {n_complete} complete trials (PED-ANOVA needs at least "
                    f"{MIN_IMPORTANCE_TRIALS}; run the study with more trials, e.g. `--n-trials {MIN_IMPORTANCE_TRIALS}`)"]
    out, notes = {}, []
    for i, o in enumerate(spec.objectives):
        sign = -1.0 if o.direction == "maximize" else 1.0  # PED-ANOVA scores the importance of reaching LOW targets

        def target(t, i=i, sign=sign) -> float:
            return sign * t.values[i]

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out[o.metric] = dict(optuna.importance.get_param_importances(
                    ostudy, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target=target))
            except Exception as e:
                notes.append(f"importances of {o.metric}: not computed ({type(e).__name__}: {e})")
        for w in caught:
            if "too small" in str(w.message):
                notes.append(f"importances of {o.metric}: Optuna says {str(w.message).split('.')[0].lower()}; read them as rough")
    return out, notes


# ----- report.md ---------------------------------------------------------------------------------------
def _figure(files: dict[str, str], key: str, number: int) -> str:
    if key not in files:
        return ""
    name = Path(files[key]).name
    return f"**Figure {number}, `{name}`**: {FIGURES[key]}.\n\n![{FIGURES[key].split(':')[0]}]({name})\n"


# gao.GaoFit.peak's rule in words, for the sections whose tables follow it
PEAK_RULE = (f"A fitted peak is printed only where the data identify it: R² at least {gao.R2_FLOOR:g} and b's "
             f"{gao.CONFIDENCE:.0%} interval lying above 0 (the curve surely turns down). Its KL interval is Fieller's "
             "interval for a/b mapped through d*; it treats the points as independent, which a PPO run's per-iteration "
             "points are not, so there it is narrower than the truth. \"inside\": the whole interval lies within the KL "
             "the curve reached (the fitted gold rises, then falls), with the fitted gain there (\"fitted peak Δh\"; a "
             "tiny peak at a tiny KL means gold only fell); \"beyond the reached KL\": the whole interval lies past it "
             "(only its lower end is printed: the rest is extrapolation); \"not identified\": R² below the floor, b's "
             "interval not above 0, or the peak's interval straddling the reached KL.")


def fit_row(label: str, knob_values: list, kl_max: float, f: gao.GaoFit) -> list:
    """A row of the Gao fits' table: the curve, its knobs, its reach, a, b, R², then the peak's KL (with its
    interval) and fitted gain only where gao identifies the peak, and its status words."""
    peak = f.peak(math.sqrt(kl_max))
    return [label, *knob_values, kl_max, f.a, f.b, f.r2, peak.kl_text() if f.ok else "n/a",
            peak.gain if peak.inside else "", peak.status if f.ok else "no fit"]


def peak_count_sentence(statuses: list[str]) -> str:
    """How many of the table's fits identify a peak inside, beyond, or none: the sentence follows the table."""
    n = {s: statuses.count(s) for s in (gao.INSIDE, gao.BEYOND, gao.NOT_IDENTIFIED, "no fit")}
    return (f"Of {len(statuses)} fits, {n[gao.INSIDE]} identify a peak inside the KL they reached, {n[gao.BEYOND]} one "
            f"beyond it, and {n[gao.NOT_IDENTIFIED]} none" + (f" ({n['no fit']} had too few points to fit)" if n["no fit"] else "")
            + ".")


def write_markdown(data: StudyData, files: dict[str, str], fits: dict[int, gao.GaoFit], bon_fit: gao.GaoFit | None,
                   study_fit: gao.GaoFit, imps: dict[str, dict[str, float]]) -> str:
    s, df = data.spec, data.trials
    knobs = s.param_names
    out = [f"# Study report: {data.name}", ""]
    if s.description:
        out += [s.description, ""]
    settings = [
        ["objectives", ", ".join(f"{o.metric} ({o.direction})" for o in s.objectives)],
        ["search space", "; ".join(f"{p.name}: " + (f"{p.choices}" if p.kind == "categorical" else
                                                    f"{p.kind} [{fmt(p.low)}, {fmt(p.high)}]" + (" log" if p.log else ""))
                                   for p in s.space) or f"none: {len(s.trials)} planned trials over {', '.join(knobs)}"],
        ["fixed", ", ".join(f"{k}={v}" for k, v in s.fixed.items()) or "none"],
        ["constraints", "; ".join(c.text for c in s.constraints) or "none"],
        ["seeds per trial", f"{len(s.seeds)} ({'seed' if len(s.seeds) == 1 else 'seeds'} {', '.join(map(str, s.seeds))})"],
        ["sampler", f"{s.sampler} (seed {s.sampler_seed}" + (f", {s.sampler_options}" if s.sampler_options else "") + ")"],
        ["trials", f"{data.counts['complete']} complete of {s.n_trials} asked, {data.counts['failed']} failed, "
                   f"{data.counts['running']} running"],
        ["study file", s.path],
        ["Optuna storage", data.storage],
        ["MLflow", f"{data.tracking_uri} (parent run {data.parent_run_id})" if data.tracking_uri else "off"],
        ["per-iteration histories from", data.history_source],
        ["best-of-n baseline", data.bon_info or "not computed"],
        ["written", time.strftime("%Y-%m-%d %H:%M:%S %Z")],
    ]
    out += ["## Settings", "", md_table(["setting", "value"], settings), ""]

    # 1. the front
    out += ["## 1. Pareto frontier", "", _figure(files, "pareto", 1)]
    best = df[df["pareto"]].sort_values(s.objectives[0].metric, ascending=s.objectives[0].direction == "minimize")
    obj_cols = [o.metric for o in s.objectives]
    # the objectives, then the headline metrics that are not objectives
    headline = {"gold/policy": "gold", "rm/policy": "rm", "kl/exact": "kl", "len/policy": "len"}
    shown = list(dict.fromkeys([*obj_cols, *headline]))
    cols = ["number", *knobs, *[headline.get(m, m) for m in shown]]
    heads = ["trial", *knobs, *[m + (" (nats)" if m == "kl/exact" else "") for m in shown]]
    feas = f", satisfying {'; '.join(c.text for c in s.constraints)}" if s.constraints else ""
    out += [f"Pareto-optimal trials (Optuna's `best_trials`{feas}): {len(best)} of {len(df)} complete.", ""]
    out += [md_table(heads, [[int(r["number"]), *[r[c] for c in cols[1:]]] for _, r in best.iterrows()]) if len(best) else "_none_", ""]
    out += ["Best trial per objective:", ""]
    rows = []
    for o in s.objectives:
        cand = df[df["feasible"]] if df["feasible"].any() else df
        r = cand.loc[cand[o.metric].idxmax() if o.direction == "maximize" else cand[o.metric].idxmin()]
        rows.append([f"{o.metric} ({o.direction})", int(r["number"]), *[r[k] for k in knobs], *[r[m] for m in obj_cols]])
    out += [md_table(["objective", "trial", *knobs, *obj_cols], rows), ""]
    if data.bon is not None:
        ref = df[["gold_ref", "rm_ref", "len_ref"]].mean()
        out += [f"Best-of-n baseline ({data.bon_info}; the RM picks, gold judges). The exact KL is at most the bound and "
                "saturates where the reference's answers repeat (at −log of the RM's favourite's probability). "
                f"The trials' reference on their evaluation prompts: gold {fmt(ref['gold_ref'])}, RM {fmt(ref['rm_ref'])}, "
                f"length {fmt(ref['len_ref'])}.", ""]
        out += [md_table(["n", "KL exact (nats)", "KL bound (nats)", "gold", "RM", "length", "filler"],
                         [[int(r.n), r.kl, r.kl_bound, r.gold, r.rm, r.len, r.filler] for r in data.bon.itertuples()]), ""]

    # 2. Gao fits
    out += ["## 2. Over-optimization and Gao et al. fits", "", _figure(files, "overoptimization", 2)]
    out += ["Gold gain Δh = gold − gold/ref against d = √KL (KL: exact, nats). RL form d(a − b ln d) per trial on its "
            "per-iteration points (and across trials on their held-out end points), peak at d* = exp(a/b − 1); best-of-n "
            "form d(a − b d) on the best-of-n curve, peak at d* = a/(2b). " + PEAK_RULE, ""]
    blank = [""] * len(knobs)
    rows = []
    if bon_fit is not None:
        rows.append(fit_row(f"best-of-n (n = 1…{int(data.bon['n'].max())}, exact KL)", blank, float(data.bon["kl"].max()), bon_fit))
    rows.append(fit_row("all trials, held-out end points", blank, float(df["kl"].max()), study_fit))
    for _, r in df.sort_values("beta").iterrows():
        f = fits.get(int(r["number"]))
        if f is not None:
            reach = float(np.nanmax(data.histories[int(r["number"])]["kl/exact"]))
            rows.append(fit_row(f"trial {int(r['number'])}", [r[k] for k in knobs], reach, f))
    out += [md_table(["curve", *knobs, "max KL (nats)", "a", "b", "R²", f"peak KL = d*² (nats) [{gao.CONFIDENCE:.0%} CI]",
                      "fitted peak Δh", "peak"], rows), "", peak_count_sentence([row[-1] for row in rows]), ""]

    # 3. length and filler
    out += ["## 3. Length and filler", "", _figure(files, "length_filler", 3)]

    # 4. knobs
    out += ["## 4. Hyperparameters", ""]
    if imps:
        params = list(dict.fromkeys(p for v in imps.values() for p in v))
        out += [md_table(["objective", *params], [[o, *[v.get(p, math.nan) for p in params]] for o, v in imps.items()]), ""]
    out += [_figure(files, "importance", 4), _figure(files, "slices", 5 if "importance" in files else 4)]

    out += data.sections
    if "algorithms" in files:
        out += algorithms_markdown(df, files)
    out += hypervolume_section(data, files)

    if data.notes:
        out += ["## Notes", "", *[f"- {n}" for n in data.notes], ""]
    return "\n".join(x for x in out if x is not None) + "\n"


def reference_text(spec: StudySpec, hv: hypervolume.StudyHypervolume) -> str:
    return ", ".join(f"{o.metric} {'≥' if o.direction == 'maximize' else '≤'} {fmt(v)}"
                     for o, v in zip(spec.objectives, hv.reference, strict=True))


def hypervolume_section(data: StudyData, files: dict[str, str]) -> list[str]:
    """report.md: the study's hypervolume after each trial, its reference point, and whether the budget was enough."""
    s, hv = data.spec, data.hypervolume
    if hv is None:
        return ["## Hypervolume after each trial", "",
                f"Not computed: the hypervolume is drawn for one or two objectives, this study has {len(s.objectives)}.", ""]
    number = sum(k in files for k in FIGURES if k != "hypervolume") + 1
    out = ["## Hypervolume after each trial", "", _figure(files, "hypervolume", number)]
    out += [f"Reference point: {reference_text(s, hv)} (" + "; ".join(hv.sources) + "). A trial adds area only where it "
            "beats the reference point on every objective; infeasible trials add none. Set `reference_point` in the study "
            "file to fix it (rlhf_sweep/maths/hypervolume.py has the default rule).", ""]
    n, final = len(hv.values), hv.final
    if final <= 0:
        out += [f"No complete trial beat the reference point on every objective: the hypervolume is 0 after all {n} trials.", ""]
        return out
    hit = hypervolume.trials_to_share(hv.values, final, HV_SHARE)
    tail = max(1, n // 4)
    before = hv.values[n - tail - 1] if n > tail else 0.0
    gain = (final - before) / final
    out += [f"Final hypervolume {fmt(final)} after {n} complete trials; {HV_SHARE:.0%} of it was reached after trial "
            f"{hit} of {n}. The last {f'{tail} trials' if tail > 1 else 'trial'} added {gain:.0%} of the final hypervolume"
            + (": the front was still moving, and more trials may move it further." if gain >= HV_MOVING else
               ": the front had settled for this sampler and budget.") + " (Values per trial: the `hypervolume` column of "
            "`trials.csv`.)", ""]
    return out


def algorithms_markdown(df: pd.DataFrame, files: dict[str, str]) -> list[str]:
    """The algorithms section: its figure and, per algorithm, best gold, its KL, gold at the KL budgets."""
    rows, _ = algorithm_rows(df)
    number = sum(1 for k in FIGURES if k in files and k not in ("algorithms", "hypervolume")) + 1
    return ["## Algorithms: one frontier each", "", _figure(files, "algorithms", number),
            "Per algorithm, over its KL knob (β; n for best-of-n), each trial averaged over its seeds. \"gold at B nats\": "
            "the algorithm's gold frontier (its trials that no other of its trials beats with less KL, and the reference at "
            "KL 0) interpolated linearly in KL at B, what a mixture of its two neighbouring policies reaches at no more KL "
            "(KL is convex); n/a when none of its trials reached B. \"falls\": its highest-KL trial has less gold than its "
            "best (gold rose, then fell). The Gao et al. fit is on the trials' held-out end points (gain over the "
            "reference against d = √KL); its peak KL d*² is printed only where the data identify it (see the Gao fits' "
            "section).", "",
            md_table(["algorithm", "trials", "knob", "best gold", "at KL (nats)", "knob there",
                      *[f"gold at {b:g} nats" for b in BUDGETS], "Gao fit", "fitted peak KL", "falls", "wall (min)"], rows), ""]


def kl_penalty_section(data: StudyData, files: dict[str, str], gold_ref: float, title: str) -> None:
    """A study of KL penalties: what each lets through at equal beta, and its frontier (figure, section, notes)."""
    pts, notes = kl_penalties.points(data.spec, data.study)
    data.notes += notes
    if not len(pts):
        return
    a = kl_penalties.analyse(pts, gold_ref)
    files["kl_placement"] = plots.kl_placement(
        a.table, a.points, {n: c.fit for n, c in a.comparisons.items()},
        {n: f"{kl_penalties.label(n)} ({c.gradient})" for n, c in a.comparisons.items()}, a.gold_ref,
        data.out_dir / "kl_placement.png", title=title)
    data.sections += kl_penalties.section(a, Path(files["kl_placement"]).name, 5, 6 if "importance" in files else 5)


# ----- the report ---------------------------------------------------------------------------------------
def report(study: str, storage: str | None = None, tracking_uri: str | None = None, out: str | None = None,
           say=print) -> str:
    """Write the figures and report.md of a study into its output directory; returns report.md's path.

    study: a name in studies/, a study YAML path, or the --name a sweep used. storage and out
    default as in `sweep` (OUT/optuna.journal, outputs/studies/NAME). tracking_uri defaults to
    the one the sweep logged to. The files are also logged to the study's MLflow parent run.
    """
    ostudy, name, storage, out_dir = load_study(study, storage, out)
    spec = spec_of(ostudy, study)
    all_trials = ostudy.get_trials(deepcopy=False)
    counts = {k: sum(t.state == state for t in all_trials)
              for k, state in (("complete", TrialState.COMPLETE), ("failed", TrialState.FAIL), ("running", TrialState.RUNNING))}
    if not counts["complete"]:
        raise StudyError(f"study {name!r} in {storage} has no complete trial yet; run `rlhf-sweep sweep {study}` first")
    stored_uri = ostudy.user_attrs.get("mlflow_tracking_uri")
    uri = tracking_uri or stored_uri
    try:  # a dead server would cost minutes of MLflow's retries per trial history
        preflight.check(uri, "--tracking-uri" if tracking_uri else "the study's tracking URI", {"--out": out_dir})
    except preflight.PreflightError as e:
        raise StudyError(str(e)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    parent = ostudy.user_attrs.get("mlflow_parent_run_id") if uri and uri == stored_uri else None

    df = trial_frame(spec, ostudy)
    hist, source, notes = histories(spec, df, uri)
    data = StudyData(name=name, spec=spec, storage=storage, out_dir=out_dir, study=ostudy, trials=df, histories=hist,
                     history_source=source, tracking_uri=uri, parent_run_id=parent, counts=counts, notes=notes)
    if any(p.name.startswith(MODEL_KEYS) for p in spec.space):
        data.notes.append("the study searches knobs that change the reference or the RM; the best-of-n baseline uses the "
                          "study's fixed config with those knobs at their defaults")

    data.bon, data.bon_info = bon_baseline(out_dir, spec)
    if data.bon is None:
        data.notes.append(data.bon_info)

    ref = {"gold": float(df["gold_ref"].mean()), "rm": float(df["rm_ref"].mean()),
           "len": float(df["len_ref"].mean()), "filler": float(df["filler_ref"].mean())}
    title = f"study {name}: {len(df)} complete trials"
    files: dict[str, str] = {}
    files["pareto"] = plots.pareto(df, data.bon, out_dir / "pareto.png", ref=ref, title=title)

    # over-optimization: fits per trial, curves for a few
    fits = {n: rl_fit(h, float(df.loc[df["number"] == n, "gold_ref"].iloc[0])) for n, h in hist.items()}
    chosen = choose_trials(df, set(hist))
    colors = plots.trial_colors(len(chosen))
    curves = []
    for n, color in zip(chosen, colors, strict=True):
        r, h = df[df["number"] == n].iloc[0], hist[n]
        d = gao.sqrt_kl(h["kl/exact"].to_numpy(dtype=float))
        role = "front" if r["front_gold"] else "β extreme"
        knob = f"β={r['beta']:.3g}" if r["algo"] == "ppo" else f"{r['algo']} {ALGO_KNOB.get(r['algo'], 'knob').split('/')[-1]}={r['knob']:.3g}"
        curves.append({"label": f"t{n} {knob} ({role})", "color": color, "d": d, "kl": d**2,
                       "gold_gain": h["gold"].to_numpy(dtype=float) - r["gold_ref"],
                       "rm_gain": h["rm"].to_numpy(dtype=float) - r["rm_ref"],
                       "len": h["len"].to_numpy(dtype=float), "filler": h["filler"].to_numpy(dtype=float), "fit": fits[n]})
    baseline = bon_curve(data.bon) if data.bon is not None else None
    bon_fit = baseline["fit"] if baseline is not None else None
    study_fit = gao.fit_kl("rl", df["kl"].to_numpy(), (df["gold"] - df["gold_ref"]).to_numpy())
    study_points = {"d": gao.sqrt_kl(df["kl"].to_numpy()), "gold_gain": (df["gold"] - df["gold_ref"]).to_numpy(),
                    "rm_gain": (df["rm"] - df["rm_ref"]).to_numpy(), "fit": study_fit}
    files["overoptimization"] = plots.overoptimization(curves, baseline, out_dir / "overoptimization.png", title=title,
                                                       trials=study_points)
    files["length_filler"] = plots.length_filler(df, curves, data.bon, out_dir / "length_filler.png", ref=ref, title=title)

    if df["algo"].nunique() > 1:
        _, algo_fits = algorithm_rows(df)
        files["algorithms"] = plots.algorithms(
            {a: g[["kl", "gold", "rm"]] for a, g in df.groupby("algo", sort=False)}, algo_fits, out_dir / "algorithms.png",
            baseline=data.bon, ref={"gold": ref["gold"], "rm": ref["rm"]}, budgets=BUDGETS, title=title)

    imps, imp_notes = param_importances(ostudy, spec, len(df))
    data.notes += imp_notes
    if imps:
        files["importance"] = plots.importances(imps, out_dir / "importance.png", title=title)
    params = [(p.name, p.log, p.kind == "categorical") for p in spec.space]
    if params and not spec.trials:  # planned trials: each sets its own keys, nothing to slice along
        files["slices"] = plots.slices(df, [(o.metric, o.direction) for o in spec.objectives], params, out_dir / "slices.png",
                                       title=title)
    if kl_penalties.searched(spec):
        kl_penalty_section(data, files, ref["gold"], title)
    data.hypervolume = hypervolume.study_hypervolume(spec, all_trials)
    if data.hypervolume is not None:
        files["hypervolume"] = plots.hypervolume_curve(data.hypervolume.values, data.hypervolume.numbers,
                                                       out_dir / "hypervolume.png", objectives=[o.metric for o in spec.objectives],
                                                       reference=reference_text(spec, data.hypervolume),
                                                       share=HV_SHARE, title=f"{title}: hypervolume after each trial")
    # figures of an earlier report that this one did not draw would be stale
    for key in FIGURES:
        stale = out_dir / f"{key}.png"
        if key not in files and stale.exists():
            stale.unlink()

    md = out_dir / "report.md"
    text = write_markdown(data, files, fits, bon_fit, study_fit, imps)
    # studies over drawn worlds, a labeler bias x beta, or reward-model size get their own analyses
    try:
        extra, extra_files = world_studies.section(data, lambda msg: None if ": cached" in msg else say(f"report: {msg}"))
    except Exception as e:  # the generic report is still worth having
        say(f"report: the world analyses failed: {type(e).__name__}: {e}")
        extra, extra_files = f"\n## World analyses\n\nnot computed: {type(e).__name__}: {e}\n", {}
    files.update(extra_files)
    md.write_text(text + extra)
    if uri and parent:
        try:
            client = tracking.client_for(uri)
            for path in [*files.values(), str(md)]:
                client.log_artifact(parent, path, artifact_path="report")
        except Exception as e:
            say(f"report: could not log the report to MLflow run {parent}: {type(e).__name__}: {e}")
    return str(md)
