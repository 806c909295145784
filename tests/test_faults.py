"""Faults and damaged state: every failure is one line naming the problem, no finished result is lost,
and a study journal whose last record was cut short can be repaired.

The fast tests build the damaged states themselves (a real Optuna journal, a real MLflow store, real
cached artefacts) and run the `rlhf-sweep` commands on them as subprocesses, all at once from one
fixture; the e2e tests run the tiny pipeline (a few seconds a run) where a case needs a finished run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from rlhf_sweep.app import cli as app_cli
from rlhf_sweep.app import ui
from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import Config, ConfigError
from rlhf_sweep.run import pipeline, tracking
from rlhf_sweep.study import definition, journal
from rlhf_sweep.study.spec import load_spec
from rlhf_sweep.study.storage import load_study, open_storage
from rlhf_sweep.utils.runtime import cores

from .conftest import TINY
from .test_cluster import free_port

ROOT = Path(__file__).resolve().parent.parent
ERROR = "rlhf-sweep: error: "


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_sweep", *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one line a failing command prints (stderr holds nothing else)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR), f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return lines[0][len(ERROR):]


# ----- damaged states, built for real ---------------------------------------------------------------
def make_journal(path: Path, name: str = "smoke") -> dict[int, list[float]]:
    """A journal with three complete trials (the smoke study's settings stored, as a sweep stores them) and,
    last, a study attribute: the record a crash cuts. Returns {trial number: values}."""
    study = optuna.create_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))),
                                directions=["maximize", "minimize"])
    study.set_user_attr("spec", json.loads(json.dumps(load_spec("smoke").to_dict(), default=str)))
    for i in range(3):
        t = study.ask()
        t.suggest_float("ppo.beta", 0.01, 1.0, log=True)
        t.set_user_attr("metrics", {"gold/policy": -1.0 + 0.1 * i, "kl/exact": 1.0 + i})
        study.tell(t, [-1.0 + 0.1 * i, 1.0 + i])
    study.set_user_attr("last", "the record a crash cuts")
    return {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}


def tear(path: Path, n: int = 5) -> None:
    """A crash or a full disk mid-append: the last record loses its end (as `truncate -s -5`)."""
    os.truncate(path, path.stat().st_size - n)


def complete_trials(path: Path, name: str = "smoke") -> dict[int, list[float]]:
    """What Optuna itself reads from a journal (its reader skips an unterminated last line)."""
    study = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))
    return {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}


_STORE: list[Path] = []


def make_store(path: Path) -> str:
    """A real MLflow SQLite store at `path` (made once, then copied: making one runs MLflow's migrations)."""
    if not _STORE:
        import tempfile

        first = Path(tempfile.mkdtemp(prefix="rlhf-sweep-store-")) / "mlflow.db"
        tracking.client_for(f"sqlite:///{first}")
        _STORE.append(first)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(_STORE[0], path)
    return f"sqlite:///{path}"


def unwritable(path: Path) -> bool:
    """Make a file or folder refuse writes even to root (chattr +i), or by mode for other users; False if impossible."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            return False
    else:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        if path.is_dir():
            (path / "probe").touch()
            (path / "probe").unlink()
        else:
            open(path, "ab").close()
    except OSError:
        return True
    writable(path)
    return False


def writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture
def locked_paths():
    """Paths made unwritable by a test, made writable again afterwards (so tmp_path can be removed)."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        writable(p)


# ----- every bad-input and damaged-state case, run once through the CLI -----------------------------
class Case:
    def __init__(self, name: str, args: list[str], rc: int = 2):
        self.name, self.args, self.rc = name, args, rc
        self.result: subprocess.CompletedProcess | None = None
        self.seconds = 0.0


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Each case gets a folder of its own (the command's working directory) with its damaged state;
    all run at once. Returns {name: (Case, folder, what the test needs to look at afterwards)}."""
    base = tmp_path_factory.mktemp("faults")
    port = free_port()  # nothing listens there
    made: dict[str, tuple[Case, Path, dict]] = {}
    lock: list[Path] = []

    def case(name: str, build) -> None:
        d = base / name
        d.mkdir()
        args, info, rc = build(d)
        made[name] = (Case(name, args, rc), d, info)

    def torn_journal(d: Path) -> dict:
        j = d / "study.journal"
        intact = make_journal(j)
        tear(j)
        return {"journal": j, "bytes": j.read_bytes(), "intact": intact}

    def damaged_journal(d: Path) -> dict:
        j = d / "study.journal"
        make_journal(j)
        lines = j.read_bytes().split(b"\n")
        lines[2] = lines[2][:20] + b"\x00garbage" + lines[2][20:]
        j.write_bytes(b"\n".join(lines))
        return {"journal": j, "bytes": j.read_bytes()}

    def garbage(path: Path, n: int = 4096) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(n))
        return path

    def readonly_store(d: Path) -> str | None:
        db = d / "mlflow.db"
        uri = make_store(db)
        if not unwritable(db):
            return None
        lock.append(db)
        return uri

    case("seed", lambda d: (["run", "seed=-1"], {}, 2))
    case("run_server", lambda d: (["run", *TINY, f"mlflow.tracking_uri=http://127.0.0.1:{port}"], {}, 2))
    case("run_garbage_store", lambda d: (["run", *TINY, f"mlflow.tracking_uri=sqlite:///{garbage(d / 'mlflow.db')}"], {}, 2))
    case("run_store_folder", lambda d: (["run", *TINY, f"mlflow.tracking_uri=sqlite:///{d}/"], {}, 2))
    case("run_dir_under_file", lambda d: (["run", *TINY, f"hydra.run.dir={garbage(d / 'afile')}/run", "mlflow.enabled=false"], {}, 2))

    def run_readonly(d: Path):
        uri = readonly_store(d)
        return (["run", *TINY, f"mlflow.tracking_uri={uri}"] if uri else ["run", "seed=-1"]), {"skip": uri is None}, 2
    case("run_readonly_store", run_readonly)

    def sweep_readonly(d: Path):
        uri = readonly_store(d)
        args = ["sweep", "smoke", "--storage", str(d / "s.journal"), "--out", str(d / "out"), "--tracking-uri", str(uri)]
        return (args if uri else ["run", "seed=-1"]), {"skip": uri is None}, 2
    case("sweep_readonly_store", sweep_readonly)

    case("fixes_server", lambda d: (["compare-fixes", "--out", str(d / "out"), "--tracking-uri", f"http://127.0.0.1:{port}"], {}, 2))

    def sweep_torn(d: Path):
        info = torn_journal(d)
        return ["sweep", "smoke", "--storage", str(info["journal"]), "--out", str(d / "out"), "--tracking-uri",
                f"sqlite:///{d / 'mlflow.db'}"], info, 2
    case("sweep_torn", sweep_torn)

    def report_torn(d: Path):
        info = torn_journal(d)
        return ["report", "smoke", "--storage", str(info["journal"]), "--out", str(d / "out")], info, 2
    case("report_torn", report_torn)

    def sweep_damaged(d: Path):
        info = damaged_journal(d)
        return ["sweep", "smoke", "--storage", str(info["journal"]), "--out", str(d / "out")], info, 2
    case("sweep_damaged", sweep_damaged)

    def repair_damaged(d: Path):
        info = damaged_journal(d)
        return ["repair", "smoke", "--storage", str(info["journal"])], info, 2
    case("repair_damaged", repair_damaged)
    case("repair_database", lambda d: (["repair", "smoke", "--storage", f"sqlite:///{d / 'o.db'}"], {}, 2))
    case("repair_missing", lambda d: (["repair", "smoke", "--out", str(d / "nowhere")], {}, 2))
    case("storage_folder", lambda d: (["sweep", "smoke", "--storage", str(d / "some" / "dir") + "/", "--out", str(d / "out")], {}, 2))

    case("optuna_garbage_db", lambda d: (["sweep", "smoke", "--storage", f"sqlite:///{garbage(d / 'o.db')}", "--out", str(d / "out")],
                                         {}, 2))

    def explain_garbage(d: Path):
        garbage(d / "run" / "summary.json", 300)
        return ["explain", str(d / "run")], {}, 2
    case("explain_garbage_summary", explain_garbage)

    def log_garbage(d: Path):
        garbage(d / "run" / "summary.json", 300)
        return ["log", str(d / "run"), "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}"], {}, 2
    case("log_garbage_summary", log_garbage)
    case("log_missing_run", lambda d: (["log", str(d / "norun")], {}, 2))

    def run_one(c: Case, d: Path) -> None:
        t0 = time.monotonic()
        c.result = cli(*c.args, cwd=d)
        c.seconds = time.monotonic() - t0

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda item: run_one(item[0], item[1]), made.values()))
    yield made
    for p in lock:
        writable(p)


def test_no_traceback_reaches_the_user(cases):
    """Every bad-input and damaged-state case: its exit status, one line on stderr, and no traceback anywhere."""
    for name, (c, _d, _info) in cases.items():
        r = c.result
        assert "Traceback" not in r.stdout + r.stderr, f"{name}: {c.args}\n{r.stdout}\n{r.stderr}"
        assert r.returncode == c.rc, f"{name}: rc={r.returncode}\n{r.stderr}"
        error_line(r)


def result(cases, name: str) -> tuple[str, Path, dict, Case]:
    c, d, info = cases[name]
    if info.get("skip"):
        pytest.skip("cannot make a file unwritable here (needs chattr as root, or a non-root user)")
    return error_line(c.result), d, info, c


# ----- start-up checks -----------------------------------------------------------------------------
def int_keys(node, prefix: str = ""):
    import dataclasses

    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if dataclasses.is_dataclass(v):
            yield from int_keys(v, f"{prefix}{f.name}.")
        elif type(v) is int:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("key", list(int_keys(Config())))
def test_every_integer_knob_is_range_checked(key):
    algo = key.split(".")[0] if key.split(".")[0] in ("rloo", "grpo", "dpo", "bon") else None  # their knobs need algo=
    with pytest.raises(ConfigError) as e:
        compose([f"{key}=-1", *([f"algo={algo}"] if algo else [])])
    msg = str(e.value)
    assert msg.startswith(f"{key}=-1 is invalid: {key} accepts an integer") and "\n" not in msg


def test_seed_range_is_in_the_message(cases, tmp_path):
    line, d, _, _ = result(cases, "seed")
    assert line == "seed=-1 is invalid: seed accepts an integer in [0, 4294967295]"
    assert not (d / "outputs").exists()  # failed before Hydra made a run directory
    with pytest.raises(ConfigError, match=r"seed accepts an integer in \[0, 4294967295\]"):
        compose([f"seed={2**32}"])
    compose([f"seed={2**32 - 1}"])


def test_unreachable_server_fails_run_before_work(cases):
    line, d, _, c = result(cases, "run_server")
    assert line.startswith("cannot reach mlflow.tracking_uri http://127.0.0.1:") and "connection refused" in line
    assert c.seconds < 30 and not (d / "outputs").exists()  # no run directory, no artefact built
    line, d, _, _ = result(cases, "fixes_server")
    assert line.startswith("cannot reach --tracking-uri http://127.0.0.1:") and not (d / "out").exists()


def test_unwritable_store_fails_every_command_before_work(cases, tmp_path, locked_paths):
    for name, what in (("run_readonly_store", "outputs"), ("sweep_readonly_store", "out")):
        line, d, _, _ = result(cases, name)
        assert line.startswith("cannot write to the MLflow store ") and str(d / "mlflow.db") in line, (name, line)
        assert not (d / what).exists(), name
    assert not (cases["sweep_readonly_store"][1] / "s.journal").exists()  # nor a study
    # report and compare-fixes: the same check, raised as the errors their commands print as one line
    from rlhf_sweep.fixes import compare
    from rlhf_sweep.reporting import report
    from rlhf_sweep.study.spec import StudyError

    uri = make_store(tmp_path / "mlflow.db")
    assert unwritable(tmp_path / "mlflow.db")
    locked_paths.append(tmp_path / "mlflow.db")
    make_journal(tmp_path / "study.journal")
    with pytest.raises(StudyError, match=r"^cannot write to the MLflow store --tracking-uri sqlite:///"):
        report.report("smoke", storage=str(tmp_path / "study.journal"), tracking_uri=uri, out=str(tmp_path / "report"))
    with pytest.raises(compare.FixesError, match=r"^cannot write to the MLflow store --tracking-uri sqlite:///"):
        compare.compare_fixes(tracking_uri=uri, out=str(tmp_path / "fixes"))
    assert not (tmp_path / "report").exists() and not (tmp_path / "fixes").exists()


def test_damaged_store_and_bad_paths_are_named(cases):
    line, d, _, _ = result(cases, "run_garbage_store")
    assert "file is not a database" in line and str(d / "mlflow.db") in line and "move the file aside" in line
    line, *_ = result(cases, "run_store_folder")
    assert "names a directory" in line
    line, d, _, _ = result(cases, "run_dir_under_file")
    assert line.startswith(f"cannot write to hydra.run.dir {d / 'afile'}/run: ") and "is a file" in line


def test_storage_folder_is_one_line_and_creates_nothing(cases, tmp_path):
    line, d, _, _ = result(cases, "storage_folder")
    assert line.startswith(f"--storage {d / 'some' / 'dir'}/ is a folder; give a journal file path")
    assert not (d / "some").exists() and not (d / "out").exists()

    (tmp_path / "adir").mkdir()
    with pytest.raises(journal.JournalError, match=r"^--storage .*/adir is a folder; give a journal file path"):
        load_study("smoke", storage=str(tmp_path / "adir"))
    assert not any((tmp_path / "adir").iterdir())


# ----- the study journal ---------------------------------------------------------------------------
def test_torn_journal_stops_every_command_without_writing(cases):
    for name in ("sweep_torn", "report_torn"):
        line, d, info, _ = result(cases, name)
        j = info["journal"]
        assert line.startswith(f"the study journal {j} ends in a torn record (line ") and "nothing was written" in line
        assert f"`rlhf-sweep repair smoke --storage {j}`" in line
        assert j.read_bytes() == info["bytes"], name  # not one byte appended
        assert not (d / "out").exists() and not (d / "mlflow.db").exists()


def test_repair_drops_only_the_torn_tail(tmp_path):
    j = tmp_path / "study.journal"
    intact_trials = make_journal(j)
    intact = j.read_bytes()
    tear(j)
    torn = j.read_bytes()
    assert complete_trials(j) == intact_trials  # what Optuna reads past the torn tail: the trials are all there

    r = cli("repair", "smoke", "--storage", str(j), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (backup,) = tmp_path.glob("study.journal.bak-*")
    assert backup.read_bytes() == torn  # the file as it was
    last_line = intact.rstrip(b"\n").rsplit(b"\n", 1)[0] + b"\n"
    assert j.read_bytes() == last_line  # only the cut record is gone
    assert complete_trials(j) == intact_trials
    n_lines = intact.count(b"\n")
    assert r.stdout.strip() == (f"repaired {j}: dropped the torn last record (line {n_lines}, "
                                f"{len(torn) - len(last_line)} bytes); backup: {backup}; study 'smoke': 3 complete")
    journal.check(str(j))  # opens cleanly now

    again = cli("repair", "smoke", "--storage", str(j), cwd=tmp_path)
    assert again.returncode == 0 and "no damage found, nothing changed" in again.stdout
    assert len(list(tmp_path.glob("study.journal.bak-*"))) == 1 and j.read_bytes() == last_line


def test_an_append_onto_a_torn_end_is_refused(tmp_path):
    """A process that died mid-append while others run: their next record is not glued onto its cut one."""

    j = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(str(j)), directions=["maximize"])
    t = study.ask()
    study.tell(t, [1.0])
    with open(j, "ab") as f:  # what the dead process left: a record without its end
        f.write(b'{"op_code":8,"worker_id":"w","trial_id":0,"user_attr":{"se')
    torn = j.read_bytes()
    with pytest.raises(journal.JournalError, match="ends in a torn record"):
        study.set_user_attr("after", 1)
    assert j.read_bytes() == torn and not list(tmp_path.glob("*.lock"))  # nothing written, the lock released
    assert cli("repair", "s", "--storage", str(j), cwd=tmp_path).returncode == 0
    study.set_user_attr("after", 1)
    assert complete_trials(j, "s") == {0: [1.0]}


def test_damage_before_the_end_is_reported_and_never_written(cases):
    for name in ("sweep_damaged", "repair_damaged"):
        line, d, info, _ = result(cases, name)
        assert line.startswith(f"the study journal {info['journal']} is damaged at line 3 of ") and "left as it is" in line
        assert info["journal"].read_bytes() == info["bytes"] and not list(d.glob("*.bak-*")), name
    line, *_ = result(cases, "repair_database")
    assert "repair is for journal files" in line
    line, *_ = result(cases, "repair_missing")
    assert line.startswith("no study journal at ")


# ----- cached artefacts ----------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, 2)


def trainer(module: Tiny, calls: list[int]):
    """A deterministic 'training': a few SGD steps from the module's current weights."""

    def train() -> dict:
        calls.append(1)
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(8, 3, generator=g)
            loss = module.b(torch.relu(module.a(x))).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {"loss": float(loss.detach())}

    return train


def cold_build(path: Path) -> dict[str, torch.Tensor]:
    m, calls = Tiny(), []
    pipeline.load_or_train(path, m, trainer(m, calls), torch.device("cpu"))
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("damage", ["garbage", "cut_short", "other_artefact"])
def test_unreadable_cached_artefact_is_named_set_aside_and_rebuilt(tmp_path, capsys, damage):
    want = cold_build(tmp_path / "ref" / "sft-x.pt")
    path = tmp_path / "cache" / "sft-x.pt"
    path.parent.mkdir()
    if damage == "garbage":
        path.write_bytes(os.urandom(2000))
    elif damage == "cut_short":
        good = (tmp_path / "ref" / "sft-x.pt").read_bytes()
        path.write_bytes(good[: len(good) // 2])
    else:  # a checkpoint of another shape: loading it copies layer a, then fails on b
        other = Tiny()
        other.b = torch.nn.Linear(4, 5)
        with torch.no_grad():
            other.a.weight.fill_(7.0)
        torch.save({"state": other.state_dict(), "info": {"loss": 0.0}}, path)
    damaged = path.read_bytes()
    m, calls = Tiny(), []
    info = pipeline.load_or_train(path, m, trainer(m, calls), torch.device("cpu"))

    assert calls == [1] and info["cached"] is False
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"warning: the cached artefact {path} is unreadable (") and "rebuilding it" in err[0]
    assert "weights_only" not in err[0] and "Weights only" not in err[0]  # never the advice to load it unsafely
    (aside,) = path.parent.glob("sft-x.pt.corrupt-*")
    assert aside.name in err[0] and aside.read_bytes() == damaged  # kept for inspection
    # the rebuild is the cold build (a half-done load did not leave its tensors behind), and it is cached now
    assert all(torch.equal(m.state_dict()[k], want[k]) for k in want)
    m2, calls2 = Tiny(), []
    assert pipeline.load_or_train(path, m2, trainer(m2, calls2), torch.device("cpu"))["cached"] and not calls2


def test_unreadable_artefact_that_cannot_be_moved_names_the_file_to_delete(tmp_path, locked_paths):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".locks").mkdir()
    path = cache / "rm-x.pt"
    path.write_bytes(os.urandom(500))
    if not unwritable(cache):
        pytest.skip("cannot make a folder unwritable here")
    locked_paths.append(cache)
    m = Tiny()
    with pytest.raises(pipeline.CacheError) as e:
        pipeline.load_or_train(path, m, trainer(m, []), torch.device("cpu"))
    msg = str(e.value)
    assert msg.startswith(f"the cached artefact {path} is unreadable (") and msg.endswith("delete it and run again") and "\n" not in msg


# ----- the MLflow store ----------------------------------------------------------------------------
WORKER = """
import sys, time
from pathlib import Path
uri, ready, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
from rlhf_sweep.run import tracking
import mlflow.tracking  # imports first: the race is in opening a new store
(ready / sys.argv[4]).touch()
while len(list(ready.iterdir())) < n:
    time.sleep(0.01)
client = tracking.client_for(uri)
run = tracking.start_run(client, tracking.experiment_id(client, "rlhf-sweep", uri), sys.argv[4])
client.set_terminated(run, status="FINISHED")
print(run)
"""


def test_a_new_store_is_created_once_by_concurrent_processes(tmp_path):
    """Four processes open a new SQLite store at the same moment (a barrier after their imports):
    MLflow's migrations run once, under the store's lock, and every process logs its own run."""
    uri, ready, n = f"sqlite:///{tmp_path / 'new.db'}", tmp_path / "ready", 4
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, uri, str(ready), str(n), f"w{i}"], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, "\n".join(err[-1500:] for _, err in outs)
    ids = {out.strip() for out, _ in outs}
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(tracking_uri=uri).search_runs([MlflowClient(tracking_uri=uri).get_experiment_by_name("rlhf-sweep").experiment_id])
    assert len(ids) == n and {r.info.run_id for r in runs} == ids and all(r.info.status == "FINISHED" for r in runs)


def test_log_refuses_a_run_directory_without_a_readable_summary(cases):
    line, d, _, _ = result(cases, "log_garbage_summary")
    assert line.startswith(f"{d / 'run' / 'summary.json'} is not readable JSON (")
    assert not (d / "mlflow.db").exists()  # checked before the store was touched
    line, d, _, _ = result(cases, "log_missing_run")
    assert line.startswith(f"{d / 'norun' / 'summary.json'} not found")
    line, d, _, _ = result(cases, "explain_garbage_summary")
    assert line.startswith(f"{d / 'run' / 'summary.json'} is not readable JSON")


# ----- with a finished run (e2e) -------------------------------------------------------------------
def run_cmd(tmp: Path, run_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_sweep", "run", *TINY, f"cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / run_dir}", *extra]


@pytest.mark.e2e
def test_store_failing_after_the_run_keeps_it_and_log_sends_it_later(tmp_path, locked_paths):
    uri = make_store(tmp_path / "mlflow.db")
    db = tmp_path / "mlflow.db"
    p = subprocess.Popen(run_cmd(tmp_path, "run", f"mlflow.tracking_uri={uri}"), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()  # printed once the start-up checks passed: the store fails from here on
    assert first.startswith("run directory: "), first + p.stderr.read()
    if not unwritable(db):
        p.kill()
        pytest.skip("cannot make a file unwritable here")
    locked_paths.append(db)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1 and "Traceback" not in out + err, err[-3000:]
    assert "humans prefer the reference" in out and "KL exact" in out  # the results table is printed anyway
    line = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert line.startswith(f"{ERROR}logging to MLflow ({uri}) failed: ") and f"`rlhf-sweep log {tmp_path / 'run'}`" in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())

    writable(db)
    r = cli("log", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("MLflow: run "), r.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rlhf-sweep").experiment_id], "attributes.status = 'FINISHED'")
    assert run.data.metrics["gold/win_rate"] == pytest.approx(summary["metrics"]["gold/win_rate"])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "kl/exact")) == [0, 1, 2, 3]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "trajectory.png"}
    again = cli("log", str(tmp_path / "run"), cwd=tmp_path)
    assert again.returncode == 0 and "already logged there: nothing sent" in again.stdout
    assert len(client.search_runs([run.info.experiment_id], "attributes.status = 'FINISHED'")) == 1


@pytest.mark.e2e
def test_damaged_cache_file_is_rebuilt_and_the_run_is_unchanged(tmp_path):
    first = subprocess.run(run_cmd(tmp_path, "r1", "mlflow.enabled=false"), cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    (sft,) = (tmp_path / "cache").glob("sft-*.pt")
    good = torch.load(sft, weights_only=True)
    sft.write_bytes(sft.read_bytes()[:1000])  # cut short
    r = subprocess.run(run_cmd(tmp_path, "r2", "mlflow.enabled=false"), cwd=tmp_path, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and warn[0].startswith(f"warning: the cached artefact {sft} is unreadable ("), r.stderr
    assert "SFT reference: trained" in r.stdout
    rebuilt = torch.load(sft, weights_only=True)
    assert all(torch.equal(rebuilt["state"][k], good["state"][k]) for k in good["state"])
    m1 = json.loads((tmp_path / "r1" / "summary.json").read_text())["metrics"]
    m2 = json.loads((tmp_path / "r2" / "summary.json").read_text())["metrics"]
    assert m1 == m2  # the same run as before the damage


@pytest.mark.e2e
def test_runs_started_together_on_a_new_store_each_log_their_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen(run_cmd(tmp_path, f"r{i}", f"mlflow.tracking_uri={uri}"), cwd=tmp_path, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for _, e in outs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("rlhf-sweep").experiment_id])
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == ["r0", "r1"] and all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.e2e
def test_torn_study_repaired_then_resumed_to_n_trials(tmp_path):
    """A sweep's journal cut in its last record (a trial's COMPLETE): the command stops without writing;
    repair keeps every complete trial Optuna had; the same sweep command then ends with n_trials complete."""
    spec = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**spec, "seeds": 1, "n_trials": 2}))  # the smoke study, one seed a trial
    cmd = ["sweep", str(tmp_path / "tiny.yaml"), "--storage", str(tmp_path / "study.journal"), "--out", str(tmp_path / "out"),
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    r = cli(*cmd, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    j = tmp_path / "study.journal"
    tear(j)
    before = complete_trials(j, "tiny")
    assert len(before) == 1  # the torn record was the last trial's COMPLETE: Optuna never read it
    torn = j.read_bytes()
    stopped = cli(*cmd, cwd=tmp_path)
    assert stopped.returncode == 2 and "torn record" in error_line(stopped) and j.read_bytes() == torn
    assert cli("repair", "tiny", "--storage", str(j), cwd=tmp_path).returncode == 0
    assert complete_trials(j, "tiny") == before
    r = cli(*cmd, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and "trials: 2 complete" in r.stdout, r.stderr[-2000:]
    after = complete_trials(j, "tiny")
    assert len(after) == 2 and all(after[n] == v for n, v in before.items())


# ----- a study stays one experiment (issue 28) -------------------------------------------------------
def tiny_study(path: Path, **changes) -> Path:
    """The smoke study with one seed and one trial (seconds), `changes` applied: {"fixed.ppo.iterations": 5}."""
    raw = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    raw.update(seeds=1, n_trials=1)
    for key, value in changes.items():
        section, _, sub = key.partition(".")
        if sub:
            raw[section][sub] = value
        else:
            raw[section] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep_args(study: Path, tmp: Path, *extra: str) -> list[str]:
    return ["sweep", str(study), "--storage", str(tmp / "study.journal"), "--out", str(tmp / "out"),
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra]


def refusal(capsys, args: list[str]) -> str:
    """The one line `rlhf-sweep ARGS` fails with (exit status 2), run in this process."""
    with pytest.raises(SystemExit) as exc:
        app_cli.main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(ERROR) and "Traceback" not in err, err
    return err[len(ERROR):]


@pytest.mark.parametrize("changes, expected", [
    ({"fixed.ppo.iterations": 5, "fixed.rm.n_pairs": 200}, "(fixed rm.n_pairs: 256 -> 200; fixed ppo.iterations: 3 -> 5)"),
    ({"space.ppo.clip_eps": {"type": "float", "low": 0.1, "high": 0.25}}, "(space ppo.clip_eps: float [0.1, 0.3] -> float [0.1, 0.25])"),
    ({"seeds": [0, 7]}, "(seeds: [0] -> [0, 7])"),
])
def test_an_edited_study_is_refused_before_any_trial(tmp_path, capsys, changes, expected):
    """A study as the sweep records it, then the same study name from an edited file: one line that says what
    changed and how to start a new study; nothing runs or is written."""
    spec = load_spec(str(tiny_study(tmp_path / "tiny.yaml")))
    j = tmp_path / "study.journal"
    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(j))), directions=spec.directions)
    definition.guard(study, spec, "", "")  # what `sweep` records when it creates the study
    before = study.user_attrs
    edited = tiny_study(tmp_path / "edited" / "tiny.yaml", **changes)
    line = refusal(capsys, sweep_args(edited, tmp_path, "--n-trials", "3"))
    new = definition.new_study_name("tiny", load_spec(str(edited)))
    assert line == (f"study 'tiny' in {j} was made with another definition {expected}; its trials and these would share one "
                    f"front and one report: run the edited file as a new study with --new-study (it makes {new} in "
                    f"{tmp_path / 'out'}{new[4:]}), or pass another --out (and --name NEW if the storage is shared)")
    after = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(j))))
    assert after.user_attrs == before and not after.trials and not (tmp_path / "out").exists()
    # --new-study names the edited file's study the same way every time
    assert new != definition.new_study_name("tiny", spec) and new == definition.new_study_name("tiny", load_spec(str(edited)))


def test_what_is_not_the_experiment_does_not_change_it(tmp_path):
    """n_trials, the sampler and its options, the description and run-only keys (mlflow) leave the definition as it is;
    a study made before definitions were recorded is accepted and gets this one recorded."""
    spec = load_spec(str(tiny_study(tmp_path / "a" / "tiny.yaml")))
    more = load_spec(str(tiny_study(tmp_path / "b" / "tiny.yaml", n_trials=9, sampler="random", sampler_options={},
                                    description="other words", sampler_seed=3, **{"fixed.mlflow.enabled": False})))
    assert definition.definition(spec) == definition.definition(more)
    old = optuna.create_study(study_name="old", directions=spec.directions)
    old.set_user_attr("spec", {"name": "old"})  # as a sweep stored it before the fingerprint existed
    definition.guard(old, spec, "study 'old'", "")
    assert old.user_attrs[definition.FINGERPRINT_ATTR] == definition.fingerprint(definition.definition(spec))
    definition.guard(old, more, "study 'old'", "")  # the same experiment: accepted
    with pytest.raises(definition.DefinitionChanged, match=r"fixed ppo.iterations: 3 -> 4\)"):
        definition.guard(old, load_spec(str(tiny_study(tmp_path / "c" / "tiny.yaml", **{"fixed.ppo.iterations": 4}))), "", "")


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "."])
def test_a_study_name_stays_under_its_folder(tmp_path, capsys, name):
    line = refusal(capsys, [*sweep_args(tiny_study(tmp_path / "tiny.yaml"), tmp_path), "--name", name])
    assert line.startswith(f"--name {name!r}: a study name is one folder name under outputs/studies")
    assert not (tmp_path / "out").exists() and not (tmp_path / "study.journal").exists()


def test_workers_are_capped_at_the_cores(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app_cli.main([*sweep_args(tiny_study(tmp_path / "tiny.yaml", n_trials=1000), tmp_path), "--workers", "1000", "--dry-run"])
    out = capsys.readouterr().out
    n = cores()
    assert f"note: --workers 1000: this machine runs {n} at once (cores available to this process); using {n}" in out
    assert f"with {n} worker(s)" in out


@pytest.mark.parametrize("ports, expected", [
    (("70000", "5000"), "--optuna-port 70000: a port is in 0-65535 (0: any free port)"),
    (("8080", "-1"), "--mlflow-port -1: a port is in 0-65535 (0: any free port)"),
    (("8123", "8123"), "--optuna-port and --mlflow-port are both 8123: the two servers need two ports"),
])
def test_ui_ports_are_checked_before_any_server_starts(tmp_path, capsys, ports, expected):
    line = refusal(capsys, ["ui", str(tmp_path / "nothing"), "--optuna-port", ports[0], "--mlflow-port", ports[1]])
    assert line.startswith(expected)
    ui.check_ports(0, 0)  # 0: each picks a free port, never the other's


@pytest.mark.e2e
def test_an_edited_study_resumes_only_as_a_new_study(tmp_path):
    """The issue's case: a sweep, then the file edited under `fixed:` and more trials on the same --out: refused
    with no trial run; with --new-study the edited file runs as a study of its own and the first keeps its trial."""
    first = tiny_study(tmp_path / "tiny.yaml")
    r = cli(*sweep_args(first, tmp_path), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    edited = tiny_study(tmp_path / "edited" / "tiny.yaml", **{"fixed.ppo.iterations": 5, "fixed.rm.n_pairs": 200})
    r = cli(*sweep_args(edited, tmp_path, "--n-trials", "2"), cwd=tmp_path)
    assert "(fixed rm.n_pairs: 256 -> 200; fixed ppo.iterations: 3 -> 5)" in error_line(r) and r.returncode == 2
    assert len(complete_trials(tmp_path / "study.journal", "tiny")) == 1 and not (tmp_path / "out" / "trials" / "t0001").exists()
    new = definition.new_study_name("tiny", load_spec(str(edited)))
    r = cli(*sweep_args(edited, tmp_path, "--n-trials", "1", "--new-study"), cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and f"--new-study: study {new}" in r.stdout, r.stderr[-2000:]
    assert len(complete_trials(tmp_path / "study.journal", new)) == 1 and len(complete_trials(tmp_path / "study.journal", "tiny")) == 1
    summary = json.loads((tmp_path / f"out{new[4:]}" / "trials" / "t0000" / "seed-0" / "summary.json").read_text())
    assert (summary["config"]["ppo"]["iterations"], summary["config"]["rm"]["n_pairs"]) == (5, 200)
