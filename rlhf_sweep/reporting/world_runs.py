"""The runs of a world, phase or RM-scaling study as rows: each (trial, seed) run read from its own summary.json.

This module owns what the three analyses share: the observations they count (the verdicts, and the two
phase observations read off held-out metrics), one flat row per run (its world, RM and PPO config, metrics,
verdicts, the RM's parameter count and the cached artefacts it used), and the share of the RM's gain that
length explains. Every file is found through rlhf_sweep.run.layout; nothing is rebuilt.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rlhf_sweep.config.draws import DRAW_RANGES
from rlhf_sweep.run import layout

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
MIN_RM_GAIN = 0.25  # RM std units: below it the share of the RM's gain that length explains is a ratio of small numbers


# ----- one run as a row ---------------------------------------------------------------------------
def world_params() -> list[str]:
    """The drawn world parameters as run columns (`world.` + the DRAW_RANGES key; the demo mix as three shares)."""
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
    """One run as a flat row: its config (world, rm, ppo), the RM's parameters, metrics, verdicts and the artefacts it used."""
    c = summary["config"]
    row = {f"world.{k}": v for k, v in _flat(c["world"]).items()}
    row.update({f"rm.{k}": c["rm"].get(k) for k in ("n_pairs", "n_layer", "n_embd")})
    row["rm.n_layer"] = row["rm.n_layer"] or c["model"]["n_layer"]
    row["rm.n_embd"] = row["rm.n_embd"] or c["model"]["n_embd"]
    # one RM of the run's RM size, as the pipeline counted it; None in a summary written before it did
    row["rm.params"] = (summary.get("models") or {}).get("rm_params")
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


def length_share_line(runs: pd.DataFrame) -> str:
    """The share of the RM's gain that length explains, over runs whose RM gain is not tiny (Singhal et al. 2023)."""
    ok = runs[np.isfinite(runs["length_share"])]
    if not len(ok):
        return f"No run has an RM gain above {MIN_RM_GAIN} std units: the length share of the RM's gain is not read."
    q = ok["length_share"].quantile([0.25, 0.5, 0.75])
    return (f"Share of the RM's gain over the reference that length explains (the RM's length slope holding gold fixed x "
            f"the length gain; Singhal et al. 2023 ask the same): median {q[0.5]:.2f} (quartiles {q[0.25]:.2f} to {q[0.75]:.2f}) "
            f"over the {len(ok)} of {len(runs)} runs whose RM gain exceeds {MIN_RM_GAIN} std units.")
