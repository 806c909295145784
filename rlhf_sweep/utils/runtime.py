"""What a process sets up before work and shares with its siblings: quiet libraries, worker
thread counts, and file locks (a sweep's storage, each cached artefact)."""

from __future__ import annotations

import fcntl
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def quiet_libraries() -> None:
    """Keep transformers' and MLflow's chatter out of our tables (env vars: call before importing them)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # hides "Creating initial MLflow database tables..." and the like
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # a tracking server's client prints "View run ... at: URL" per run: one line per run is ours to print
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # a store that fails mid-run: MLflow logs the database's traceback at ERROR before raising; the caller
    # turns the exception into its one line, so the traceback is noise
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=".*attention_mask.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def cores() -> int:
    """The cores this process may run on (a SLURM or taskset allotment, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_worker_threads(n: int) -> None:
    """In a fresh worker process, before torch starts its pools: n threads for OpenMP and MKL too
    (two one-thread workers beat one two-thread process on two cores)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing; released when its holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
