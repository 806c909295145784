"""Many machines on one study: `rlhf-sweep sweep` against PostgreSQL and an MLflow tracking server.

Two worker processes (separate commands with their own output directories, as on two machines)
run the smoke study on a PostgreSQL storage and log to an MLflow server on loopback; one worker
is SIGKILLed mid-trial, its trial's heartbeat stops, the other worker fails it and runs Optuna's
retry. Servers that are down fail the command in seconds with one line.

PostgreSQL: RLHF_SWEEP_TEST_PG_URL (a superuser URL, as .ci/run exports) or, when unset, a
throwaway cluster started here by deploy/pg-throwaway.sh; the test is skipped only when that
cannot start one. Each run gets fresh databases, dropped at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from rlhf_sweep.study.spec import METRIC_KEYS, load_spec
from rlhf_sweep.study.storage import fail_stale_trials, heartbeats, open_storage, trial_id

ROOT = Path(__file__).resolve().parent.parent
PG_SCRIPT = ROOT / "deploy" / "pg-throwaway.sh"
N_TRIALS = 4
HEARTBEAT = 2  # seconds: a killed worker's trial is failed 4 s after its last heartbeat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def with_db(url: str, db: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=db).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def pg_server():
    """A PostgreSQL server URL (superuser): the one CI started, or a throwaway one started here."""
    url = os.environ.get("RLHF_SWEEP_TEST_PG_URL")
    if url:
        yield url
        return
    tmp = tempfile.mkdtemp(prefix="rlhf-sweep-pg-")  # under /tmp: the `postgres` user must reach it
    r = subprocess.run(["bash", str(PG_SCRIPT), "start", tmp, str(free_port())], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"PostgreSQL could not be started (set RLHF_SWEEP_TEST_PG_URL or install postgresql): {r.stderr.strip()[-500:]}")
    try:
        yield r.stdout.strip()
    finally:
        subprocess.run(["bash", str(PG_SCRIPT), "stop", tmp], capture_output=True, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def databases(pg_server):
    """Fresh databases for Optuna and MLflow (both keep an alembic_version table: they cannot share one)."""
    import psycopg

    names = {k: f"rlhf_sweep_test_{k}_{uuid.uuid4().hex[:8]}" for k in ("optuna", "mlflow")}
    with psycopg.connect(pg_server, autocommit=True, connect_timeout=10) as conn:
        for db in names.values():
            conn.execute(f'CREATE DATABASE "{db}"')
    try:
        yield {k: with_db(pg_server, db) for k, db in names.items()}
    finally:
        with psycopg.connect(pg_server, autocommit=True, connect_timeout=10) as conn:
            for db in names.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.fixture(scope="module")
def mlflow_server(databases, tmp_path_factory):
    """`mlflow server` on loopback: runs in PostgreSQL, artifacts in a shared directory served by the server."""
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", databases["mlflow"],
           "--artifacts-destination", str(artifacts), "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(artifacts.parent / "mlflow-server.log", "w")
    # no background job runner (GenAI jobs: seven more processes the sweep does not use)
    proc = subprocess.Popen(cmd, env={**env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # the first start migrates an empty database
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(artifacts.parent / 'mlflow-server.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield uri, artifacts
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def worker_cmd(storage: str, uri: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf_sweep", "sweep", "smoke", "--n-trials", str(N_TRIALS), "--storage", storage,
            "--tracking-uri", uri, "--out", str(out), "--heartbeat", str(HEARTBEAT)]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_two_machines_share_a_study_and_a_killed_workers_trial_is_retried(databases, mlflow_server, tmp_path):
    uri, artifacts = mlflow_server
    storage = databases["optuna"]
    cwd = tmp_path / "cwd"  # both workers' SFT/RM cache (on a cluster: each machine's, or a shared one)
    cwd.mkdir()
    t0 = time.monotonic()
    logs = {k: open(tmp_path / f"worker-{k}.log", "w+") for k in "ab"}  # files, not pipes: nobody reads them while it runs
    a, b = (subprocess.Popen(worker_cmd(storage, uri, tmp_path / f"machine-{k}"), cwd=cwd, env=env(), start_new_session=True,
                             stdout=logs[k], stderr=subprocess.STDOUT) for k in "ab")
    killed = None
    try:
        # kill worker B inside a trial: RUNNING, owned by B's process, its MLflow run started
        deadline = time.monotonic() + 240
        while killed is None and time.monotonic() < deadline and a.poll() is None and b.poll() is None:
            try:
                trials = optuna.load_study(study_name="smoke", storage=storage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            except KeyError:  # the study is not created yet
                trials = []
            for t in trials:
                if t.user_attrs.get("worker", "").split(":")[1:2] == [str(b.pid)] and "mlflow_run_id" in t.user_attrs:
                    os.killpg(b.pid, signal.SIGKILL)
                    killed = t
                    break
            time.sleep(0.05)
        assert killed is not None, f"worker B ran no trial to kill:\nA: {logs['a'].name}\nB: {(tmp_path / 'worker-b.log').read_text()[-3000:]}"
        a.wait(timeout=300)
    finally:
        for p in (a, b):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in logs.values():
            f.close()
    elapsed = time.monotonic() - t0
    out_a = (tmp_path / "worker-a.log").read_text()
    assert a.returncode == 0, out_a
    assert f"trial {killed.number}: its worker died; marked failed" in out_a, out_a
    print(f"\nworkers: {elapsed:.0f} s; B killed in trial {killed.number}\n--- worker A ---\n{out_a}")

    # Optuna, read back from PostgreSQL
    study = optuna.load_study(study_name="smoke", storage=storage)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) == N_TRIALS
    assert [t.number for t in failed] == [killed.number]
    # a trial two workers asked for the last slot at once steps back before it runs; no other state
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED) for t in trials)
    assert all(t.user_attrs["error"].startswith("not run:") for t in trials if t.state == TrialState.PRUNED)
    assert len(trials) == N_TRIALS + 1 + sum(t.state == TrialState.PRUNED for t in trials)
    # no duplicated trial: numbers, parameters and run directories are distinct among complete trials
    assert len({t.number for t in trials}) == len(trials)
    assert len({tuple(sorted(t.params.items())) for t in complete}) == N_TRIALS
    assert len({t.user_attrs["run_dir"] for t in complete}) == N_TRIALS

    # the killed trial: failed by heartbeat, retried by Optuna's callback with the same parameters
    dead = study.trials[killed.number]
    assert dead.user_attrs["error"].startswith(f"stale: no heartbeat for {2 * HEARTBEAT} s"), dead.user_attrs
    retries = [t for t in trials if optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, [(t.number, t.state, t.system_attrs) for t in trials]
    retry = retries[0]
    assert retry.number > killed.number and retry.params == killed.params
    assert optuna.storages.RetryFailedTrialCallback.retry_history(retry) == [killed.number]
    assert retry.user_attrs["worker"] != killed.user_attrs["worker"]  # run by the surviving worker, with its own record
    assert f"trial {retry.number}: retries trial {killed.number}, whose worker died" in out_a

    # MLflow, from the server: one parent run; one nested run per complete trial; the killed one FAILED
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    parents = mlflow.search_runs(experiment_names=["rlhf-sweep"], filter_string="tags.`rlhf_sweep.role` = 'study' and tags.study = 'smoke'")
    assert list(parents["run_id"]) == [study.user_attrs["mlflow_parent_run_id"]]  # both workers found the same parent
    parent = parents["run_id"][0]
    runs = mlflow.search_runs(experiment_names=["rlhf-sweep"], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert set(runs["tags.rlhf_sweep.role"]) <= {"trial", "baseline"}  # the best-of-n baseline's runs nest there too
    finished = runs[(runs["status"] == "FINISHED") & (runs["tags.rlhf_sweep.role"] == "trial")]
    assert sorted(finished["tags.trial"].astype(int)) == sorted(t.number for t in complete)
    assert set(finished["run_id"]) == {t.user_attrs["mlflow_run_id"] for t in complete}
    client = MlflowClient(uri)
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).data.tags["retry_of"] == str(killed.number)
    # artifacts went through the server into its shared directory
    assert list(artifacts.rglob("trials.csv")) and list(artifacts.rglob("summary.json"))

    # the killed machine comes back: the same command finds the study complete; nothing lost or rerun
    r = subprocess.run(worker_cmd(storage, uri, tmp_path / "machine-b"), cwd=cwd, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{N_TRIALS} of {N_TRIALS} trials complete; 0 to run" in r.stdout
    assert f"(parent run {parent})" in r.stdout
    assert [(t.number, t.state) for t in optuna.load_study(study_name="smoke", storage=storage).trials] == [(t.number, t.state) for t in trials]


def test_workers_starting_together_on_an_empty_database(pg_server):
    # each worker creates Optuna's tables if missing; at once, all but one hit "already exists"
    # (threads race on the database just as processes on several machines do)
    import threading

    import psycopg


    db = f"rlhf_sweep_test_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    errors: list[str] = []

    def open_it() -> None:
        try:
            open_storage(with_db(pg_server, db)).engine.dispose()
        except Exception as e:
            errors.append(repr(e))

    try:
        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
    finally:
        with psycopg.connect(pg_server, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


# ----- the heartbeat path without a server: SQLite is an RDB storage with heartbeats too ----------
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_silent_trial_is_failed_and_retried_with_its_parameters(tmp_path):
    from rlhf_sweep.study import workers

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=1)
    study = optuna.create_study(study_name="s", storage=storage)
    assert heartbeats(storage)
    t = workers._ask(study)
    x = t.suggest_float("x", 0.0, 1.0)
    t.set_user_attr("worker", "another-host:123:456")
    storage.record_heartbeat(trial_id(storage, "s", t.number))  # then its worker dies
    assert fail_stale_trials(study, storage) == []  # within the grace period (2 s)
    time.sleep(3.5)  # SQLite's clock has whole seconds
    assert fail_stale_trials(study, storage) == [0]
    dead, retry = study.trials
    assert dead.state == TrialState.FAIL and dead.user_attrs["error"].startswith("stale: no heartbeat for 2 s from its worker (another-host")
    assert retry.state == TrialState.WAITING and optuna.storages.RetryFailedTrialCallback.retried_trial_number(retry) == 0
    assert retry.params == {"x": x} and retry.user_attrs == {}  # the dead attempt's bookkeeping stays with it
    again = workers._ask(study)  # the next ask, on any machine, takes the retry
    assert again.number == 1 and again.suggest_float("x", 0.0, 1.0) == x
    assert fail_stale_trials(study, storage) == []  # the retry has no heartbeat yet: not stale


def test_a_trial_failed_by_another_worker_while_it_ran_is_void(tmp_path, monkeypatch):
    from rlhf_sweep.run import pipeline
    from rlhf_sweep.study import workers

    storage = f"sqlite:///{tmp_path / 's.db'}"
    spec = load_spec("smoke", check_config=False)
    store = open_storage(storage, heartbeat=1)
    study = optuna.create_study(study_name="s", storage=store, directions=spec.directions)
    trial = workers._ask(study)

    def run_while_declared_dead(cfg, say=print):
        # meanwhile another machine saw no heartbeat and failed the trial
        store.set_trial_state_values(trial_id(store, "s", trial.number), TrialState.FAIL)
        return {"config": {"seed": cfg.seed, "run_dir": cfg.run_dir}, "metrics": dict.fromkeys(METRIC_KEYS, 0.5),
                "history": [{"iteration": 0, "kl/exact": 0.1}], "observations": {}, "timing": {"ppo": 1.0}}

    monkeypatch.setattr(pipeline, "run", run_while_declared_dead)
    job = workers.Job(spec=spec, study_name="s", storage=storage, out_dir=str(tmp_path / "out"), n_trials=2, threads=1,
                      tracking_uri=None, experiment_id=None, parent_run_id=None)
    rec = workers.run_trial(job, study, trial, None, print, store)
    assert rec["state"] == "FAIL" and rec["error"].startswith("failed by another worker: no heartbeat")
    assert study.trials[0].state == TrialState.FAIL and study.trials[0].values is None


def test_the_later_of_two_asks_for_the_last_slot_is_over_budget(tmp_path):
    from rlhf_sweep.study import workers

    study = optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    a, b, c = (workers._ask(study) for _ in range(3))  # n_trials = 2; three machines saw room at once
    assert not workers._over_budget(study, a, 2) and not workers._over_budget(study, b, 2) and workers._over_budget(study, c, 2)
    study.tell(a, state=TrialState.FAIL)  # a failed trial frees its slot
    assert not workers._over_budget(study, c, 2)


def run_cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "rlhf_sweep", "sweep", "smoke", *args], cwd=cwd, env=env(),
                       capture_output=True, text=True, timeout=60)
    return r, time.monotonic() - t0


def test_unreachable_storage_fails_fast_in_one_line(tmp_path):
    port = free_port()  # nothing listens there
    r, seconds = run_cli("--storage", f"postgresql://sweeper:s3cret@127.0.0.1:{port}/studies", "--out", str(tmp_path / "out"), cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert err == (f"rlhf-sweep: error: cannot reach --storage postgresql://sweeper:***@127.0.0.1:{port}/studies: "
                   "connection refused; is the server running and reachable from this machine?")
    assert seconds < 10
    assert not (tmp_path / "out").exists()


def test_unreachable_tracking_uri_fails_fast_in_one_line(tmp_path):
    port = free_port()
    r, seconds = run_cli("--tracking-uri", f"http://127.0.0.1:{port}", "--storage", str(tmp_path / "study.journal"),
                         "--out", str(tmp_path / "out"), cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert err == (f"rlhf-sweep: error: cannot reach --tracking-uri http://127.0.0.1:{port}: connection refused; "
                   "is the MLflow server running and reachable from this machine?")
    assert seconds < 10
    assert not (tmp_path / "out").exists() and not (tmp_path / "study.journal").exists()
