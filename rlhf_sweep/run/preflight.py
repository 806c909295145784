"""What every command checks before it does work: the folders it will write can be written, and the
MLflow tracking store is reachable and takes a write (`tracking.check_store`: one probe of a server,
a short timeout, no retries). A failure is one line naming the thing and the fix, before a run
directory, a study or a store exists. `check_run` reads where `rlhf-sweep run` will write from the
composed `hydra` node (`config.compose.compose_hydra`). The study storage is checked where it is
opened (`study.storage.open_storage`, which reads a journal file through `study.journal` first).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from rlhf_sweep.config.compose import compose_hydra
from rlhf_sweep.config.schema import ConfigError
from rlhf_sweep.run import tracking


class PreflightError(ValueError):
    """Something a command needs is unusable; the message is one line naming it and the fix."""


def unwritable(path: str | Path) -> str | None:
    """Why files cannot be created under `path` (None when they can), without creating `path`:
    a file in the way, or the nearest existing folder refusing a new file."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            return "no existing folder above it"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder" if probe != p else "it is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return f"{probe} refuses new files ({e.strerror or type(e).__name__})"
    return None


def check(tracking_uri: str | None = None, tracking_label: str = "mlflow.tracking_uri",
          dirs: dict[str, str | Path] | None = None) -> None:
    """Raise PreflightError unless every folder in `dirs` (label -> path) can be written and
    `tracking_uri` (when given) takes runs. Folders first: a new SQLite store is created by the probe."""
    for label, path in (dirs or {}).items():
        why = unwritable(path)
        if why:
            raise PreflightError(f"cannot write to {label} {os.fspath(path)}: {why}; choose a folder you can write to")
    if tracking_uri:
        why = tracking.check_store(tracking_uri, tracking_label)
        if why:
            raise PreflightError(why)


def check_run(overrides: list[str], multirun: bool) -> None:
    """`rlhf-sweep run`'s checks, before Hydra makes a run directory: where it will write (hydra.run.dir,
    or hydra.sweep.dir for --multirun), cache_dir, and mlflow.tracking_uri when mlflow.enabled.
    A --multirun is read with its sweeps (seed=0,1,2, range(...)) left out: what every job shares."""
    try:
        raw = compose_hydra(overrides, without_sweeps=multirun)
    except ConfigError:
        return  # an override that only composes job by job: Hydra's own run reports it
    out_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    uri = OmegaConf.select(raw, "mlflow.tracking_uri") if OmegaConf.select(raw, "mlflow.enabled") else None
    check(str(uri) if uri else None, "mlflow.tracking_uri",
          {out_key: str(OmegaConf.select(raw, out_key)), "cache_dir": str(OmegaConf.select(raw, "cache_dir"))})
