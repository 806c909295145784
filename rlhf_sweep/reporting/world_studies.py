"""Beyond one world: the report section of studies over drawn worlds, a labeler bias x beta, or reward-model size.

This module owns which analysis a study gets (from what it searches), the section `report.report` appends
for it, and the cache audit every such section ends with (every SFT model, RM backbone and RM the runs
used, and how often each was built). The analyses read the trials' own summary.json files
(`world_runs.load_runs`) and live beside it: `drawn_worlds.py` (robustness over drawn worlds),
`labeler_phases.py` (a phase diagram of labeler bias x beta), `rm_scaling.py` (Gao et al.'s forms per RM
size and data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_sweep.reporting import drawn_worlds, labeler_phases, rm_scaling
from rlhf_sweep.reporting.world_runs import artefacts, load_runs
from rlhf_sweep.run import layout
from rlhf_sweep.study.spec import RM_KEYS
from rlhf_sweep.utils.tables import md_table


def kind(spec) -> str | None:
    """Which analysis a study gets, from what it searches: 'worlds', 'phase', 'rm_scaling' or None."""
    names = {p.name for p in spec.space}
    if "world.draw" in names:
        return "worlds"
    if "ppo.beta" in names and any(n.startswith("world.labeler.") for n in names):
        return "phase"
    if names & set(RM_KEYS):
        return "rm_scaling"
    return None


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
        md, files = drawn_worlds.worlds_section(runs, data.out_dir, title)
    elif what == "phase":
        md, files = labeler_phases.phase_section(runs, data.spec, data.out_dir, title)
    else:
        md, files = rm_scaling.scaling_section(data, runs, data.out_dir, title, say)
    md += audit_lines(runs, data.out_dir.parent)
    if notes:
        md += ["Runs missing from the analysis:", "", *[f"- {n}" for n in notes], ""]
    return "\n" + "\n".join(md) + "\n", files
