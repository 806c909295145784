"""Issue 14's fault cases, re-run against the `rlhf-sweep` command: one markdown table row per command.

    .venv/bin/python bench/faults_table.py [--out DIR]

Every case builds its damaged state for real in a folder of its own under a scratch directory
(a new temporary one, or --out DIR, which must be empty or absent) and runs the real command as a
subprocess there (`python -m rlhf_sweep.cli ...`, working directory = that folder, PYTHONPATH = this
repository), so the paths in the commands and messages are relative to the case's folder. Runs use
the tests' tiny config ($TINY below, from tests/conftest.py: a few seconds a run) and one SFT/RM cache
shared by all cases (../cache). The cases, in the issue's order:

  1. `run seed=-1`                         exit 2, one line with seed's range, no run directory
  2. a finished tiny study whose optuna.journal is cut by `truncate -s -5`: report and sweep stop
     with one line naming the repair command, repair keeps a backup and the complete trials,
     then the sweep continues past its n_trials
  3. a cached SFT artefact cut short, a cached RM artefact of garbage: one warning, moved aside, rebuilt
  4. an MLflow SQLite store that refuses writes: before the run starts (one line, exit 2, nothing
     left), and from just after the start-up checks (table printed, summary.json kept, exit 1,
     then `rlhf-sweep log` sends it once the store takes writes again)
  5. `run mlflow.tracking_uri=http://127.0.0.1:9` (nothing listening): one line within seconds
  6. two, then four, `run` processes started together on a new SQLite store: all exit 0, one MLflow run each
  7. `--storage some/dir/` (trailing slash, absent): one line, nothing created

Each row's check column says what was verified beyond the exit status, always including that no
"Traceback" appears in the command's stdout or stderr. A check that does not hold is marked FAIL and
the script exits 1. Every command's full stdout and stderr are kept in DIR/logs/. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY  # noqa: E402  (the tests' tiny config: one definition for both)
from tests.test_faults import unwritable, writable  # noqa: E402  (and how they lock a file, even to root)

ERROR = "rlhf-sweep: error: "
LOGS: list[Path] = []  # where each command's full stdout and stderr are kept (set by main)
CACHE = "cache_dir=../cache"  # one SFT/RM cache for every case, beside the case folders


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}


def shown(args: list[str]) -> str:
    """The command as a user types it, with the tiny overrides abbreviated to $TINY."""
    text = " ".join(["rlhf-sweep", *args])
    return text.replace(" ".join(TINY), "$TINY")


@dataclass
class Row:
    case: str
    command: str
    rc: str
    line: str
    checks: list[str] = field(default_factory=list)
    failed: bool = False

    def check(self, ok: bool, text: str) -> None:
        """A verified fact for the check column (marked FAIL when it does not hold)."""
        self.checks.append(text if ok else f"**FAIL: {text}**")
        self.failed |= not ok

    def note(self, text: str) -> None:
        """A measured fact for the check column that has no pass/fail threshold."""
        self.checks.append(text)


@dataclass
class Result:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def __post_init__(self) -> None:
        if LOGS:
            n = len(list(LOGS[0].iterdir())) + 1
            (LOGS[0] / f"{n:02d}-{self.args[0]}.txt").write_text(
                f"$ {shown(self.args)}\nexit {self.rc}, {self.seconds:.1f} s\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}")

    def stderr_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    def stdout_line(self, prefix: str) -> str:
        return next((ln for ln in self.stdout.splitlines() if ln.startswith(prefix)), f"(no stdout line starting {prefix!r})")


def cli(args: list[str], cwd: Path, timeout: float = 300) -> Result:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "rlhf_sweep", *args], cwd=cwd, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    return Result(args, r.returncode, r.stdout, r.stderr, time.monotonic() - t0)


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlhf_sweep", *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def row(case: str, r: Result, want_rc: int, line: str | None = None) -> Row:
    """A row for one command: exit status against the expected one, no traceback, and (for a failure)
    exactly one line on stderr, which is the row's line unless `line` is given."""
    err = r.stderr_lines()
    out = Row(case, shown(r.args), str(r.rc), line if line is not None else (err[-1] if err else "(nothing on stderr)"))
    out.check(r.rc == want_rc, f"exit {want_rc}")
    out.check("Traceback" not in r.stdout + r.stderr, "no traceback")
    if want_rc != 0:
        out.check(len(err) == 1 and err[0].startswith(ERROR), f"stderr lines: {len(err)}")
    return out


def folder(base: Path, name: str) -> Path:
    d = base / name
    d.mkdir()
    return d


# ----- helpers for damaged state ------------------------------------------------------------------
def new_store(db: Path) -> str:
    """A real, empty MLflow SQLite store at `db` (as `rlhf-sweep` creates one); returns its relative URI."""
    from rlhf_sweep.run import tracking
    from rlhf_sweep.utils import runtime

    runtime.quiet_libraries()  # before MLflow is imported: no "Creating initial MLflow database tables..."
    tracking.client_for(f"sqlite:///{db.resolve()}")
    return f"sqlite:///{db.name}"


def mlflow_runs(db: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
    exp = client.get_experiment_by_name("rlhf-sweep")
    return client.search_runs([exp.experiment_id]) if exp else []


def trials(journal: Path, study: str) -> list:
    """The study's trials as Optuna itself reads the journal (its reader skips an unterminated last line)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study, storage=JournalStorage(JournalFileBackend(str(journal)))).get_trials()


def complete_trials(journal: Path, study: str) -> dict[int, list[float]]:
    return {t.number: t.values for t in trials(journal, study) if t.state.name == "COMPLETE"}


def numbers(trials: dict) -> str:
    return "{" + ",".join(map(str, sorted(trials))) + "}"


def same_weights(path: Path, original: bytes) -> bool:
    """Whether the cached artefact at `path` holds the same tensors as the file whose bytes were `original`."""
    import io

    import torch

    a = torch.load(path, weights_only=True)["state"]
    b = torch.load(io.BytesIO(original), weights_only=True)["state"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def summary_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["metrics"]


# ----- the cases -----------------------------------------------------------------------------------
def case_seed(base: Path) -> list[Row]:
    d = folder(base, "1-seed")
    r = cli(["run", "seed=-1"], d)
    out = row("1. bad seed", r, 2)
    out.check("seed" in out.line and "[0, 4294967295]" in out.line, "names seed and its range")
    out.check(not any(d.iterdir()), f"run dir left: {'yes' if any(d.iterdir()) else 'no'}")
    return [out]


def case_torn_journal(base: Path) -> list[Row]:
    import yaml

    d = folder(base, "2-journal")
    spec = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    spec["fixed"]["cache_dir"] = "../cache"
    (d / "tiny.yaml").write_text(yaml.safe_dump({**spec, "seeds": 1, "n_trials": 2}))  # the smoke study, one seed a trial
    sweep = ["sweep", "tiny.yaml", "--out", "out", "--tracking-uri", "sqlite:///mlflow.db"]
    j = d / "out" / "optuna.journal"
    rows = []

    r = cli(sweep, d)
    intact = complete_trials(j, "tiny") if j.exists() else {}
    out = row("2. torn journal: a finished tiny study (smoke, 1 seed, n_trials 2)", r, 0, r.stdout_line("trials:"))
    out.check(len(intact) == 2, f"complete trials: {numbers(intact)}")
    rows.append(out)

    t = subprocess.run(["truncate", "-s", "-5", str(j.relative_to(d))], cwd=d, capture_output=True, text=True)
    torn = j.read_bytes()
    last_record = torn.rsplit(b"\n", 1)[-1]
    what = "the last trial's COMPLETE record" if b'"op_code":6' in last_record and b'"state":1' in last_record else "its last record"
    read = complete_trials(j, "tiny")
    out = Row("2. cut the last record short", f"truncate -s -5 {j.relative_to(d)}", str(t.returncode),
              f"(cuts {what}: {len(last_record)} bytes left without their end)")
    out.check(t.returncode == 0, "exit 0")
    out.note(f"complete trials as Optuna reads the torn file: {numbers(read)} (before the cut: {numbers(intact)})")
    rows.append(out)

    for name, args in (("report", ["report", "tiny", "--out", "out"]), ("sweep", sweep)):
        r = cli(args, d)
        out = row(f"2. `{name}` on the torn journal", r, 2)
        out.check("`rlhf-sweep repair tiny --storage out/optuna.journal`" in out.line, "names the repair command")
        out.check(j.read_bytes() == torn, "journal unchanged: " + ("yes" if j.read_bytes() == torn else "no"))
        rows.append(out)

    r = cli(["repair", "tiny", "--out", "out"], d)
    out = row("2. repair", r, 0, r.stdout_line("repaired"))
    backups = list(j.parent.glob("optuna.journal.bak-*"))
    out.check(len(backups) == 1 and backups[0].read_bytes() == torn, "backup = the torn file")
    repaired = complete_trials(j, "tiny")
    out.check(repaired == read, f"complete trials before/after repair: {numbers(read)} / {numbers(repaired)}, values equal")
    rows.append(out)

    r = cli([*sweep[:2], "--n-trials", "3", *sweep[2:]], d)
    resumed = complete_trials(j, "tiny")
    out = row("2. the sweep continues to n_trials + 1", r, 0, r.stdout_line("trials:"))
    kept = all(resumed.get(n) == v for n, v in repaired.items())
    out.check(len(resumed) == 3 and kept, f"complete trials: {numbers(resumed)}, those before kept: {'yes' if kept else 'no'}")
    others = [f"trial {t.number} {t.state.name}" for t in trials(j, "tiny") if t.state.name != "COMPLETE"]
    out.note("not complete: " + (", ".join(others) or "none"))
    rows.append(out)
    return rows


def case_cache(base: Path) -> list[Row]:
    d = folder(base, "3-cache")
    cache = base / "cache"
    rows = []

    def run(name: str) -> Result:
        return cli(["run", *TINY, CACHE, f"hydra.run.dir={name}", "mlflow.enabled=false"], d)

    r = run("r0")
    rows.append(row("3. a run that fills the cache", r, 0, r.stdout_line("summary:")))
    for name, stage, damage in (("r1", "sft", "cut short"), ("r2", "rm", "garbage")):
        path = d / json.loads((d / "r0" / "summary.json").read_text())["cache"][stage]["path"]  # the file the runs load
        good = path.read_bytes()
        path.write_bytes(good[:1000] if damage == "cut short" else os.urandom(4096))
        r = run(name)
        warnings = [ln for ln in r.stderr_lines() if ln.startswith("warning:")]
        out = row(f"3. cached {stage.upper()} artefact {damage}", r, 0,
                  warnings[0] if warnings else "(no warning line)")
        out.check(len(warnings) == 1 and path.name in warnings[0], "one warning naming the file")
        aside = list(cache.glob(path.name + ".corrupt-*"))
        out.check(len(aside) == 1, "moved aside: " + (aside[0].name if aside else "no"))
        out.check(same_weights(path, good), "rebuilt weights = the original's")
        same = (d / name / "summary.json").exists() and summary_metrics(d / name) == summary_metrics(d / "r0")
        out.check(same, "metrics = the undamaged run's")
        rows.append(out)
    return rows


def case_readonly_store(base: Path) -> list[Row]:
    rows = []
    d = folder(base, "4a-store")
    uri = new_store(d / "mlflow.db")
    if not unwritable(d / "mlflow.db"):
        return [Row("4. read-only MLflow store", "-", "-", "skipped: cannot make a file unwritable here (chattr as root, or non-root)")]
    try:
        r = cli(["run", *TINY, CACHE, f"mlflow.tracking_uri={uri}"], d)
    finally:
        writable(d / "mlflow.db")
    out = row("4. MLflow store read-only before the run", r, 2)
    out.check("cannot write to the MLflow store" in out.line, "names the store")
    left = (d / "outputs").exists()
    out.check(not left, f"run dir left: {'yes' if left else 'no'}")
    rows.append(out)

    d = folder(base, "4b-store")
    uri = new_store(d / "mlflow.db")
    args = ["run", *TINY, CACHE, "hydra.run.dir=run", f"mlflow.tracking_uri={uri}"]
    t0 = time.monotonic()
    p = start(args, d)
    first = p.stdout.readline()  # printed once the start-up checks passed: from here on the store refuses writes
    locked = first.startswith("run directory: ") and unwritable(d / "mlflow.db")
    try:
        stdout, stderr = p.communicate(timeout=300)
    finally:
        writable(d / "mlflow.db")
    r = Result(args, p.returncode, first + stdout, stderr, time.monotonic() - t0)
    out = row("4. MLflow store read-only from just after the start-up checks", r, 1)
    out.check(locked, "store locked after the checks")
    out.check("humans prefer the reference" in r.stdout, "table printed")
    out.check((d / "run" / "summary.json").exists(), "summary.json kept")
    out.check(f"`rlhf-sweep log {d / 'run'}`" in out.line or "`rlhf-sweep log run`" in out.line, "names `rlhf-sweep log RUN_DIR`")
    rows.append(out)

    r = cli(["log", "run"], d)
    out = row("4. ... then the store takes writes again", r, 0, r.stdout_line("MLflow: run"))
    runs = mlflow_runs(d / "mlflow.db")
    out.check(len(runs) == 1 and runs[0].info.status == "FINISHED", f"runs in the store: {len(runs)} FINISHED")
    rows.append(out)
    return rows


def case_no_server(base: Path) -> list[Row]:
    d = folder(base, "5-server")
    r = cli(["run", "mlflow.tracking_uri=http://127.0.0.1:9"], d)
    out = row("5. no tracking server", r, 2)
    out.check("http://127.0.0.1:9" in out.line, "names the URI")
    out.check(r.seconds < 30, f"wall {r.seconds:.1f} s")
    out.check(not any(d.iterdir()), f"run dir left: {'yes' if any(d.iterdir()) else 'no'}")
    return [out]


def case_concurrent(base: Path) -> list[Row]:
    rows = []
    for n in (2, 4):
        d = folder(base, f"6-together-{n}")
        uri = "sqlite:///mlflow.db"  # absent: the processes race to create it
        cmds = [["run", *TINY, CACHE, f"hydra.run.dir=r{i}", f"mlflow.tracking_uri={uri}"] for i in range(n)]
        t0 = time.monotonic()
        procs = [start(c, d) for c in cmds]  # started together: all reach the new store within the same second
        outs = [p.communicate(timeout=600) for p in procs]
        seconds = time.monotonic() - t0
        for c, p, (o, e) in zip(cmds, procs, outs, strict=True):
            Result(c, p.returncode, o, e, seconds)  # kept in the logs folder
        rcs = [p.returncode for p in procs]
        ids = [next((ln.split()[2] for ln in o.splitlines() if ln.startswith("MLflow: run ")), None) for o, _ in outs]
        runs = mlflow_runs(d / "mlflow.db")
        out = Row(f"6. {n} runs started together on a new SQLite store",
                  f"{n} × " + shown(cmds[0]).replace("hydra.run.dir=r0", f"hydra.run.dir=r{{0..{n - 1}}}"),
                  ",".join(map(str, rcs)), next((ln for ln in outs[0][0].splitlines() if ln.startswith("MLflow: run ")), "(no MLflow line)"))
        out.check(rcs == [0] * n, f"exit 0 x{n}")
        out.check(all("Traceback" not in o + e for o, e in outs), "no traceback")
        finished = {r.info.run_id for r in runs if r.info.status == "FINISHED"}
        names = sorted(r.data.tags.get("mlflow.runName", "") for r in runs)
        out.check(len(runs) == n and finished == set(ids), f"runs in the store: {len(runs)} FINISHED, one per process ({','.join(names)})")
        out.note(f"wall {seconds:.0f} s")
        rows.append(out)
    return rows


def case_storage_folder(base: Path) -> list[Row]:
    rows = []
    for cmd in ("sweep", "report"):
        d = folder(base, f"7-storage-{cmd}")
        r = cli([cmd, "smoke", "--storage", "some/dir/", "--out", "out"], d)
        out = row(f"7. `--storage` a folder path ({cmd})", r, 2)
        out.check("some/dir/" in out.line, "names the path")
        out.check(not any(d.iterdir()), "created: " + (", ".join(p.name for p in d.iterdir()) or "nothing"))
        rows.append(out)
    return rows


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="scratch directory (empty or absent; default: a new temporary directory)")
    args = ap.parse_args()
    base = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="rlhf-sweep-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    if any(base.iterdir()):
        sys.exit(f"faults_table.py: --out {base} is not empty")
    (base / "cache").mkdir()
    LOGS.append(base / "logs")
    LOGS[0].mkdir()
    t0 = time.monotonic()
    rows: list[Row] = []
    for case in (case_seed, case_torn_journal, case_cache, case_readonly_store, case_no_server, case_concurrent, case_storage_folder):
        print(f"{case.__name__} ...", file=sys.stderr, flush=True)
        try:
            rows += case(base)
        except Exception as e:  # a case this script could not carry out: a failed row, and the other cases still run
            rows.append(Row(case.__name__, "-", "-", f"{type(e).__name__}: {e}"))
            rows[-1].check(False, "the case ran to the end")
    print(f"\nScratch directory: {base} (each case in its own folder, the command's working directory; "
          f"every command's full output in {LOGS[0]})")
    print(f"$TINY = {' '.join(TINY)}\n")
    print("| case | command | exit | line printed | check |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {cell(r.case)} | `{cell(r.command)}` | {r.rc} | {cell(r.line)} | {cell('; '.join(r.checks))} |")
    failed = [r.case for r in rows if r.failed]
    print(f"\n{len(rows)} commands, {len(failed)} with a failed check; {time.monotonic() - t0:.0f} s in all")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
