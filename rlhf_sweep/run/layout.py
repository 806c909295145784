"""The summary format and the output folder layout: every writer and reader of a run's or a study's files goes through here.

A run directory holds `summary.json` (keys `SUMMARY_KEYS`), `samples.pt` (the raw held-out numbers the
diagnosis reads) and `trajectory.png`. A study's output directory (default `outputs/studies/NAME`) holds
`optuna.journal`, `trials/tNNNN/seed-S/` (one run directory per trial and seed), `baseline/seed-S/` (the
best-of-n baseline) and the report's files. Nothing here imports torch: readers read files, they never
rebuild the pipeline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
SAMPLES = "samples.pt"
TRAJECTORY = "trajectory.png"
SUMMARY_KEYS = ("config", "metrics", "history", "observations", "diagnosis", "timing", "tags")

OUTPUTS = Path("outputs")
JOURNAL = "optuna.journal"
TRIALS_DIR = "trials"
BASELINE_DIR = "baseline"  # OUT/baseline/seed-N/: the study's best-of-n baseline (a trial's own under its trial directory)


class SummaryError(ValueError):
    """A summary.json that is missing, unreadable or not a run's summary; the message is one line naming it."""


# ----- a run directory ----------------------------------------------------------------------------
def summary_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / SUMMARY


def samples_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / SAMPLES


def trajectory_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / TRAJECTORY


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    path = summary_path(run_dir)
    path.write_text(json.dumps(summary, indent=2, default=float))
    return path


def read_summary(where: str | Path) -> dict:
    """A run's summary from its run directory or the file itself; SummaryError (one line) when it is not one."""
    path = Path(where)
    path = path if path.name == SUMMARY else summary_path(path)
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise SummaryError(f"{path} not found; give the directory of a finished run (rlhf-sweep run prints it)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SummaryError(f"{path} is not readable JSON ({type(e).__name__}: {' '.join(str(e).split())[:120]}); rerun the run") from None
    if not isinstance(summary, dict):
        raise SummaryError(f"{path} holds a JSON {type(summary).__name__}, not a run's summary (an object with keys "
                           f"{', '.join(SUMMARY_KEYS)})")
    return summary


def find_summaries(root: str | Path) -> list[Path]:
    """Every summary.json under root, MLflow's artifact copies left out."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for p in root.rglob(SUMMARY) if not {"mlartifacts", "mlruns"} & set(p.parts)]


# ----- a study's output directory -----------------------------------------------------------------
def study_dir(name: str, out: str | Path | None = None) -> Path:
    return Path(out) if out else OUTPUTS / "studies" / name


def journal_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / JOURNAL


def trial_dir(out_dir: str | Path, number: int) -> Path:
    return Path(out_dir) / TRIALS_DIR / f"t{number:04d}"


def seed_dir(run_dir: str | Path, seed: int) -> Path:
    """One seed's run directory inside a trial's (or a baseline's) directory."""
    return Path(run_dir) / f"seed-{seed}"


def baseline_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / BASELINE_DIR


def seed_summaries(run_dir: str | Path, seeds: list[int]) -> list[tuple[int, Path]]:
    return [(s, summary_path(seed_dir(run_dir, s))) for s in seeds]


def study_run_summaries(studies_dir: str | Path) -> Iterator[Path]:
    """Every trial seed's summary under a folder of studies (outputs/studies/*/trials/*/seed-*/summary.json)."""
    yield from sorted(Path(studies_dir).glob(f"*/{TRIALS_DIR}/*/seed-*/{SUMMARY}"))


# ----- many seeds as one ----------------------------------------------------------------------------
def _mean(values: list[Any]) -> float:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def combine_seeds(summaries: list[dict], seeds: list[int]) -> dict:
    """One summary for a trial: metrics and per-iteration history averaged over its seeds."""
    if len(summaries) == 1:
        return summaries[0]
    metrics = {k: _mean([s["metrics"].get(k) for s in summaries]) for k in summaries[0]["metrics"]}
    history = []
    for i in range(min(len(s["history"]) for s in summaries)):
        entries = [s["history"][i] for s in summaries]
        history.append({"iteration": entries[0]["iteration"],
                        **{k: _mean([e.get(k) for e in entries]) for k in entries[0] if k != "iteration"}})
    # a verdict per seed becomes the share of seeds where it holds
    observations = {name: {"value": _mean([float(bool(s["observations"][name]["value"])) for s in summaries])}
                    for name in summaries[0]["observations"]}
    timing = {k: sum(s["timing"].get(k, 0.0) for s in summaries) for k in summaries[0]["timing"]}
    config = json.loads(json.dumps(summaries[0]["config"], default=str))
    config["seed"] = ",".join(map(str, seeds))
    return {"config": config, "metrics": metrics, "history": history, "observations": observations, "timing": timing,
            "tags": summaries[0].get("tags", {})}


def read_samples(run_dir: str | Path) -> dict:
    """samples.pt (torch's own format, so torch loads it) as saved by the pipeline."""
    import torch

    return torch.load(samples_path(run_dir), weights_only=True)
