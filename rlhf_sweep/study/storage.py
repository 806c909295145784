"""A study's Optuna storage: opening a journal file or an RDB URL (checked, with a short connect timeout),
the lock that keeps one sweep per journal, trial ownership by pid, heartbeats, failing the trials of a
worker that died (with their MLflow runs ended), and opening a stored study by name (`load_study`).
Passwords never reach a printed line (`hide_password`).
"""

from __future__ import annotations

import copy
import math
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from rlhf_sweep.run import layout, tracking
from rlhf_sweep.study import journal
from rlhf_sweep.study.spec import StudyError
from rlhf_sweep.utils.runtime import quiet_libraries

# A RUNNING trial with no owner recorded is only stale once it is this old: the owner
# is written right after `ask`, so a younger one may belong to a live worker elsewhere.
OWNERLESS_GRACE_S = 60.0


# RDB storages (PostgreSQL, MySQL, SQLite URLs): a running trial records a heartbeat every
# HEARTBEAT_S seconds; one silent for twice that is failed and retried up to MAX_RETRY times.
HEARTBEAT_S = 60


MAX_RETRY = 3


CONNECT_TIMEOUT_S = 5  # a database server that does not answer fails the command in seconds, not minutes


PLAN_ATTRS = ("plan_key", "seeds", "plan_name", "plan_params")  # what makes a queued trial a planned one


def open_storage(storage: str, heartbeat: int = HEARTBEAT_S):
    """An Optuna storage from a URL (any RDB URL: sqlite:///, postgresql://, mysql://) or a journal file path.

    The default is a journal file: the storage Optuna recommends for several processes on one
    host (appends under a file lock; bench/sweep_workers.py measures it against SQLite).
    An RDB storage gets heartbeats every `heartbeat` seconds (see `fail_stale_trials`).
    """
    try:
        if "://" in storage:
            engine: dict[str, Any] = {}
            if storage.startswith("sqlite:///"):
                Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
                # wait for the write lock instead of failing with "database is locked"
                engine = {"connect_args": {"timeout": 60}}
            elif storage.startswith(("postgresql", "mysql")):
                # pre_ping: a connection dropped while a long trial ran is replaced, not an error
                engine = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
            for attempt in range(3):
                try:
                    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna: no warning per process
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        # RetryStaleTrial: Optuna's RetryFailedTrialCallback (named RetryHeartbeatStaleTrialCallback since 4.9)
                        return optuna.storages.RDBStorage(storage, engine_kwargs=engine, heartbeat_interval=heartbeat,
                                                          heartbeat_stale_trial_callback=RetryStaleTrial(max_retry=MAX_RETRY))
                except Exception as e:
                    # workers started together on an empty database all create Optuna's tables; all but
                    # one hit "already exists" (PostgreSQL: duplicate key in pg_type) and try again
                    if attempt == 2 or not any(m in str(e) for m in ("already exists", "duplicate key")):
                        raise
                    time.sleep(1.0)
        journal.check(storage)  # a folder, a torn last record, damage: one line, before Optuna appends anything
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(journal.backend(storage))
    except StudyError:
        raise
    except Exception as e:  # a bad URL, a missing driver, a server that does not answer: one line, before any trial
        raise StudyError(storage_error(storage, e)) from None


def quiet() -> None:
    """Library chatter off for a sweep's processes: transformers, MLflow, and Optuna's per-trial INFO lines."""
    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def storage_error(storage: str, e: BaseException) -> str:
    """One line that names the storage, says what went wrong and what to do."""
    url = hide_password(storage)
    if isinstance(e, ImportError) and "://" in storage:
        return f"--storage {url}: no database driver for it ({e.__cause__ or e}); pip install -e '.[cluster]' (PostgreSQL)"
    text = " ".join(str(getattr(e, "orig", None) or e).split())
    # psycopg: 'connection failed: connection to server at "h", port 5432 failed: Connection refused Is the server ...'
    text = re.sub(r"^(connection failed: )?(connection to server at .*?, port \d+ failed: )?(FATAL: )?", "", text)
    low = text.lower()
    for needle, reason in (("refused", "connection refused"), ("timeout", f"no answer within {CONNECT_TIMEOUT_S} s"),
                           ("timed out", f"no answer within {CONNECT_TIMEOUT_S} s"), ("resolve host", "unknown host"),
                           ("name or service not known", "unknown host"), ("no route", "no route to host")):
        if needle in low:
            return f"cannot reach --storage {url}: {reason}; is the server running and reachable from this machine?"
    if "://" in storage:
        return f"cannot open --storage {url}: {text.split(' Is the server')[0][:300]}"
    return f"storage {storage!r}: {type(e).__name__}: {text[:300]}"


def sweep_lock_path(storage: str, out_dir: Path) -> Path:
    """The file lock that lets one process at a time ask for trials (beside a journal, else in the output directory)."""
    return Path(storage + ".sweep-lock") if "://" not in storage else out_dir / ".sweep-lock"


# ----- who owns a running trial ----------------------------------------------------------------
def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def owner_token() -> str:
    """host:pid:start-time. The start time (from /proc) tells a recycled pid from the owner."""
    stat = _proc_stat(os.getpid())
    return f"{socket.gethostname()}:{os.getpid()}:{stat[19] if stat else ''}"


def owner_alive(token: str) -> bool | None:
    """True/False for an owner on this host; None when it ran elsewhere (we cannot tell)."""
    host, _, rest = token.partition(":")
    pid_s, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_s.isdigit():
        return None
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(int(pid_s))
        return stat is not None and stat[0] not in ("Z", "X") and (not start or stat[19] == start)
    try:
        os.kill(int(pid_s), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class RetryStaleTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose heartbeat stopped: a WAITING copy with the same parameters,
    linked to the dead one by `retried_trial_number`. The copy starts clean: the dead attempt's
    user attributes (its worker, error, MLflow run, run directory) stay with the failed trial;
    only what makes it a planned trial (its plan key and seeds) goes with the copy."""

    def __call__(self, study, trial) -> None:
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in PLAN_ATTRS}
        super().__call__(study, trial)


# ----- Optuna storages through their public methods ------------------------------------------------
def heartbeats(storage) -> bool:
    """Whether a storage records heartbeats (RDB storages, as `open_storage` makes them)."""
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None


def trial_id(storage, study_name: str, number: int) -> int:
    """The storage's id of trial `number` (what its per-trial methods take), by public methods."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def stale_trial_ids(storage, study_name: str) -> list[int]:
    """Ids of the RUNNING trials whose heartbeat is older than the grace period (RDB storages).

    The one private Optuna name in this package: the public `optuna.storages.fail_stale_trials`
    fails such trials at once, which leaves no way to record why first (a finished trial takes no
    more attributes), and heartbeats are readable no other way. tests/test_sweep.py holds this
    function to a stale and a fresh trial, so an Optuna that renames or changes it fails there.
    """
    return list(storage._get_stale_trial_ids(storage.get_study_id_from_name(study_name)))


@contextmanager
def heartbeat_thread(storage, tid: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval while it runs (what `study.optimize` does; RDB only)."""
    if not heartbeats(storage):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(tid)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{tid}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale_trials(study, storage, client=None) -> list[int]:
    """Mark RUNNING trials whose worker is dead as FAIL (and their MLflow runs FAILED).

    RDB storages: Optuna's heartbeats, so a worker on any machine notices a dead one; each such
    trial is retried (the storage's RetryStaleTrial). This is `optuna.storages.fail_stale_trials`
    with the reason recorded before the FAIL (a finished trial takes no more attributes).
    Journal files (one machine): the sweep records the owner process of each trial and checks it
    here (Optuna's heartbeat only exists for RDB storages).
    """
    if heartbeats(storage):
        failed = []
        grace = 2 * storage.get_heartbeat_interval()
        for tid in stale_trial_ids(storage, study.study_name):
            t = storage.get_trial(tid)
            try:
                storage.set_trial_user_attr(tid, "error", f"stale: no heartbeat for {grace} s from its worker "
                                                          f"({t.user_attrs.get('worker')}): died or lost the database; retried")
                if not storage.set_trial_state_values(tid, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first (or it just finished)
                continue
            retry = storage.get_heartbeat_stale_trial_callback()
            if retry is not None:
                retry(study, copy.deepcopy(storage.get_trial(tid)))
            fail_mlflow_run(client, t.user_attrs.get("mlflow_run_id"), "no heartbeat: worker died")
            failed.append(t.number)
        return failed
    failed = []
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if owner:
            stale = owner_alive(owner) is False
            why = f"the worker process ({owner}) died while the trial ran (killed?)"
        else:
            started = t.datetime_start.timestamp() if t.datetime_start else now
            stale = now - started > OWNERLESS_GRACE_S
            why = "the trial's worker died before recording itself"
        if not stale:
            continue
        tid = trial_id(storage, study.study_name, t.number)
        storage.set_trial_user_attr(tid, "error", f"stale: {why}; marked failed on restart")
        storage.set_trial_state_values(tid, TrialState.FAIL)
        fail_mlflow_run(client, t.user_attrs.get("mlflow_run_id"), "worker died")
        failed.append(t.number)
    return failed


def fail_mlflow_run(client, run_id: str | None, why: str, status: str = "FAILED") -> None:
    """End a trial's MLflow run that did not finish (FAILED, or KILLED on Ctrl-C) with the reason as its `error` tag."""
    if client is not None and run_id:
        try:
            client.set_tag(run_id, "error", why)
            tracking.finish_run(client, run_id, status=status)
        except Exception:  # a run in another tracking store; the Optuna record is what counts
            pass


def json_safe(v: Any) -> Any:
    """A value as every storage holds it (JSON): NaN and infinities become null, in nested dicts too."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    return v


# ----- a stored study ------------------------------------------------------------------------------
def study_name(study: str) -> str:
    """STUDY as the sweep names it: a YAML path's stem, else the name itself (studies/NAME.yaml or --name)."""
    p = Path(study)
    return p.stem if p.suffix in (".yaml", ".yml") else study


def load_study(study: str, storage: str | None = None, out: str | None = None) -> tuple[Any, str, str, Path]:
    """Open a study the way `sweep` stored it; returns (optuna study, name, storage, output directory)."""
    name = study_name(study)
    out_dir = layout.study_dir(name, out)
    storage = storage or str(layout.journal_path(out_dir))
    # a journal path that does not exist would be created empty by open_storage: check first
    if "://" not in storage:
        journal.check(storage)  # a folder, a torn or damaged journal: its own line
    if "://" not in storage and not Path(storage).is_file():
        raise StudyError(f"no study named {name!r} in {storage}; run `rlhf-sweep sweep {study}` first "
                         "(or pass --storage / --out where it ran)")
    try:
        ostudy = optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        raise StudyError(f"no study named {name!r} in {storage}; run `rlhf-sweep sweep {study}` first") from None
    return ostudy, name, storage, out_dir
