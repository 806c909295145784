"""Study reports and figures: the report of the `smoke` study (built at the end of its sweep and again by
`rlhf-sweep report`), the trajectory figure of `rlhf-sweep run`, and the error paths.

The slow tests run real sweeps and runs as subprocesses from a scratch working directory (as in
tests/test_sweep.py), so their SFT/RM cache is shared within this module and nothing lands in the repository.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlhf_sweep.app import cli
from rlhf_sweep.maths import gao
from rlhf_sweep.reporting import plots, report
from rlhf_sweep.study import sweep
from rlhf_sweep.study.storage import open_storage

from .conftest import TINY
from .test_sweep import SMOKE, env, sweep_cmd

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path, min_w: int = 500, min_h: int = 300) -> None:
    """A real, readable figure: PNG signature and header, a sensible size, and far more than a blank canvas."""
    from PIL import Image

    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR", f"{path.name} is not a PNG"
    w, h = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    assert w >= min_w and h >= min_h, f"{path.name} is only {w}x{h}"
    with Image.open(path) as im:
        assert im.size == (w, h)
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colors, counts = np.unique(px, axis=0, return_counts=True)
    assert len(colors) > 100, f"{path.name} has only {len(colors)} distinct colors"
    assert counts.max() / len(px) < 0.97, f"{path.name} is {counts.max() / len(px):.0%} one color (nearly empty)"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report-cwd")


@pytest.fixture(scope="module")
def smoke(workdir, tmp_path_factory) -> Path:
    """The smoke study swept once (its report is written at the end of the sweep)."""
    tmp = tmp_path_factory.mktemp("smoke-study")
    r = subprocess.run(sweep_cmd("smoke", tmp, "--workers", "2"), cwd=workdir, env=env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"report: {tmp / 'out' / 'report.md'}" in r.stdout, r.stdout[-3000:]
    assert "warning" not in r.stdout
    # the sweep runs the best-of-n baseline (algo=bon, one run per seed) on the trials' reference and RM (one-thread
    # workers: their cache keys), so nothing is trained twice; the report only reads it
    assert "best-of-n baseline, seed 0" in r.stdout and "best-of-n baseline, seed 1" in r.stdout, r.stdout[-3000:]
    assert r.stdout.count("SFT reference: trained") == 2 and "report: SFT" not in r.stdout, r.stdout[-3000:]
    assert (tmp / "out" / "baseline" / "seed-1" / "summary.json").is_file()
    return tmp


def check_report_dir(out: Path) -> str:
    md = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    # the smoke study has 4 trials: too few for importances, every other figure is drawn
    assert pngs == ["hypervolume.png", "length_filler.png", "overoptimization.png", "pareto.png", "slices.png"]
    for name in pngs:
        check_png(out / name)
        assert f"`{name}`" in md and f"]({name})" in md, f"report.md does not name {name}"
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == pngs  # and names no figure that is not there
    assert "importances: not computed, 4 complete trials" in md
    for section in ("## Settings", "## 1. Pareto frontier", "Best trial per objective", "## 2. Over-optimization",
                    "## 3. Length and filler", "## 4. Hyperparameters", "## Hypervolume after each trial"):
        assert section in md
    check_hypervolume(out, md)
    # the best-of-n table reaches n = 256, its exact KL at most the bound log 256 - 255/256, and its fit has numbers
    table = md.split("| n | KL exact (nats) | KL bound (nats) |", 1)[1].split("\n\n", 1)[0]  # the best-of-n table alone
    rows = re.findall(r"^\| (\d+) \| ([0-9.]+) \| ([0-9.]+) \|", table, flags=re.M)
    assert [int(n) for n, _, _ in rows] == [1, 2, 4, 8, 16, 32, 64, 128, 256], md
    assert rows[-1][2] == "4.549" and all(float(exact) <= float(bound) + 1e-3 for _, exact, bound in rows)
    bon_row = next(line for line in md.splitlines() if line.startswith("| best-of-n (n = 1…256, exact KL)"))
    assert "n/a" not in bon_row.split("|")[-5]  # R² of the best-of-n fit
    return md


def check_hypervolume(out: Path, md: str) -> None:
    """The smoke study has no reference_point: report.md states the default one (the mean of the trials' own
    gold/ref, and its KL constraint's bound), and trials.csv carries the hypervolume after each trial with it."""
    import optuna
    import pandas as pd

    from rlhf_sweep.maths import hypervolume

    study = optuna.load_study(study_name="smoke", storage=open_storage(str(out.parent / "study.journal")))
    gold_ref = float(np.mean([t.user_attrs["metrics"]["gold/ref"] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]))
    assert f"Reference point: gold/policy ≥ {gold_ref:.3f}, kl/exact ≤ 20.000 (gold/policy: the reference model's gold/ref" in md, md
    trials = pd.read_csv(out / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"].sort_values(["datetime_complete", "number"])
    expected = hypervolume.hypervolume_history(done[["gold/policy", "kl/exact"]].to_numpy(), [gold_ref, 20.0], ["maximize", "minimize"])
    assert done["hypervolume"].to_numpy() == pytest.approx(expected)
    assert ("Final hypervolume" in md) == (expected[-1] > 0)
    assert ("No complete trial beat the reference point" in md) == (expected[-1] == 0)


@pytest.mark.e2e
def test_smoke_report_written_by_the_sweep(smoke):
    out = smoke / "out"
    md = check_report_dir(out)
    assert "per-iteration histories from | MLflow" in md
    assert "4 complete of 4 asked" in md
    # the figures and report.md are artifacts of the study's MLflow parent run
    import optuna
    from mlflow.tracking import MlflowClient

    study = optuna.load_study(study_name="smoke", storage=open_storage(str(smoke / "study.journal")))
    client = MlflowClient(f"sqlite:///{smoke / 'mlflow.db'}")
    logged = {Path(f.path).name for f in client.list_artifacts(study.user_attrs["mlflow_parent_run_id"], "report")}
    assert logged == {"report.md", "pareto.png", "overoptimization.png", "length_filler.png", "slices.png", "hypervolume.png"}


@pytest.mark.e2e
def test_report_command_rebuilds_it_from_summary_files(smoke, workdir, tmp_path, monkeypatch):
    # another MLflow store: the trials' runs are not there, so histories come from their summary.json
    monkeypatch.chdir(workdir)  # the module's SFT/RM cache
    out = smoke / "out"
    for p in out.glob("*.png"):
        p.unlink()
    cli.main(["report", "smoke", "--storage", str(smoke / "study.journal"), "--out", str(out),
              "--tracking-uri", f"sqlite:///{tmp_path / 'other.db'}"])
    md = check_report_dir(out)
    assert "per-iteration histories from | summary.json" in md


@pytest.mark.e2e
def test_an_algorithms_study_draws_one_frontier_per_algorithm(workdir, tmp_path, monkeypatch):
    """Planned trials across algorithms (smoke-sized): each runs its own algorithm and knob, the report draws
    algorithms.png and a row per algorithm, and a best-of-n trial agrees with the baseline path at its n."""
    import json

    import yaml

    monkeypatch.chdir(workdir)  # the module's SFT/RM cache
    smoke = yaml.safe_load(SMOKE.read_text())
    study = {"objectives": {"gold/policy": "maximize", "kl/exact": "minimize"}, "fixed": smoke["fixed"], "seeds": 1,
             "trials": [{"algo": "ppo", "ppo.beta": [0.03, 0.3]}, {"algo": "rloo", "rloo.beta": 0.05},
                        {"algo": "dpo", "dpo.beta": 0.1}, {"algo": "bon", "bon.n": [4, 16]}]}
    path = tmp_path / "algos.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    out = tmp_path / "out"
    res = sweep.sweep(str(path), storage=str(tmp_path / "study.journal"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                      out=str(out), progress=False)
    assert (res.n_complete, res.n_failed) == (6, 0)
    import optuna

    trials = optuna.load_study(study_name="algos", storage=open_storage(str(tmp_path / "study.journal"))).trials
    ran = {(t.params["algo"], t.params.get("ppo.beta", t.params.get("rloo.beta", t.params.get("dpo.beta", t.params.get("bon.n")))))
           for t in trials}
    assert ran == {("ppo", 0.03), ("ppo", 0.3), ("rloo", 0.05), ("dpo", 0.1), ("bon", 4), ("bon", 16)}
    for t in trials:  # each ran the algorithm it was planned with
        summary = json.loads((Path(t.user_attrs["run_dir"]) / "seed-0" / "summary.json").read_text())
        assert summary["config"]["algo"] == t.params["algo"]
    bon16 = next(t for t in trials if t.params.get("bon.n") == 16).user_attrs["metrics"]
    assert bon16["kl/exact"] <= bon16["kl/bon_bound"] + 1e-9
    baseline = json.loads((out / "baseline" / "seed-0" / "summary.json").read_text())["history"]
    at16 = next(h for h in baseline if h["bon/n"] == 16)
    assert at16["kl/exact"] == pytest.approx(bon16["kl/exact"]) and at16["gold"] == pytest.approx(bon16["gold/policy"])

    report.write_report("algos", str(tmp_path / "study.journal"), f"sqlite:///{tmp_path / 'mlflow.db'}", out)  # as `sweep` does
    check_png(out / "algorithms.png")
    md = (out / "report.md").read_text()
    assert "## Algorithms: one frontier each" in md and "](algorithms.png)" in md
    rows = [line for line in md.splitlines() if re.match(r"^\| (ppo|rloo|dpo|bon) \| \d+ \|", line)]
    assert sorted(line.split("|")[1].strip() for line in rows) == ["bon", "dpo", "ppo", "rloo"]


def test_gold_at_a_budget_interpolates_along_the_frontier():
    kl, gold = np.array([2.0, 4.0, 8.0, 5.0]), np.array([1.0, 2.0, 1.5, 1.0])
    # frontier: (0, 0.5) reference, (2, 1), (4, 2); (8, 1.5) and (5, 1) are beaten by (4, 2)
    fk, fg = report.algo_frontier(kl, gold, 0.5)
    assert fk.tolist() == [0.0, 2.0, 4.0] and fg.tolist() == [0.5, 1.0, 2.0]
    assert report.gold_at_budget(kl, gold, 0.5, 1.0) == pytest.approx(0.75)
    assert report.gold_at_budget(kl, gold, 0.5, 3.0) == pytest.approx(1.5)
    assert report.gold_at_budget(kl, gold, 0.5, 6.0) == pytest.approx(2.0)  # spend less: the best within the budget
    assert math.isnan(report.gold_at_budget(kl, gold, 0.5, 10.0))  # no trial reached 10 nats


def flat_noisy_fit() -> gao.GaoFit:
    """A PPO run whose gold barely moves, like trial 13 of the beta_clip_frontier study (R² 0.19, b 0.002)."""
    rng = np.random.default_rng(1)
    d = np.linspace(0.1, 1.2, 80)
    return gao.fit_rl(d, d * (0.05 - 0.002 * np.log(d)) + rng.normal(scale=0.033, size=len(d)))


def test_a_fit_below_the_r2_floor_prints_no_peak():
    """The Gao fits' table (report.fit_row): a fit below gao.R2_FLOOR gets the status words and no number in its peak
    cells; a clean rise-and-fall gets its peak KL with its interval and the gain there; the sentence counts them."""
    flat = flat_noisy_fit()
    assert flat.r2 < gao.R2_FLOOR and flat.b > 0 and math.isfinite(flat.peak_d)  # the point estimate exists
    row = report.fit_row("trial 13", [0.05], 1.44, flat)
    assert row[-3:] == ["not identified", "", "not identified"]
    assert not any(re.search(r"\d", str(c)) for c in row[-3:])
    d = np.linspace(0.05, 3.0, 40)
    clean = gao.fit_bon(d, d * (1.0 - 0.25 * d) + np.random.default_rng(0).normal(scale=0.02, size=len(d)))
    row = report.fit_row("trial 1", [0.05], 9.0, clean)
    assert row[-1] == gao.INSIDE and row[-2] == pytest.approx(1.0, abs=0.05)
    kl, lo, hi = map(float, re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", row[-3]).groups())
    assert lo <= 4.0 <= hi and lo <= kl <= hi  # d* = 2: KL 4
    assert report.peak_count_sentence([gao.INSIDE, gao.NOT_IDENTIFIED, gao.NOT_IDENTIFIED]) == (
        "Of 3 fits, 1 identify a peak inside the KL they reached, 0 one beyond it, and 2 none.")


def test_algorithm_rows_print_no_peak_for_a_flat_algorithm():
    """The algorithms table's "fitted peak KL" follows the same rule: held-out end points that barely move print
    "not identified", not the point estimate exp(a/b - 1)."""
    rng = np.random.default_rng(1)
    kl = np.linspace(0.05, 2.0, 12)
    df = pd.DataFrame({"algo": "ppo", "kl": kl, "gold": 0.5 + rng.normal(scale=0.02, size=len(kl)), "gold_ref": 0.5,
                       "knob": np.linspace(1, 0.01, len(kl)), "seconds": 60.0})
    rows, fits = report.algorithm_rows(df)
    assert fits["ppo"].r2 < gao.R2_FLOOR
    assert rows[0][-3] == "not identified"


@pytest.mark.e2e
def test_run_writes_its_trajectory_figure(workdir, tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "rlhf_sweep", "run", *TINY, "mlflow.enabled=false", f"hydra.run.dir={run_dir}"],
                       cwd=workdir, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (run_dir / "summary.json").is_file()
    check_png(run_dir / "trajectory.png", min_w=600, min_h=800)


def test_trajectory_figure_from_a_history(tmp_path):
    its = np.arange(30)
    history = [{"iteration": int(i), "rm": 0.1 * i, "gold": 0.5 - 0.002 * (i - 10) ** 2, "kl/exact": 0.2 * i, "kl/k1": 0.15 * i,
                "kl/k3": 0.18 * i, "len": 4 + 0.1 * i, "filler": 0.7 + 0.05 * i, "ppo/beta": 0.03} for i in its]
    check_png(Path(plots.trajectory(history, tmp_path / "t.png", title="synthetic")), min_w=600, min_h=800)


def test_non_dominated_front():
    kl = np.array([1.0, 2.0, 3.0, 2.5, 0.5, 2.0])
    gold = np.array([0.5, 0.9, 0.8, 1.0, 0.1, 0.9])
    # 3 is dominated by 2.5 (less KL, more gold); the two equal points at KL 2 dominate neither
    assert report.non_dominated(kl, gold).tolist() == [True, True, False, True, True, True]


def test_missing_study_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", "no_such_study", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no study named 'no_such_study'" in err and "rlhf-sweep sweep no_such_study" in err
    assert not (tmp_path / "out").exists()  # nothing created on the way


def test_a_failing_report_is_one_warning_line(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(report, "report", broken)
    report.write_report("smoke", str(tmp_path / "study.journal"), None, tmp_path / "out")  # must not raise
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the study report failed (RuntimeError: disk full second line)")
    assert "rlhf-sweep report smoke" in lines[0]


def test_slices_and_importances_with_a_categorical_knob(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 12
    df = pd.DataFrame({"number": range(n), "pareto": [i % 4 == 0 for i in range(n)],
                       "ppo.length_bonus": rng.uniform(-0.6, 0.2, n), "rm.center_coef": rng.choice([0.0, 0.01], n),
                       "gold/policy": rng.normal(0.8, 0.1, n), "len/policy": rng.normal(5, 1, n)})
    path = plots.slices(df, [("gold/policy", "maximize"), ("len/policy", "minimize")],
                        [("ppo.length_bonus", False, False), ("rm.center_coef", False, True)], tmp_path / "slices.png")
    check_png(Path(path))
    path = plots.importances({"gold/policy": {"ppo.length_bonus": 0.7, "rm.center_coef": 0.3},
                              "len/policy": {"rm.center_coef": 0.6, "ppo.length_bonus": 0.4}}, tmp_path / "importance.png")
    check_png(Path(path), min_h=250)
