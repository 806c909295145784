"""`rlhf-sweep ui [OUT]`: a study in the dashboards researchers already use.

Starts optuna-dashboard on the study's Optuna storage and the MLflow UI on the tracking store its
trials were logged to, both listening on loopback, waits until both answer, prints their addresses
(and the MLflow page of the study's parent run), and stops both on Ctrl-C or SIGTERM. Both need the
`ui` extra (optuna-dashboard and the full `mlflow`; mlflow-skinny has no server).

Which study: OUT is a study's output directory (it holds `optuna.journal`) or an outputs directory
(`outputs/`, the default), whose most recently written study is shown; `--storage` names any Optuna
storage instead. Which tracking store: `--tracking-uri`, else the one the study recorded when it ran
(a relative SQLite path is found from the working directory or from above OUT), else `OUT/mlflow.db`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import optuna

from rlhf_sweep.run import layout, tracking
from rlhf_sweep.study.storage import open_storage

START_TIMEOUT_S = 120.0


class UIError(RuntimeError):
    """Nothing to show, a missing extra, a server that did not start: one line naming it."""


@dataclass
class Target:
    storage: str | None  # Optuna storage (journal path or RDB URL)
    study: str | None  # the study's name in it
    others: list[str]  # other journals under OUT, not shown
    tracking_uri: str | None
    parent_run_id: str | None = None
    experiment_id: str | None = None


def _journals(out: Path) -> list[Path]:
    if layout.journal_path(out).is_file():
        return [layout.journal_path(out)]
    found = [*out.glob(f"studies/*/{layout.JOURNAL}"), *out.glob(f"*/{layout.JOURNAL}")]
    return sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)


def _sqlite_uri(uri: str, out: Path) -> str:
    """An absolute sqlite URI: a relative path resolved from the working directory, else from above OUT."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return uri
    rel = Path(uri[len("sqlite:///"):])
    for base in [Path.cwd(), *out.resolve().parents, out.resolve()]:
        if (base / rel).is_file():
            return f"sqlite:///{(base / rel).resolve()}"
    return f"sqlite:///{rel.resolve()}"


def find_target(out: str, storage: str | None = None, tracking_uri: str | None = None) -> Target:
    """What to show for OUT (see the module docstring); UIError when there is nothing."""
    out_dir = Path(out)
    others: list[str] = []
    if storage is None:
        journals = _journals(out_dir)
        if journals:
            storage, others = str(journals[0]), [str(j) for j in journals[1:]]
    name = parent = None
    if storage is not None:
        if "://" not in storage and not Path(storage).is_file():
            raise UIError(f"--storage {storage}: no such file")
        try:
            names = optuna.study.get_all_study_names(open_storage(storage))
        except Exception as e:
            raise UIError(f"cannot read the Optuna storage {storage}: {type(e).__name__}: {e}") from None
        if names:
            name = names[0] if len(names) == 1 else (out_dir.name if out_dir.name in names else names[-1])
            attrs = optuna.load_study(study_name=name, storage=open_storage(storage)).user_attrs
            tracking_uri = tracking_uri or attrs.get("mlflow_tracking_uri")
            parent = attrs.get("mlflow_parent_run_id") if tracking_uri == attrs.get("mlflow_tracking_uri") else None
    if tracking_uri is None:
        for db in (out_dir / "mlflow.db", out_dir.parent.parent / "mlflow.db"):
            if db.is_file():
                tracking_uri = f"sqlite:///{db.resolve()}"
                break
    if tracking_uri is not None:
        tracking_uri = _sqlite_uri(tracking_uri, out_dir)
        if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
            raise UIError(f"the MLflow store {tracking_uri} does not exist (run from the directory the sweep ran in, "
                          "or pass --tracking-uri)")
    if storage is None and tracking_uri is None:
        raise UIError(f"nothing to show under {out_dir}: no optuna.journal (looked in {out_dir}, {out_dir}/studies/*/) and "
                      "no mlflow.db; run `rlhf-sweep sweep smoke` first, or pass --storage / --tracking-uri")
    return Target(storage, name, others, tracking_uri, parent)


def check_ports(optuna_port: int, mlflow_port: int) -> None:
    """Both ports in 0-65535 and not the same one (0: any free port), before anything starts: a port out of
    range is an OverflowError deep in socket.bind, and two servers on one port both look free until the
    second fails to bind."""
    for flag, port in (("--optuna-port", optuna_port), ("--mlflow-port", mlflow_port)):
        if not 0 <= port <= 65535:
            raise UIError(f"{flag} {port}: a port is in 0-65535 (0: any free port)")
    if optuna_port and optuna_port == mlflow_port:
        raise UIError(f"--optuna-port and --mlflow-port are both {optuna_port}: the two servers need two ports "
                      "(e.g. --mlflow-port 5000, or 0 for any free port)")


def _free_port(host: str, port: int, avoid: tuple[int, ...] = ()) -> int:
    """`port` if it is free on `host`, else (or for 0) one the system picks; never one in `avoid` (the other
    server's, not listening yet: the system could hand it out again)."""
    for want in ([port] if port and port not in avoid else []) + [0] * 5:
        with socket.socket() as s:
            try:
                s.bind((host, want))
            except OSError:
                continue
            if s.getsockname()[1] not in avoid:
                return s.getsockname()[1]
    raise UIError(f"no free port on {host}")


def _has_distribution(name: str) -> bool:
    try:
        distribution(name)
        return True
    except PackageNotFoundError:
        return False


def _script(name: str) -> str:
    """A console script of this environment (beside this Python), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise UIError(f"{name} is not installed; pip install 'rlhf-sweep[ui]'")
    return found


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[:400]


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path


def start(target: Target, host: str = "127.0.0.1", optuna_port: int = 8080, mlflow_port: int = 5000,
          log_dir: Path | None = None) -> list[Server]:
    """Start the servers of `target` and wait until each answers; returns them (running)."""
    if importlib.util.find_spec("optuna_dashboard") is None and target.storage:
        raise UIError("optuna-dashboard is not installed; pip install 'rlhf-sweep[ui]' (or make ui)")
    if not _has_distribution("mlflow") and target.tracking_uri:
        raise UIError("the MLflow UI needs the full mlflow (mlflow-skinny has no server); pip install 'rlhf-sweep[ui]'")
    check_ports(optuna_port, mlflow_port)
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"rlhf-sweep-ui-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    specs, taken = [], ()
    if target.storage:
        port = _free_port(host, optuna_port)
        taken = (port,)
        specs.append(("optuna-dashboard", f"http://{host}:{port}", f"http://{host}:{port}/api/studies",
                      [_script("optuna-dashboard"), target.storage, "--host", host, "--port", str(port), "--server", "wsgiref"]))
    if target.tracking_uri:
        port = _free_port(host, mlflow_port, taken)
        specs.append(("MLflow UI", f"http://{host}:{port}", f"http://{host}:{port}/health",
                      [_script("mlflow"), "ui", "--backend-store-uri", target.tracking_uri, "--host", host, "--port", str(port),
                       "--workers", "1"]))
    servers: list[Server] = []
    try:
        for name, url, _probe, cmd in specs:
            log = log_dir / f"{name.split()[0].lower()}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            servers.append(Server(name, url, proc, log))
        deadline = time.monotonic() + START_TIMEOUT_S
        for (name, url, probe, _cmd), srv in zip(specs, servers, strict=True):
            while not _answers(probe):
                if srv.proc.poll() is not None:
                    raise UIError(f"{name} exited with code {srv.proc.returncode} at start: {_tail(srv.log)} (log: {srv.log})")
                if time.monotonic() > deadline:
                    raise UIError(f"{name} did not answer at {url} within {START_TIMEOUT_S:.0f} s (log: {srv.log})")
                time.sleep(0.5)
    except BaseException:
        stop(servers)
        raise
    if target.tracking_uri and target.parent_run_id:
        target.experiment_id = _experiment_of(target.tracking_uri, target.parent_run_id)
    return servers


def _experiment_of(uri: str, run_id: str) -> str | None:
    try:
        return tracking.client_for(uri).get_run(run_id).info.experiment_id
    except Exception:
        return None


def stop(servers: list[Server]) -> None:
    """SIGTERM to each server's process group (its workers too), then SIGKILL to what is left after 10 s."""
    for s in servers:
        if s.proc.poll() is None:
            try:
                os.killpg(s.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for s in servers:
        try:
            s.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(s.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            s.proc.wait()


def addresses(target: Target, servers: list[Server]) -> list[str]:
    lines = []
    for s in servers:
        if s.name == "optuna-dashboard":
            lines.append(f"optuna-dashboard: {s.url}   (study {target.study or '?'} in {target.storage})")
        else:
            lines.append(f"MLflow UI:        {s.url}   (tracking store {target.tracking_uri})")
            if target.experiment_id and target.parent_run_id:
                lines.append(f"  the study's parent run: {s.url}/#/experiments/{target.experiment_id}/runs/{target.parent_run_id}")
    if target.others:
        lines.append(f"other studies there (rlhf-sweep ui DIR for one of them): {', '.join(str(Path(o).parent) for o in target.others)}")
    return lines


def serve(out: str = "outputs", storage: str | None = None, tracking_uri: str | None = None, host: str = "127.0.0.1",
          optuna_port: int = 8080, mlflow_port: int = 5000) -> None:
    """Start both, print where they are, and keep them up until Ctrl-C / SIGTERM (or one of them exits)."""
    check_ports(optuna_port, mlflow_port)
    target = find_target(out, storage, tracking_uri)
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    servers = start(target, host, optuna_port, mlflow_port)
    try:
        print("\n".join(addresses(target, servers)), flush=True)
        print("Ctrl-C stops both.", flush=True)
        while True:
            for s in servers:
                if s.proc.poll() is not None:
                    raise UIError(f"{s.name} stopped (exit code {s.proc.returncode}): {_tail(s.log)}")
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        stop(servers)
