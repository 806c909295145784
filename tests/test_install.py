"""The package as a user gets it: a wheel built from this tree, installed into a fresh virtual environment,
run from an unrelated directory. Its configs and studies must come from the wheel, and its outputs land
under that directory's outputs/.

The fresh environment gets the test environment's installed dependencies as symlinks (torch is a 200 MB
CPU build on this machine's disk and a multi-GB CUDA build from PyPI), everything of rlhf-sweep itself
left out; pip installs the wheel with --no-index, so it can only use what is there, and the test asserts
that the rlhf_sweep it imports is the one inside the new environment.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import TINY

pytestmark = pytest.mark.e2e  # a wheel build and a fresh environment: ~20 s before any pipeline runs

ROOT = Path(__file__).resolve().parent.parent
# what a build of the tree reads (the rest, e.g. a developer's .venv or outputs/, stays out of the copy)
SKIP = {".git", ".venv", "outputs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _ours(name: str) -> bool:
    low = name.lower()
    return low.startswith(("rlhf_sweep", "__editable__.rlhf_sweep", "__editable___rlhf_sweep"))


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PYTHONUNBUFFERED": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=lambda _d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(tmp / "dist")],
                       capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the project's own metadata builds without a warning (setuptools' deprecations are BuildBackendWarning)
    assert "BuildBackendWarning" not in r.stderr + r.stdout and "SetuptoolsDeprecationWarning" not in r.stderr + r.stdout
    (wheel,) = (tmp / "dist").glob("rlhf_sweep-*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    target = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    here = {Path(p) for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]}
    for sp in here:
        for entry in sp.iterdir() if sp.is_dir() else []:
            if not _ours(entry.name) and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", str(wheel)],
                       capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    work = tmp / "work"
    work.mkdir()
    return {"venv": venv, "work": work, "site": target}


def test_the_wheel_carries_configs_and_studies(installed):
    py = installed["venv"] / "bin" / "python"
    code = ("import rlhf_sweep, json; from rlhf_sweep.config import paths; "
            "print(json.dumps([rlhf_sweep.__file__, str(paths.shipped_conf_dir()), str(paths.shipped_studies_dir())]))")
    r = subprocess.run([str(py), "-c", code], cwd=installed["work"], capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    module, conf, studies = (Path(p) for p in json.loads(r.stdout))
    site_dir = installed["site"].resolve()
    for p in (module, conf, studies):
        assert p.resolve().is_relative_to(site_dir), p  # the wheel's copy, not the repository's
    assert (conf / "config.yaml").is_file() and (conf / "experiment" / "baseline.yaml").is_file()
    assert {p.name for p in (ROOT / "conf").rglob("*.yaml")} == {p.name for p in conf.rglob("*.yaml")}
    assert {p.name for p in (ROOT / "studies").glob("*.yaml")} == {p.name for p in studies.glob("*.yaml")}


def test_run_and_sweep_from_an_unrelated_directory(installed):
    exe, work, env = str(installed["venv"] / "bin" / "rlhf-sweep"), installed["work"], _clean_env()

    r = subprocess.run([exe, "run", *TINY], cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "humans prefer the reference" in r.stdout
    (summary,) = (work / "outputs" / "runs").glob("*/*/summary.json")
    assert json.loads(summary.read_text())["config"]["ppo"]["iterations"] == 3
    assert (work / "outputs" / "mlflow.db").is_file() and (work / "outputs" / "cache").is_dir()

    r = subprocess.run([exe, "sweep", "smoke", "--n-trials", "2"], cwd=work, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "trials: 2 complete, 0 failed" in r.stdout
    out = work / "outputs" / "studies" / "smoke"
    assert (out / "optuna.journal").is_file() and (out / "report.md").is_file()
    assert "smoke: 2/2 complete" in r.stderr  # the study-level progress bar

    r = subprocess.run([exe, "studies"], cwd=work, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "beta_clip_frontier" in r.stdout and "shipped" in r.stdout, r.stdout + r.stderr
