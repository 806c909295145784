"""MLflow: opening and probing a tracking store, and the one way a run is logged.

A store: `client_for(uri)` (a new local SQLite store is created once, under a lock), `check_store` and
`unreachable` (why a store cannot take runs, in one line), `experiment_id`.
A run: `start_run`, then `finish_run` (log a summary and files, set the status); `log_finished` is the
two at once, for a run that is already done; `log_run_dir` is a finished run directory (`rlhf-sweep run`
and `rlhf-sweep log`), built on `log_finished`. `MlflowClient` is used directly (no global active run),
so sweep workers and nested runs never step on each other. MLflow itself is imported where it is used:
commands that log nothing start without it.

What a summary becomes (`log_summary`): params = the flattened config; per-iteration metrics with
`step` = iteration under the history's keys (`rm`, `gold`, `len`, `kl/exact`, `ppo/beta`, ...); the
held-out metrics (DESIGN §4 keys), `observations/*` and `timing/*` at step = the number of iterations,
so `kl/exact` ends its curve with the held-out value; the summary's tags; summary.json as an artifact.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

from rlhf_sweep.config.schema import flatten
from rlhf_sweep.run import layout
from rlhf_sweep.utils.runtime import file_lock

MAX_METRICS_PER_CALL = 1000  # MLflow's documented batch limits
MAX_PARAMS_PER_CALL = 100


def default_artifact_root(uri: str) -> str | None:
    """Local SQLite store -> artifacts beside it under outputs/; a server decides its own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store URI (sqlite:///rel/path, sqlite:////abs/path), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path else None


_READY: set[str] = set()  # SQLite stores this process has opened (MLflow keeps one store object per URI)


def ensure_store(uri: str):
    """A client on `uri`. A local SQLite store is opened the first time under a file lock beside it,
    so a new store is created (its tables made and migrated) once, by whichever process comes first;
    MLflow's migrations are not safe to run from two processes at once."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None or uri in _READY:
        return MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(db.with_name(db.name + ".lock")):
        client = MlflowClient(tracking_uri=uri)  # creates and migrates a new store's tables
    _READY.add(uri)
    return client


def client_for(uri: str):
    """A client on `uri` (a new local SQLite store is created first, once: `ensure_store`)."""
    return ensure_store(uri)


def short_error(e: BaseException, limit: int = 300) -> str:
    """One line from a database or MLflow error: the driver's own message without SQLAlchemy's SQL and links."""
    err: BaseException | None = e
    while err is not None:  # MLflow wraps SQLAlchemy errors, which keep the driver's in `.orig`
        if getattr(err, "orig", None) is not None:
            return " ".join(str(err.orig).split())[:limit]
        err = err.__cause__ or err.__context__
    text = str(e).split("[SQL:")[0].split("(Background on this error")[0]
    return (" ".join(text.split()) or type(e).__name__)[:limit]


def _write_probe(db: Path, timeout: float) -> str | None:
    """Why SQLite cannot write to `db` (None when it can): a schema change that is rolled back."""
    import sqlite3

    try:
        con = sqlite3.connect(str(db), timeout=timeout, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE rlhf_sweep_write_probe (x INTEGER)")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as e:
        return str(e)
    return None


def check_store(uri: str, label: str = "mlflow.tracking_uri", timeout: float = 5.0) -> str | None:
    """Why `uri` cannot take runs (None when it can), as one line naming `label` and the fix.

    A tracking server must answer within `timeout` (`unreachable`); a local SQLite store is
    created if new (`ensure_store`) and must accept a write. Other stores are left to MLflow.
    """
    if uri.startswith(("http://", "https://")):
        why = unreachable(uri, timeout)
        return f"cannot reach {label} {uri}: {why}; is the MLflow server running and reachable from this machine?" if why else None
    db = sqlite_path(uri)
    if db is None:
        return None
    if db.is_dir():
        return f"{label} {uri} names a directory; point it at a database file, e.g. sqlite:///{db / 'mlflow.db'}"
    try:
        ensure_store(uri)
    except Exception as e:
        why = short_error(e)
        fix = ("move the file aside (it is not an MLflow database) or point " if "not a database" in why or "malformed" in why
               else "point ")
        return f"cannot open the MLflow store {label} {uri}: {why}; {fix}{label} at another store"
    why = _write_probe(db, timeout)
    if why:
        return f"cannot write to the MLflow store {label} {uri}: {why}; make {db} and its folder writable or point {label} at another store"
    return None


def unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why an http(s) tracking server cannot be reached (None when it answers, or for a local store).

    MLflow's client retries a dead server with backoff for minutes; one probe of its /health
    endpoint fails in seconds instead. Any HTTP answer counts as reachable.
    """
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:  # it answered (e.g. 401 behind a proxy): reachable
        return None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused"
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return f"no answer within {timeout:g} s"
        if "Name or service not known" in str(reason) or "nodename nor servname" in str(reason):
            return "unknown host"
        return str(reason)


def experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_root(uri))
    except Exception:  # another worker created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def log_summary(
    client,
    run_id: str,
    summary: dict,
    run_dir: str | None = None,
) -> None:
    """Log one trial's config, history, final metrics, verdicts, tags (e.g. `kl/gradient`) and summary.json to `run_id`."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    params = [Param(k, str(v)[:6000]) for k, v in flatten(summary["config"]).items()]
    metrics = []
    for entry in summary["history"]:
        step = int(entry["iteration"])
        metrics += [Metric(k, float(v), now, step) for k, v in entry.items() if k != "iteration" and _finite(v)]
    final_step = len(summary["history"])
    metrics += [Metric(k, float(v), now, final_step) for k, v in summary["metrics"].items() if _finite(v)]
    for name, verdict in summary["observations"].items():
        metrics.append(Metric(f"observations/{name}", float(verdict["value"]), now, final_step))
    metrics += [Metric(f"timing/{k}", float(v), now, final_step) for k, v in summary["timing"].items()]
    for chunk in chunks(params, MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=chunk)
    if summary.get("tags"):
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in summary["tags"].items()])
    for chunk in chunks(metrics, MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=chunk)
    if run_dir and layout.summary_path(run_dir).exists():
        client.log_artifact(run_id, str(layout.summary_path(run_dir)))


def start_run(client, exp_id: str, name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


def finish_run(client, run_id: str, summary: dict | None = None, run_dir: str | None = None, files: list[str] | tuple[str, ...] = (),
               status: str = "FINISHED") -> str:
    """End a started run: log a summary (config, history, metrics, verdicts, summary.json) and further files,
    then set its status; a failure while logging ends it FAILED and raises. The one way a run is logged."""
    try:
        if summary is not None:
            log_summary(client, run_id, summary, run_dir)
        for f in files:
            client.log_artifact(run_id, str(f))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status=status)
    return run_id


def log_finished(client, exp_id: str, summary: dict, run_dir: str | None, name: str, tags: dict | None = None,
                 parent_run_id: str | None = None, files: list[str] | tuple[str, ...] = ()) -> str:
    """A finished run as one new MLflow run (nested under `parent_run_id` if given); returns its id."""
    return finish_run(client, start_run(client, exp_id, name, tags, parent_run_id), summary, run_dir, files)


# ----- a finished run directory as an MLflow run -------------------------------------------------
RUN_DIR_TAG = "rlhf_sweep.run_dir"
SUMMARY_TAG = "rlhf_sweep.summary_sha1"  # which summary.json a run holds: `rlhf-sweep log` sends each once


class RunDirError(ValueError):
    """A run directory without a readable summary.json; one line naming the file and the fix."""


def read_run_dir(run_dir: str | Path) -> dict:
    """The summary.json of a finished run directory."""
    path = layout.summary_path(run_dir)
    try:
        summary = layout.read_summary(path)
    except layout.SummaryError as e:
        raise RunDirError(str(e)) from None
    missing = [k for k in ("config", "metrics", "history", "observations", "timing") if k not in summary]
    if missing:
        raise RunDirError(f"{path} lacks {', '.join(missing)}: not a summary that `rlhf-sweep run` wrote")
    return summary


def log_run_dir(uri: str, run_dir: str | Path, summary: dict | None = None, once: bool = False) -> tuple[str, bool]:
    """A finished run directory as one MLflow run: its summary.json (config, history, metrics, verdicts)
    and trajectory.png when present, in the experiment its config names. Returns (run id, logged now);
    with `once`, a FINISHED run of the same summary.json in that experiment is returned instead."""
    run_dir = Path(run_dir).resolve()
    summary = summary if summary is not None else read_run_dir(run_dir)
    digest = hashlib.sha1(layout.summary_path(run_dir).read_bytes()).hexdigest()
    client = client_for(uri)
    exp_id = experiment_id(client, (summary["config"].get("mlflow") or {}).get("experiment", "rlhf-sweep"), uri)
    if once:
        done = client.search_runs([exp_id], filter_string=f"tags.`{SUMMARY_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
                                  max_results=1)
        if done:
            return done[0].info.run_id, False
    figure = layout.trajectory_path(run_dir)
    run_id = log_finished(client, exp_id, summary, str(run_dir), name=run_dir.name,
                          tags={"seed": str(summary["config"].get("seed")), RUN_DIR_TAG: str(run_dir), SUMMARY_TAG: digest},
                          files=[str(figure)] if figure.is_file() else [])
    return run_id, True
