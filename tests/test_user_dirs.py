"""A user's own config groups, overlays and studies, without touching the package (rlhf_sweep/paths.py):
`--config-dir DIR` / RLHF_SWEEP_CONFIG_DIR / hydra.searchpath for configs, `--studies-dir DIR` /
RLHF_SWEEP_STUDIES_DIR / ./studies for study files; every command finds them (run, sweep and its workers,
the report, compare-fixes, studies, the dry run), and an unknown name fails in one line that says where it
looked. The end-to-end test then opens the user's study in `rlhf-sweep ui` (both dashboards, no browser)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_sweep.app import cli
from rlhf_sweep.config import paths
from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import ConfigError
from rlhf_sweep.fixes import compare
from rlhf_sweep.fixes import spec as fixes_spec
from rlhf_sweep.study import spec
from rlhf_sweep.study.dryrun import duration_text

from .conftest import TINY

ROOT = Path(__file__).resolve().parent.parent

OVERLAY = """# @package _global_
# a user's experiment overlay
ppo:
  beta: 0.123
"""
WORLD = """# a user's world: the shipped default with fewer intents
defaults:
  - default
  - _self_
n_intents: 4
"""
STUDY = """description: >
  My own study. It searches the clip range under my overlay.
objectives:
  gold/policy: maximize
  kl/exact: minimize
space:
  ppo.clip_eps: {type: float, low: 0.1, high: 0.3}
fixed:
  experiment: my_overlay
  world: small
%s
seeds: 1
n_trials: 2
sampler: random
"""


@pytest.fixture
def user(tmp_path, monkeypatch) -> dict[str, Path]:
    """A config directory (an overlay and a world) and a studies directory, and a clean environment."""
    monkeypatch.delenv(paths.CONFIG_DIR_ENV, raising=False)
    monkeypatch.delenv(paths.STUDIES_DIR_ENV, raising=False)
    conf, studies, cwd = tmp_path / "my_conf", tmp_path / "my_studies", tmp_path / "cwd"
    (conf / "experiment").mkdir(parents=True)
    (conf / "world").mkdir()
    (conf / "experiment" / "my_overlay.yaml").write_text(OVERLAY)
    (conf / "world" / "small.yaml").write_text(WORLD)
    studies.mkdir()
    fixed = "\n".join(f"  {o.replace('=', ': ')}" for o in TINY if not o.startswith("progress"))
    (studies / "my_study.yaml").write_text(STUDY % fixed)
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return {"conf": conf, "studies": studies, "cwd": cwd, "tmp": tmp_path}


def cli_err(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_config_dir_adds_an_overlay_and_a_group_option(user, monkeypatch):
    with pytest.raises(ConfigError, match="experiment=my_overlay is not an option") as e:
        compose(["experiment=my_overlay"])
    assert str(paths.shipped_conf_dir()) in str(e.value) and "--config-dir" in str(e.value)  # where it looked

    monkeypatch.setenv(paths.CONFIG_DIR_ENV, str(user["conf"]))
    cfg = compose(["experiment=my_overlay", "world=small"])
    assert cfg.ppo.beta == 0.123 and cfg.world.n_intents == 4
    assert cfg.world.n_details == compose([]).world.n_details  # the rest of the shipped default world
    assert compose([]).ppo.beta == 0.03  # the overlay only when asked for
    assert "my_overlay" in fixes_spec.experiments() and "baseline" in fixes_spec.experiments()
    spec = compare.load_spec(arms=["baseline", "my_overlay", "length_penalty"], seeds=2)  # a compare-fixes arm
    assert spec.arms == ["baseline", "my_overlay", "length_penalty"]

    # still unknown: one line naming both directories
    with pytest.raises(ConfigError) as e:
        compose(["experiment=nope"])
    msg = str(e.value)
    assert "\n" not in msg and str(user["conf"]) in msg and str(paths.shipped_conf_dir()) in msg and "my_overlay" in msg
    with pytest.raises(compare.FixesError, match=str(user["conf"] / "experiment")):
        fixes_spec.arm_parts("nope")


def test_studies_by_name_from_user_dirs_and_unknown_ones(user, capsys, monkeypatch):
    err = cli_err(["sweep", "my_study", "--dry-run"], capsys)
    assert "no study 'my_study'" in err and str(paths.shipped_studies_dir()) in err and "smoke" in err

    # by path, and by name from --studies-dir (the overlay it uses must be found too)
    err = cli_err(["sweep", "my_study", "--dry-run", "--studies-dir", str(user["studies"])], capsys)
    assert "experiment=my_overlay is not an option" in err
    for argv in (["sweep", str(user["studies"] / "my_study.yaml")], ["sweep", "my_study", "--studies-dir", str(user["studies"])]):
        cli.main([*argv, "--dry-run", "--config-dir", str(user["conf"])])
        out = capsys.readouterr().out
        assert "study my_study" in out and "ppo.clip_eps" in out and "experiment=my_overlay" in out and "world=small" in out
        assert "2 to run" in out and "dry run: nothing was run" in out
        monkeypatch.delenv(paths.CONFIG_DIR_ENV)
        monkeypatch.delenv(paths.STUDIES_DIR_ENV, raising=False)
    assert not (user["cwd"] / "outputs").exists()  # a dry run writes nothing

    cli.main(["studies", "--studies-dir", str(user["studies"])])
    listing = capsys.readouterr().out
    row = next(ln for ln in listing.splitlines() if ln.startswith("my_study "))
    assert "My own study." in row and str(user["studies"]) in row and "It searches" not in row  # the first sentence
    assert any(ln.startswith("smoke ") and "shipped" in ln for ln in listing.splitlines())

    # ./studies of the working directory, and the unknown name's one line names every place it looked
    (user["cwd"] / "studies").mkdir()
    (user["cwd"] / "studies" / "local.yaml").write_text((user["studies"] / "my_study.yaml").read_text())
    assert spec.find_study_file("local") == user["cwd"] / "studies" / "local.yaml"
    err = cli_err(["sweep", "nope", "--dry-run", "--studies-dir", str(user["studies"])], capsys)
    for d in (user["studies"], user["cwd"] / "studies", paths.shipped_studies_dir()):
        assert str(d.resolve()) in err
    assert "local" in err and "my_study" in err

    err = cli_err(["studies", "--studies-dir", str(user["tmp"] / "missing")], capsys)
    assert "--studies-dir" in err and "no such directory" in err


def run_cli(*argv: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rlhf_sweep", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_run_takes_the_config_dir_like_hydra(user):
    job = run_cli("run", "--config-dir", str(user["conf"]), "experiment=my_overlay", "world=small", "--cfg", "job", cwd=user["cwd"])
    assert job.returncode == 0, job.stderr
    assert "beta: 0.123" in job.stdout and "n_intents: 4" in job.stdout
    # the same through the environment variable, and through Hydra's own hydra.searchpath
    env = run_cli("run", "experiment=my_overlay", "--cfg", "job", cwd=user["cwd"], env={paths.CONFIG_DIR_ENV: str(user["conf"])})
    hsp = run_cli("run", f"hydra.searchpath=[file://{user['conf']}]", "experiment=my_overlay", "--cfg", "job", cwd=user["cwd"])
    assert env.returncode == 0 and "beta: 0.123" in env.stdout, env.stderr
    assert hsp.returncode == 0 and "beta: 0.123" in hsp.stdout, hsp.stderr
    info = run_cli("run", "--config-dir", str(user["conf"]), "--info", "searchpath", cwd=user["cwd"])  # Hydra's own view
    assert info.returncode == 0 and f"file://{user['conf']}" in info.stdout, info.stdout + info.stderr

    bad = run_cli("run", "--config-dir", str(user["conf"]), "experiment=nope", cwd=user["cwd"])
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "experiment=nope is not an option" in bad.stderr and str(user["conf"]) in bad.stderr
    assert not (user["cwd"] / "outputs").exists()  # failed before Hydra made a run directory


@pytest.mark.e2e
def test_a_user_study_sweeps_with_two_workers_then_dry_run_and_ui_read_it(user):
    """The spawned worker and the report compose the user's overlay too (they inherit the directories); the
    study-level bar counts both workers' trials; a dry run estimates from the stored trials; `ui` serves both."""
    dirs = ("--config-dir", str(user["conf"]), "--studies-dir", str(user["studies"]))
    r = run_cli("sweep", "my_study", "--workers", "2", *dirs, cwd=user["cwd"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "trials: 2 complete, 0 failed" in r.stdout and "[worker 1] trial" in r.stdout
    assert "my_study: 2/2 complete" in r.stderr and "0 failed, 0 running" in r.stderr  # the study-level progress bar
    assert "report failed" not in r.stdout
    out = user["cwd"] / "outputs" / "studies" / "my_study"
    assert (out / "report.md").is_file()
    summaries = [json.loads(p.read_text()) for p in out.glob("trials/t*/seed-0/summary.json")]
    assert len(summaries) == 2
    for s in summaries:
        assert s["config"]["ppo"]["beta"] == 0.123 and s["config"]["world"]["n_intents"] == 4

    # the estimate from this study's own trials: 4 more trials on 2 workers = 2 rounds of the median trial
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    stored = optuna.load_study(study_name="my_study", storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))))
    assert stored.metric_names == ["gold/policy", "kl/exact"]  # the dashboard's axis names
    trials = stored.trials
    per_trial = statistics.median(t.user_attrs["seconds"] for t in trials)
    dry = run_cli("sweep", "my_study", "--dry-run", "--n-trials", "6", "--workers", "2", *dirs, cwd=user["cwd"])
    assert dry.returncode == 0, dry.stderr
    line = next(ln for ln in dry.stdout.splitlines() if ln.startswith("estimated wall time"))
    assert "median of this study's 2 complete trials" in line and f"{per_trial:.1f} s per trial" in line, line
    assert f"~{duration_text(2 * per_trial)} " in line, line  # 4 trials left, 2 at a time
    # a new study of the same sizes: from the trials' summary.json files (one seed each)
    fresh = run_cli("sweep", "my_study", "--dry-run", "--name", "fresh", *dirs, cwd=user["cwd"])
    assert "median pipeline time of 2 run(s)" in fresh.stdout, fresh.stdout

    # both dashboards on loopback, serving this study and its MLflow runs; SIGTERM stops both
    import signal
    import urllib.request

    ui = subprocess.Popen([sys.executable, "-m", "rlhf_sweep", "ui", "--optuna-port", "0", "--mlflow-port", "0"],
                          cwd=user["cwd"], env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for ln in ui.stdout:
            lines.append(ln)
            if "Ctrl-C stops both" in ln:
                break
        text = "".join(lines)
        assert ui.poll() is None, text
        optuna_url = next(w for ln in lines if ln.startswith("optuna-dashboard:") for w in ln.split() if w.startswith("http"))
        mlflow_url = next(w for ln in lines if ln.startswith("MLflow UI:") for w in ln.split() if w.startswith("http"))
        assert optuna_url.startswith("http://127.0.0.1:") and mlflow_url.startswith("http://127.0.0.1:")
        studies = json.load(urllib.request.urlopen(f"{optuna_url}/api/studies", timeout=30))["study_summaries"]
        assert [s["study_name"] for s in studies] == ["my_study"]
        req = urllib.request.Request(f"{mlflow_url}/ajax-api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": ["1"], "max_results": 50}).encode(),
                                     headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(req, timeout=30))["runs"]
        roles = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "rlhf_sweep.role") for r in runs)
        assert roles == ["baseline", "study", "trial", "trial"], roles  # the best-of-n baseline runs after the trials
        assert "the study's parent run:" in text
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
    assert ui.returncode == 0
    with pytest.raises(OSError):  # both servers went with it
        urllib.request.urlopen(f"{optuna_url}/api/studies", timeout=5)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{mlflow_url}/health", timeout=5)
