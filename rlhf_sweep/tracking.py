"""MLflow logging: params = the flattened config, per-iteration metrics with `step`, final metrics,
and summary.json as an artifact. Uses `MlflowClient` directly (no global active run), so
sweep workers and nested runs never step on each other.

Per-iteration keys are the history's (`rm`, `gold`, `len`, `kl/exact`, `ppo/beta`, ...),
logged at step = iteration; the held-out metrics (DESIGN §4 keys) are logged at
step = ppo.iterations, so `kl/exact` ends its curve with the held-out value.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from .config import flatten

MAX_METRICS_PER_CALL = 1000  # MLflow's documented batch limits
MAX_PARAMS_PER_CALL = 100


def default_artifact_root(uri: str) -> str | None:
    """Local SQLite store -> artifacts beside it under outputs/; a server decides its own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def client_for(uri: str):
    """A client on `uri`; creates the parent folder of a local SQLite store first."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


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
    if run_dir and (Path(run_dir) / "summary.json").exists():
        client.log_artifact(run_id, str(Path(run_dir) / "summary.json"))


def start_run(client, exp_id: str, name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


def log_run(uri: str, experiment: str, summary: dict, run_dir: str | None, name: str, tags: dict | None = None,
            parent_run_id: str | None = None) -> str:
    """One finished trial as an MLflow run (nested under `parent_run_id` if given); returns its id."""
    client = client_for(uri)
    return log_finished(client, experiment_id(client, experiment, uri), summary, run_dir, name, tags, parent_run_id)


def log_finished(client, exp_id: str, summary: dict, run_dir: str | None, name: str, tags: dict | None = None,
                 parent_run_id: str | None = None) -> str:
    """log_run with a client and experiment already open (many runs in a row)."""
    run_id = start_run(client, exp_id, name, tags, parent_run_id)
    try:
        log_summary(client, run_id, summary, run_dir)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id
