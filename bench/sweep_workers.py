"""Wall time of the same small study with 1, then 2 worker processes; and journal vs SQLite storage.

    .venv/bin/python bench/sweep_workers.py [--trials 8] [--iterations 40] [--batch-size 32] [--no-storage]

Both sweeps run exactly the same trials: a grid over ppo.beta x ppo.clip_eps (the grid sampler
visits every point once, whichever worker asks). The SFT/RM cache is warmed by a first one-trial
sweep, so the timed sweeps measure what a study spends once its artefacts exist: PPO trials,
MLflow logging and worker start-up. Each sweep is the real command (`rlhf-sweep sweep`) in a
subprocess, timed from outside, so interpreter and worker start-up count against both.

Storage: the 2-worker sweep is repeated on SQLite (`--storage sqlite:///...`), and a micro
benchmark times 2 processes doing ask/tell with a trivial objective on each storage.
The sweep's threads per worker are cores // workers; run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "outputs" / "bench" / "sweep_workers"


def write_study(path: Path, trials: int, iterations: int, batch_size: int, device: str = "auto") -> None:
    spec = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    betas = [round(0.01 * 3 ** i, 4) for i in range((trials + 1) // 2)]
    spec.update(
        description="bench/sweep_workers.py: a fixed grid, so every sweep runs the same trials",
        space={"ppo.beta": {"type": "float", "log": True, "grid": betas}, "ppo.clip_eps": {"type": "float", "grid": [0.1, 0.3]}},
        seeds=1, n_trials=len(betas) * 2, sampler="grid", sampler_options={},
    )
    spec["fixed"].update({"ppo.iterations": iterations, "ppo.batch_size": batch_size, "eval.n_prompts": 64, "device": device})
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def sweep(study: Path, name: str, workers: int, storage: str | None = None, n_trials: int | None = None) -> float:
    out = OUT / name
    cmd = [sys.executable, "-m", "rlhf_sweep", "sweep", str(study), "--name", name, "--workers", str(workers),
           "--out", str(out), "--tracking-uri", f"sqlite:///{OUT / 'mlflow.db'}"]
    if storage:
        cmd += ["--storage", storage]
    if n_trials:
        cmd += ["--n-trials", str(n_trials)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall


def trial_set(name: str) -> set[tuple[str, str]]:
    with open(OUT / name / "trials.csv") as f:
        return {(row["ppo.beta"], row["ppo.clip_eps"]) for row in csv.DictReader(f) if row["state"] == "COMPLETE"}


def _ask_tell(storage: str, n: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from rlhf_sweep.study.storage import open_storage

    study = optuna.load_study(study_name="micro", storage=open_storage(storage))
    for _ in range(n):
        t = study.ask()
        x = t.suggest_float("x", -1, 1)
        t.set_user_attr("metrics", {"a": x, "b": x * x})
        study.tell(t, x * x)


def micro(storage: str, procs: int = 2, n: int = 100) -> float:
    """2 processes x n ask/tell (one user attr each) on `storage`; returns seconds."""
    import optuna

    from rlhf_sweep.study.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="micro", storage=open_storage(storage))
    ctx = mp.get_context("spawn")
    ps = [ctx.Process(target=_ask_tell, args=(storage, n)) for _ in range(procs)]
    t = time.perf_counter()
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    wall = time.perf_counter() - t
    assert len(optuna.load_study(study_name="micro", storage=open_storage(storage)).trials) == procs * n
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8, help="grid points (rounded up to an even number)")
    ap.add_argument("--iterations", type=int, default=40, help="ppo.iterations per trial")
    ap.add_argument("--batch-size", type=int, default=32, help="ppo.batch_size (prompts per PPO iteration)")
    ap.add_argument("--no-storage", action="store_true", help="skip the journal vs SQLite part")
    a = ap.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    study = OUT / "bench_study.yaml"
    write_study(study, a.trials, a.iterations, a.batch_size)
    n = yaml.safe_load(study.read_text())["n_trials"]
    print(f"study: {n} trials (grid), ppo.iterations={a.iterations}, ppo.batch_size={a.batch_size}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")

    sweep(study, "warm", 1, n_trials=1)  # trains the SFT reference and the RM once
    one = sweep(study, "w1", 1)
    two = sweep(study, "w2", 2)
    assert trial_set("w1") == trial_set("w2") and len(trial_set("w1")) == n, "the two sweeps ran different trials"
    print(f"1 worker : {one:6.1f} s wall ({n} trials, journal storage)")
    print(f"2 workers: {two:6.1f} s wall ({n} trials, journal storage)")
    print(f"ratio 2/1: {two / one:.2f} (target <= 0.60)")

    if not a.no_storage:
        sql = sweep(study, "w2sqlite", 2, storage=f"sqlite:///{OUT / 'w2sqlite' / 'optuna.db'}")
        print(f"2 workers: {sql:6.1f} s wall ({n} trials, SQLite storage)")
        j = micro(str(OUT / "micro.journal"))
        s = micro(f"sqlite:///{OUT / 'micro.db'}")
        print(f"ask/tell, 2 processes x 100 trials: journal {j:.1f} s, SQLite {s:.1f} s")
    print(f"load average at the end {os.getloadavg()[0]:.2f}; outputs in {OUT}")


if __name__ == "__main__":
    main()
