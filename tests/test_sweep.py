"""`rlhf-sweep sweep` on the smoke study: workers sharing a study, what another process can read back
(Optuna and MLflow), resuming after SIGKILL, and bad study files failing before any trial runs.

Sweeps run as subprocesses from a scratch working directory, so their `outputs/cache` (SFT/RM)
is shared by the tests in this module and nothing is written into the repository.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from rlhf_sweep.app import cli
from rlhf_sweep.config.compose import compose
from rlhf_sweep.run import layout
from rlhf_sweep.study import baselines, planning, sweep, workers
from rlhf_sweep.study.spec import METRIC_KEYS, StudyError, config_override, load_spec, override_value
from rlhf_sweep.study.storage import open_storage, stale_trial_ids, trial_id

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "studies" / "smoke.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep-cwd")


def sweep_cmd(study: str, tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_sweep", "sweep", study, "--out", str(tmp / "out"), "--storage", str(tmp / "study.journal"),
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def load(tmp: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(tmp / "study.journal"))))


def test_two_workers_and_another_process_reads_everything_back(workdir, tmp_path):
    r = subprocess.run(sweep_cmd("smoke", tmp_path, "--workers", "2", "--n-trials", "4"), cwd=workdir, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 worker(s) x 1 thread(s)" in r.stdout
    assert "Pareto-optimal trials" in r.stdout

    # Optuna, from this (separate) process: every trial, its values, metrics, seeds and MLflow run
    study = load(tmp_path, "smoke")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 4 and len(study.trials) == 4
    for t in trials:
        assert len(t.values) == 2 and all(math.isfinite(v) for v in t.values)
        assert t.values[0] == pytest.approx(t.user_attrs["metrics"]["gold/policy"])
        assert set(t.user_attrs["per_seed"]) == {"0", "1"}
        mean = sum(s["kl/exact"] for s in t.user_attrs["per_seed"].values()) / 2
        assert t.values[1] == pytest.approx(mean)  # objectives are averaged over the seeds
        assert set(t.params) == {"ppo.beta", "ppo.clip_eps"}
        assert set(t.constraints) == {"kl/exact <= 20.000"}

    # the metric names a study file may use are exactly those a trial produces
    import json

    summary = json.loads((tmp_path / "out" / "trials" / "t0000" / "seed-0" / "summary.json").read_text())
    assert set(METRIC_KEYS) == set(summary["metrics"])

    # MLflow: one nested run per trial under the study's parent, one per seed under each trial
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    nested = mlflow.search_runs(experiment_names=["rlhf-sweep"], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    runs = nested[nested["tags.rlhf_sweep.role"] == "trial"]
    # and the best-of-n baseline, one algo=bon run per seed, beside the trials
    baseline = nested[nested["tags.rlhf_sweep.role"] == "baseline"]
    assert sorted(baseline["tags.seed"]) == ["0", "1"] and set(baseline["params.algo"]) == {"bon"}
    assert sorted(runs["tags.trial"].astype(int)) == [0, 1, 2, 3]
    assert set(runs["tags.study"]) == {"smoke"}
    assert set(runs["run_id"]) == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert set(runs["status"]) == {"FINISHED"}
    client = MlflowClient(uri)
    iterations = 3  # smoke: ppo.iterations=3
    for run_id in runs["run_id"]:
        history = client.get_metric_history(run_id, "kl/exact")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(iterations + 1))  # per iteration, then held-out
        seed_runs = mlflow.search_runs(experiment_names=["rlhf-sweep"], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        assert sorted(seed_runs["tags.seed"]) == ["0", "1"]
        assert len(client.get_metric_history(seed_runs["run_id"][0], "rm")) == iterations

    # the files at the end
    trials_csv = (tmp_path / "out" / "trials.csv").read_text().splitlines()
    pareto_csv = (tmp_path / "out" / "pareto.csv").read_text().splitlines()
    assert len(trials_csv) == 5 and len(pareto_csv) == 1 + len(study.best_trials) >= 2
    assert trials_csv[0].startswith("number,state,gold/policy,kl/exact,ppo.beta,ppo.clip_eps,feasible")


def test_sigkill_mid_trial_then_resume(workdir, tmp_path):
    # the smoke study with longer PPO, so that the kill lands inside a trial
    spec = yaml.safe_load(SMOKE.read_text())
    spec["fixed"]["ppo.iterations"] = 12
    spec["seeds"] = 1
    study_file = tmp_path / "smoke_kill.yaml"
    study_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = sweep_cmd(str(study_file), tmp_path, "--n-trials", "3")

    proc = subprocess.Popen(cmd, cwd=workdir, env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, killed_number = time.monotonic() + 300, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "study.journal").exists():
                try:
                    trials = load(tmp_path, "smoke_kill").get_trials(deepcopy=False)
                except KeyError:  # the study is not created yet
                    trials = []
                # a trial that has started its MLflow run is inside the pipeline
                running = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
                if any(t.state == TrialState.COMPLETE for t in trials) and running:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_number = running[0].number
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_number is not None, proc.stderr.read().decode()[-2000:]
    before = {t.number: t.state for t in load(tmp_path, "smoke_kill").trials}
    assert before[killed_number] == TrialState.RUNNING  # the storage still thinks it runs

    r = subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"marked 1 stale RUNNING trial(s) from a dead process as failed: {killed_number}" in r.stdout

    study = load(tmp_path, "smoke_kill")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    killed = study.trials[killed_number]
    assert killed.state == TrialState.FAIL and "died" in killed.user_attrs["error"]
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 1
    # nothing redone or duplicated: the trials complete before the kill kept their numbers,
    # and every complete trial has its own parameters and run directory
    assert all(study.trials[n].state == TrialState.COMPLETE for n, s in before.items() if s == TrialState.COMPLETE)
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3
    assert len({t.user_attrs["run_dir"] for t in complete}) == 3
    from mlflow.tracking import MlflowClient

    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(killed.user_attrs["mlflow_run_id"]).info.status == "FAILED"

    # once complete, the same command again runs nothing
    r = subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "3 of 3 trials complete; 0 to run" in r.stdout
    assert len(load(tmp_path, "smoke_kill").trials) == 4


def test_a_failing_trial_is_recorded_and_the_study_goes_on(workdir, tmp_path, monkeypatch):
    from rlhf_sweep.run import pipeline

    monkeypatch.chdir(workdir)  # the module's SFT/RM cache
    real, calls = pipeline.run, []

    def flaky(cfg, say=print):
        calls.append(cfg.seed)
        if len(calls) == 1:
            raise RuntimeError("boom\nsecond line")
        return real(cfg, say=say)

    monkeypatch.setattr(pipeline, "run", flaky)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = sweep.sweep("smoke", n_trials=2, storage=str(tmp_path / "study.journal"), tracking_uri=uri, out=str(tmp_path / "out"), progress=False)
    assert (res.n_complete, res.n_failed) == (2, 1)
    study = load(tmp_path, "smoke")
    failed = study.trials[0]
    assert failed.state == TrialState.FAIL and failed.user_attrs["error"] == "RuntimeError: boom second line"
    assert "RuntimeError: boom" in (tmp_path / "out" / "trials" / "t0000" / "error.txt").read_text()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("RuntimeError: boom")
    assert [t.state for t in study.trials[1:]] == [TrialState.COMPLETE] * 2
    assert "RuntimeError: boom second line" in (tmp_path / "out" / "trials.csv").read_text()


BAD = {
    "unknown_key": (("space", "ppo.betta", {"type": "float", "low": 0.01, "high": 1.0}), "unknown config key 'ppo.betta'"),
    "low_above_high": (("space", "ppo.beta", {"type": "float", "low": 1.0, "high": 0.01, "log": True}), "space: ppo.beta: low 1.000 > high 0.010"),
    "unknown_metric": (("objectives", "gold/polcy", "maximize"), "unknown metric 'gold/polcy' (did you mean 'gold/policy'?)"),
    "unknown_sampler": (("sampler", None, "cmaes"), "sampler 'cmaes' is not one of tpe, nsga2, random, grid, gp"),
    "out_of_range_bound": (("space", "ppo.clip_eps", {"type": "float", "low": -0.1, "high": 0.3}), "ppo.clip_eps=-0.1 is invalid"),
    "bad_constraint": (("constraints", None, ["kl/exact < 20"]), "is not 'metric <= number'"),
    "reference_point_short": (("reference_point", None, {"gold/policy": 0.5}), "reference_point: expected a number for each objective"),
    # values Optuna accepts and every trial then fails on (issue 28)
    "infinite_bound": (("space", "ppo.clip_eps", {"type": "float", "low": 0.1, "high": float("inf")}),
                       "space: ppo.clip_eps.high: expected a finite number, got inf"),
    "later_seed_out_of_range": (("seeds", None, [0, 5000000000]), "seeds: seed 5000000000 is out of range: a seed is an integer in [0, 4294967295]"),
    "step_wider_than_range": (("space", "ppo.epochs", {"type": "int", "low": 1, "high": 3, "step": 5}),
                              "space: ppo.epochs: step 5 does not fit [1, 3]: Optuna would sample [1, 1]"),
    "step_off_the_range": (("space", "ppo.clip_eps", {"type": "float", "low": 0.1, "high": 0.3, "step": 0.15}),
                           "step 0.150 does not fit [0.100, 0.300]: Optuna would sample [0.100, 0.250]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_study_file_fails_before_any_trial(case, tmp_path, capsys):
    (section, key, value), expected = BAD[case]
    spec = yaml.safe_load(SMOKE.read_text())
    if key is None:
        spec[section] = value
    else:
        spec[section][key] = value
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--storage", str(tmp_path / "study.journal"),
                  "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rlhf-sweep: error: study "), err
    assert expected in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "study.journal").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_step_that_fits_its_range_loads(tmp_path):
    spec = yaml.safe_load(SMOKE.read_text())
    spec["space"]["ppo.clip_eps"] = {"type": "float", "low": 0.1, "high": 0.3, "step": 0.05}  # 0.3 - 0.1 is 4 steps, as Optuna counts
    spec["space"]["ppo.epochs"] = {"type": "int", "low": 1, "high": 5, "step": 2}
    (tmp_path / "steps.yaml").write_text(yaml.safe_dump(spec))
    assert [p.step for p in load_spec(str(tmp_path / "steps.yaml")).space[1:]] == [0.05, 2]


@pytest.mark.parametrize("damage, expected", [
    (lambda text: text.encode().replace(b"Smoke test", b"Sm\xf6ke test"), "not UTF-8 text (byte 0xf6 at line 3); save it as UTF-8"),
    (lambda text: text.replace("  ppo.iterations: 3\n", "  ppo.iterations: 3\n  ppo.iterations: 5\n").encode(),
     "not valid YAML at line 20: key 'ppo.iterations' is given twice (lines 19 and 20; the second would silently win)"),
])
def test_unreadable_study_file_is_one_line_and_the_listing_goes_on(tmp_path, monkeypatch, capsys, damage, expected):
    """A study file that is not UTF-8, or gives a key twice (YAML keeps the last one silently): the sweep
    refuses it naming the file and line; `rlhf-sweep studies` lists it as unreadable beside the others."""
    bad = tmp_path / "studies" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_bytes(damage(SMOKE.read_text()))
    (tmp_path / "studies" / "good.yaml").write_text(SMOKE.read_text())
    with pytest.raises(StudyError) as e:
        load_spec(str(bad))
    assert str(e.value) == f"study {bad}: {expected}"
    monkeypatch.setenv("RLHF_SWEEP_STUDIES_DIR", str(bad.parent))
    cli.main(["studies"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    assert "(unreadable: " + expected[:40] in rows["bad"] and "Smoke test" in rows["good"] and "smoke" in rows


def test_unknown_study_name_and_shipped_studies_load(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", "no_such_study"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no study 'no_such_study'" in err and "smoke" in err
    for name in ("smoke", "beta_clip_frontier", "length_and_rm_reg", "full", "algorithms_frontier"):
        spec = load_spec(name)  # composes every bound and choice against the config schema
        assert spec.n_trials >= 1 and spec.objectives


def test_override_values_and_seed_combination():
    assert override_value(True) == "true" and override_value(None) == "null"
    assert override_value(1e-5) == "1e-05" and override_value("length_matched") == "length_matched"
    s = [{"metrics": {"m": 1.0, "n": float("nan")}, "history": [{"iteration": 0, "kl": 1.0}], "observations": {"o": {"value": True}},
          "timing": {"ppo": 1.0}, "config": {"seed": 0}},
         {"metrics": {"m": 3.0, "n": 2.0}, "history": [{"iteration": 0, "kl": 3.0}], "observations": {"o": {"value": False}},
          "timing": {"ppo": 2.0}, "config": {"seed": 1}}]
    c = layout.combine_seeds(s, [0, 1])
    assert c["metrics"] == {"m": 2.0, "n": 2.0} and c["history"] == [{"iteration": 0, "kl": 2.0}]
    assert c["observations"]["o"]["value"] == 0.5 and c["timing"]["ppo"] == 3.0 and c["config"]["seed"] == "0,1"


def test_an_uncached_artefact_is_trained_once_by_concurrent_workers(tmp_path):
    """Workers that want the same cold SFT reference or RM at once: one trains it, the others wait
    and load what it saved (flock also separates threads, each with its own open file)."""
    import threading

    import torch

    from rlhf_sweep.run import pipeline

    path, trained, results = tmp_path / "cache" / "rm-x.pt", [], []

    def train() -> dict:
        trained.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the others to find no file and queue on the lock
        return {"rm/acc_labels": 0.7}

    def worker() -> None:
        module = torch.nn.Linear(3, 2)  # each its own random init: loading must overwrite it
        results.append((pipeline.load_or_train(path, module, train, torch.device("cpu")), module.state_dict()))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(trained) == 1
    assert sorted(info["cached"] for info, _ in results) == [False, True, True]
    states = [state for _, state in results]
    assert all(torch.equal(s["weight"], states[0]["weight"]) for s in states)
    assert sorted(p.name for p in path.parent.iterdir()) == [".locks", "rm-x.pt"]  # no lock or temp file among the artefacts


def planned_study(tmp_path: Path, trials, **extra) -> Path:
    spec = {"objectives": {"gold/policy": "maximize"}, "trials": trials, "seeds": 1, **extra}
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_planned_trials_expand_lists_into_one_trial_per_value(tmp_path):
    path = planned_study(tmp_path, [{"algo": "rloo", "rloo.beta": [0.01, 0.1], "rloo.num_generations": [2, 4]},
                                    {"algo": "bon", "bon.n": 4}])
    spec = load_spec(str(path))
    assert spec.n_trials == 5 and all(t.seeds == [0] for t in spec.trials)
    assert [t.params for t in spec.trials[:2]] == [{"algo": "rloo", "rloo.beta": 0.01, "rloo.num_generations": 2},
                                                   {"algo": "rloo", "rloo.beta": 0.01, "rloo.num_generations": 4}]
    assert spec.trials[-1].params == {"algo": "bon", "bon.n": 4}
    # without a space, every key the trials set is searched as a categorical of the values they give it
    assert spec.param_names == ["algo", "rloo.beta", "rloo.num_generations", "bon.n"]
    assert [p.choices for p in spec.space][:2] == [["rloo", "bon"], [0.01, 0.1]]
    # the sweep queues each planned trial once (by its plan key), and a failed one again
    keys = planning.plan_keys(spec, 1)
    study = optuna.create_study(directions=["maximize"])
    assert planning.enqueue_planned(study, spec, keys) == 5 and planning.enqueue_planned(study, spec, keys) == 0
    trial = study.ask()
    assert trial.user_attrs["plan_key"] == keys[0] and spec.suggest(trial) == spec.trials[0].params  # bon.n not sampled
    study.tell(trial, state=TrialState.FAIL)
    assert planning.enqueue_planned(study, spec, keys) == 1


@pytest.mark.parametrize("trials,extra,needle", [
    ([{"algo": "rloo", "rloo.betta": 0.1}], {}, "trials[0] {\"algo\": \"rloo\", \"rloo.betta\": 0.1}: unknown config key 'rloo.betta'"),
    ([{"rloo.beta": 0.1}], {}, "rloo.beta is a knob of algo=rloo"),
    ([{"algo": "ppo"}, {"algo": ["ppo", "rloo"]}], {}, 'the trial {"algo": "ppo"} on seeds [0] is planned twice'),
    ([{"algo": "ppo"}], {"n_trials": 3}, "n_trials is 3 but 1 trials are listed"),
    ([{"seed": 1}], {}, "seed is set by the sweep"),
    ([{"algo": "ppo"}], {"space": {"ppo.beta": {"low": 0.01, "high": 0.1}}}, "params must give exactly the searched keys (ppo.beta); unknown: algo"),
    ([], {}, "expected a non-empty list"),
])
def test_bad_planned_trials_fail_in_one_line(tmp_path, trials, extra, needle):
    with pytest.raises(StudyError) as e:
        load_spec(str(planned_study(tmp_path, trials, **extra)))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["smoke", "beta_clip_frontier", "length_and_rm_reg", "full", "algorithms_frontier"])
def test_a_stored_study_spec_reads_back_equal(name):
    """The report rebuilds the spec from the copy the sweep stored in the study (JSON): nothing may be lost."""
    import json

    from rlhf_sweep.study.spec import StudySpec

    spec = load_spec(name, check_config=False)
    assert StudySpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# ----- planned trials: "run exactly these" ----------------------------------------------------------
def _planned_spec(*trials, **fixed):
    import dataclasses

    from rlhf_sweep.study.spec import PlannedTrial

    spec = load_spec("smoke", check_config=False)
    return dataclasses.replace(spec, sampler="random", sampler_options={}, fixed={**spec.fixed, "mlflow.enabled": False, **fixed},
                               trials=[PlannedTrial({"ppo.beta": b, "ppo.clip_eps": 0.2}, seeds, name=f"b{b}") for b, seeds in trials])


def test_planned_trials_run_once_and_an_edited_config_runs_again(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(workdir)  # the module's SFT/RM cache
    kw = {"storage": str(tmp_path / "study.journal"), "out": str(tmp_path / "out"), "progress": False}
    res = sweep.sweep(_planned_spec((0.1, [0]), (0.5, [0, 1])), **kw)
    assert (res.n_trials, res.n_complete) == (2, 2)
    study = load(tmp_path, "smoke")
    first = [study.trials[r["number"]] for r in res.planned]
    assert [t.params for t in first] == [{"ppo.beta": 0.1, "ppo.clip_eps": 0.2}, {"ppo.beta": 0.5, "ppo.clip_eps": 0.2}]
    assert [t.user_attrs["seeds"] for t in first] == [[0], [0, 1]] and first[1].user_attrs["plan_name"] == "b0.5"
    assert sorted(p.name for p in Path(res.planned[1]["run_dir"]).iterdir()) == ["seed-0", "seed-1"]
    assert set(first[0].user_attrs["per_seed"]) == {"0"}  # the trial's own seeds, not the study's (0, 1)
    # a trial left queued by an earlier call with another plan is not run
    study.enqueue_trial({"ppo.beta": 0.9, "ppo.clip_eps": 0.2}, user_attrs={"plan_key": "elsewhere", "seeds": [0]})
    # the same plan plus one trial: only the new one runs; a run-only key (cache_dir) changes nothing
    res2 = sweep.sweep(_planned_spec((0.1, [0]), (0.5, [0, 1]), (0.3, [1])), **kw)
    assert [r["number"] for r in res2.planned[:2]] == [r["number"] for r in res.planned] and res2.n_complete == 3
    states = [t.state for t in load(tmp_path, "smoke").trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.PRUNED) == 1
    assert load(tmp_path, "smoke").trials[2].user_attrs["error"].startswith("not run")
    # a changed config (as an edited overlay would make) identifies another trial: it runs again
    res3 = sweep.sweep(_planned_spec((0.1, [0]), **{"ppo.iterations": 2}), **kw)
    assert res3.planned[0]["number"] not in {r["number"] for r in res2.planned}
    same = _planned_spec((0.1, [0]))
    assert planning.plan_key(same, same.trials[0], 1) == planning.plan_key(_planned_spec((0.1, [0]), cache_dir="elsewhere"), same.trials[0], 1)
    assert planning.plan_key(same, same.trials[0], 1) != planning.plan_key(same, same.trials[0], 2)  # threads: another float order
    csv_header = (tmp_path / "out" / "trials.csv").read_text().splitlines()[0]
    assert ",seeds,plan," in csv_header


def test_a_planned_study_file_is_checked_in_one_line(tmp_path):
    raw = yaml.safe_load(SMOKE.read_text())
    raw.pop("n_trials")
    raw["trials"] = [{"params": {"ppo.beta": 0.1, "ppo.clip_eps": 0.2}, "seeds": [3, 4]}, {"params": {"ppo.beta": 0.2, "ppo.clip_eps": 0.3}}]
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(str(path))
    assert spec.n_trials == 2 and spec.trials[0].seeds == [3, 4] and spec.trials[1].seeds == [0, 1]  # the study's seeds by default
    for bad, message in (({"ppo.beta": 5.0, "ppo.clip_eps": 0.2}, "ppo.beta=5.0 is not a number in [0.010, 1.000]"),
                         ({"ppo.beta": 0.1}, "missing: ppo.clip_eps"), ({"ppo.beta": 0.1, "ppo.clip_eps": 0.2, "ppo.epochs": 2}, "unknown: ppo.epochs")):
        raw["trials"] = [{"params": bad}]
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(StudyError) as e:
            load_spec(str(path))
        assert message in str(e.value) and "trials[0]" in str(e.value) and "\n" not in str(e.value)
    # a categorical over a config group: a+b composes both options, as experiment=[a,b] does
    assert config_override("experiment", "rm_ensemble+kl_control") == "experiment=[rm_ensemble,kl_control]"
    assert config_override("ppo.kl_estimator", "a+b") == "ppo.kl_estimator=a+b" and config_override("experiment", "baseline") == "experiment=baseline"


def test_a_fixed_pair_of_overlays_is_the_same_override_in_trials_and_the_baseline(tmp_path):
    """`fixed: {experiment: a+b}` composes both overlays in every trial and in the study's best-of-n baseline alike."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["fixed"]["experiment"] = "length_penalty+kl_control"
    path = tmp_path / "fixed_pair.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(str(path))
    trial, baseline = spec.trial_overrides({"ppo.beta": 0.1, "ppo.clip_eps": 0.2}, 0), baselines.baseline_overrides(spec, 0)
    assert [o for o in trial if o.startswith("experiment=")] == ["experiment=[length_penalty,kl_control]"]
    assert [o for o in baseline if o.startswith("experiment=")] == ["experiment=[length_penalty,kl_control]"]
    for overrides, algo in ((trial, "ppo"), (baseline, "bon")):
        cfg = compose(overrides)
        # length_penalty's length bonus and kl_control's adaptive KL target (conf/experiment/), on the study's fixed sizes
        assert (cfg.algo, cfg.ppo.length_bonus, cfg.ppo.adaptive_kl, cfg.ppo.target_kl, cfg.rm.n_pairs) == (algo, -0.2, True, 6.0, 256)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_the_one_private_optuna_name_still_finds_stale_trials(tmp_path):
    """storage.stale_trial_ids wraps RDBStorage._get_stale_trial_ids, the package's only private Optuna name:
    if Optuna renames it or changes what it returns, this fails here instead of workers never failing dead trials."""
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=1)
    study = optuna.create_study(study_name="s", storage=storage)
    dead, alive = workers._ask(study), workers._ask(study)
    storage.record_heartbeat(trial_id(storage, "s", dead.number))
    assert stale_trial_ids(storage, "s") == []
    time.sleep(3.5)  # twice the heartbeat and SQLite's whole seconds
    storage.record_heartbeat(trial_id(storage, "s", alive.number))
    assert stale_trial_ids(storage, "s") == [trial_id(storage, "s", dead.number)]
