"""What a study report reads: the study's settings as the sweep stored them, each trial's per-iteration
history (its nested MLflow run, else its summary.json files), the best-of-n baseline (`algo=bon` runs under
OUT/baseline/ or a trial's own directory) with its Gao et al. curve, and the RL fit to one trial's history.

The report (`report.py`) and the analyses of world, phase and RM-scaling studies (`world_studies.py` and the
modules it calls) both read through here; every file is found through rlhf_sweep.run.layout. It only reads
results: it never builds a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_sweep.maths import gao, hypervolume
from rlhf_sweep.run import layout, tracking
from rlhf_sweep.study.spec import StudySpec, load_spec

HISTORY_KEYS = ("gold", "rm", "kl/exact", "len", "filler")


@dataclass
class StudyData:
    """Everything the figures and report.md are made of."""

    name: str
    spec: StudySpec
    storage: str
    out_dir: Path
    study: Any
    trials: pd.DataFrame  # one row per complete trial
    histories: dict[int, pd.DataFrame]  # trial number -> iteration, gold, rm, kl/exact, len, filler
    history_source: str
    tracking_uri: str | None
    parent_run_id: str | None
    counts: dict[str, int]
    bon: pd.DataFrame | None = None
    bon_info: str = ""
    notes: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # markdown of study-specific sections, after the standard four
    hypervolume: hypervolume.StudyHypervolume | None = None


# ----- where the study is --------------------------------------------------------------------------
def spec_of(ostudy, study: str) -> StudySpec:
    """The study's settings as the sweep stored them (so the report matches what ran), else its file."""
    d = ostudy.user_attrs.get("spec")
    if not d:
        return load_spec(study, check_config=False)
    return StudySpec.from_dict(d)


# ----- per-iteration histories ------------------------------------------------------------------------
def _history_from_mlflow(client, run_id: str) -> pd.DataFrame | None:
    cols = {}
    for key in HISTORY_KEYS:
        hist = client.get_metric_history(run_id, key)
        if not hist and key != "filler":
            return None
        cols[key] = {m.step: m.value for m in hist}
    steps = sorted(cols["gold"])  # per-iteration keys; kl/exact also has the held-out value one step later
    return pd.DataFrame({"iteration": steps, **{k: [v.get(s, math.nan) for s in steps] for k, v in cols.items()}})


def _history_from_files(spec: StudySpec, run_dir: str | None) -> pd.DataFrame | None:
    if not run_dir:
        return None
    paths = [p for _, p in layout.seed_summaries(run_dir, spec.seeds)]
    if not all(p.is_file() for p in paths):
        return None
    combined = layout.combine_seeds([layout.read_summary(p) for p in paths], spec.seeds)
    df = pd.DataFrame(combined["history"])
    return df[["iteration", *[k for k in HISTORY_KEYS if k in df]]]


def histories(spec: StudySpec, trials: pd.DataFrame, tracking_uri: str | None) -> tuple[dict[int, pd.DataFrame], str, list[str]]:
    """Per-iteration history of every complete trial: its nested MLflow run, else its summary.json files."""
    notes: list[str] = []
    client = None
    if tracking_uri:
        try:
            client = tracking.client_for(tracking_uri)
        except Exception as e:
            notes.append(f"MLflow at {tracking_uri} could not be opened ({type(e).__name__}); histories read from summary.json")
    out, sources = {}, set()
    for _, r in trials.iterrows():
        h = None
        if client is not None and r["run_id"]:
            try:
                h = _history_from_mlflow(client, r["run_id"])
            except Exception:  # a run id of another tracking store
                h = None
            if h is not None:
                sources.add("MLflow")
        if h is None:
            h = _history_from_files(spec, r["run_dir"])
            if h is not None:
                sources.add(layout.SUMMARY)
        if h is None:
            notes.append(f"trial {int(r['number'])}: no per-iteration history found (neither in MLflow nor in {r['run_dir']})")
            continue
        out[int(r["number"])] = h
    return out, " and ".join(sorted(sources)) or "nowhere", notes


# ----- the best-of-n baseline ------------------------------------------------------------------------
def bon_baseline(out_dir: Path, spec: StudySpec) -> tuple[pd.DataFrame | None, str]:
    """The best-of-n baseline from the study's `algo=bon` runs (study.baselines.run_baseline wrote them into
    OUT/baseline/seed-N/): each run's history is best-of-n' for n' = 1, 2, 4, ..., at the exact KL of the
    empirical distribution of reference samples (kl) beside the bound (kl_bound); averaged over the seeds.
    Returns (frame with n, kl, kl_bound, gold, rm, len, filler; or None, and a line saying what it is)."""
    where = layout.baseline_dir(out_dir)
    runs = layout.seed_summaries(where, spec.seeds)
    runs = [(seed, p) for seed, p in runs if p.is_file()]
    if not runs:
        return None, (f"best-of-n baseline: no runs in {where} (the sweep runs them after its trials; a study swept "
                      f"before they existed, or interrupted, has none): `rlhf-sweep sweep {spec.name}` runs them")
    summaries = [layout.read_summary(p) for _, p in runs]
    seeds = [seed for seed, _ in runs]
    h = pd.DataFrame(layout.combine_seeds(summaries, seeds)["history"])
    df = h.rename(columns={"bon/n": "n", "kl/exact": "kl", "kl/bon_bound": "kl_bound"})[
        ["n", "kl", "kl_bound", "gold", "rm", "len", "filler"]]
    c = summaries[0]["config"]
    info = (f"algo=bon runs in {where}: {c['bon']['samples_per_prompt']} reference samples per held-out prompt, "
            f"{c['eval']['n_prompts']} prompts, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
            "exact KL of the empirical distribution (Beirami et al.), bound log n − (n−1)/n beside it")
    return df, info


def bon_curve(bon: pd.DataFrame) -> dict:
    """The best-of-n baseline as Gao et al.'s curve: d = sqrt(exact KL), the gold and RM gains over n = 1 (the
    reference itself), and the best-of-n form fitted to the gold gain."""
    d = gao.sqrt_kl(bon["kl"].to_numpy())
    gold_gain, rm_gain = bon["gold"].to_numpy() - bon["gold"].iloc[0], bon["rm"].to_numpy() - bon["rm"].iloc[0]
    return {"d": d, "gold_gain": gold_gain, "rm_gain": rm_gain, "fit": gao.fit_kl("bon", bon["kl"].to_numpy(), gold_gain)}


# ----- fits ---------------------------------------------------------------------------------------------
def rl_fit(h: pd.DataFrame, gold_ref: float) -> gao.GaoFit:
    """The RL form fitted to one trial's per-iteration gold gain against d = sqrt(kl/exact)."""
    return gao.fit_kl("rl", h["kl/exact"].to_numpy(dtype=float), h["gold"].to_numpy(dtype=float) - gold_ref)
