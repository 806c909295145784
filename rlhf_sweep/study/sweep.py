"""Studies: Optuna searches over config keys, run as in-process pipeline trials.

This module owns `rlhf-sweep sweep STUDY`: the study file (`studies/NAME.yaml` ->
`StudySpec`, read and checked by study.py), the Optuna study and its storage, the
worker processes that ask for trials and run `pipeline.run` on each, the MLflow
runs (a parent per study, a nested run per trial, and one per seed under it when
a trial has several seeds), resuming after a crash, and the end-of-study outputs
(`trials.csv`, `pareto.csv` and a terminal table of the Pareto-optimal trials).

Concurrency model: K worker processes share one study. Before each trial a
worker takes a file lock, fails trials whose local owner process is dead, counts
COMPLETE and RUNNING trials, and only asks for a new trial when that leaves room
under `n_trials`; so a study ends with exactly `n_trials` complete trials, and
a rerun of the same command after Ctrl-C or `kill -9` runs only the remainder.

Across machines (`--storage postgresql://...`) there is no shared file lock: the RDB storage
records a heartbeat per running trial, a trial whose heartbeat stops is failed by whichever
worker notices and re-queued with its parameters (Optuna's RetryHeartbeatStaleTrialCallback),
and a trial asked beyond `n_trials` by a worker on another machine at the same moment is pruned
before it runs.

Planned trials ("run exactly these"): a StudySpec with `trials` (study.PlannedTrial: a value
for every searched key and the seeds of that trial, from a study file's `trials:` list or built
in code) is run as given, nothing sampled. Each planned trial is identified by a hash of the
configs it composes to on its seeds and the thread count (`plan_key`: config keys that cannot
change a result, such as run_dir, cache_dir and mlflow, are left out), queued with Optuna's
public `study.enqueue_trial` (user attributes `plan_key`, `seeds`, `plan_name`), and run once:
calling `sweep` again with the same plan reruns nothing, a plan that adds trials runs only the
new ones, and a trial whose config changed (an edited overlay in conf/) runs again. Workers only
take queued trials; one whose key is not in the current plan (left WAITING by an interrupted
earlier call) is pruned unrun. The threads of a planned sweep are cores // workers as asked (not
reduced when few trials remain), so the keys stay the same between calls. `SweepResult.planned`
maps each planned trial, in order, to its complete trial (run_dir, seconds), or None when it
failed. compare-fixes (fixes.py) runs its arm x seed racing through this; any study can:

    spec = dataclasses.replace(load_spec("beta_clip_frontier"),
                               trials=[PlannedTrial({"ppo.beta": b, "ppo.clip_eps": 0.2}, seeds=[0, 1]) for b in (0.01, 0.1)])
    res = sweep(spec, workers=2)   # res.planned[i]["run_dir"] holds seed-0/ and seed-1/ of trial i

The end-of-study report (report.py) is the caller's: `rlhf-sweep sweep` writes it after `sweep`
returns (report.write_report), so this module never imports report.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from rlhf_sweep.config.algorithms import algo_sections
from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import ConfigError, config_hash, to_dict
from rlhf_sweep.run import layout, pipeline, preflight
from rlhf_sweep.study import journal

# the study file lives in study.py; these names stay importable from here for users' scripts
from rlhf_sweep.study.spec import PlannedTrial, StudyError, StudySpec, load_spec, make_sampler, override_value, trial_spec, varies_rm
from rlhf_sweep.study.storage import (
    HEARTBEAT_S,
    _fail_mlflow_run,
    _lock_path,
    fail_stale_trials,
    heartbeat_thread,
    heartbeats,
    hide_password,
    open_storage,
    owner_alive,
    owner_token,
    quiet,
    trial_id,
)
from rlhf_sweep.utils.runtime import cores, file_lock, set_worker_threads
from rlhf_sweep.utils.tables import fmt, format_table

# A worker gives up after this many failed trials in one invocation (a study whose
# every trial fails would otherwise retry forever); the count is over all workers.
MAX_FAILURES_FACTOR = 1  # times n_trials, at least 3


# a worker joining a study that another machine has just created waits this long for its MLflow parent run
PARENT_RUN_WAIT_S = 60.0
CLEAR_LINE = "\r\x1b[K"  # carriage return + erase to the end of the line


# ----- Optuna ------------------------------------------------------------------------------------
def worker_seed(spec: StudySpec, index: int, n_existing: int) -> int:
    """A sampler seed per (study seed, worker, resume point): parallel workers and a resumed
    study must not replay the same random start-up suggestions."""
    import numpy as np

    if spec.sampler == "grid":
        return spec.sampler_seed
    return int(np.random.SeedSequence([spec.sampler_seed, index, n_existing]).generate_state(1)[0])




# ----- one trial ----------------------------------------------------------------------------------
@dataclass
class Job:
    """What every worker needs (picklable, for spawned processes)."""

    spec: StudySpec
    study_name: str
    storage: str
    out_dir: str
    n_trials: int
    threads: int
    tracking_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None
    workers: int = 1
    heartbeat: int = HEARTBEAT_S
    plan_keys: list[str] = field(default_factory=list)  # a planned sweep: run only these queued trials


def _clean(v: Any) -> Any:
    # JSON in every storage: NaN/inf become null
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


# ----- the best-of-n baseline ---------------------------------------------------------------------
BASELINE_N = 256  # its history walks best-of-n' for n' = 1, 2, 4, ..., 256


def baseline_overrides(spec: StudySpec, seed: int) -> list[str]:
    """`algo=bon` on the study's fixed config: the same world, reference, RM and held-out evaluation as its
    trials (a fixed `algo` and that algorithm's own knobs are left out: best-of-n trains nothing)."""
    keep = {k: v for k, v in spec.fixed.items() if k != "algo" and k.split(".")[0] not in algo_sections()}
    return [*(f"{k}={override_value(v)}" for k, v in keep.items()), "algo=bon", f"bon.n={BASELINE_N}",
            f"bon.samples_per_prompt={BASELINE_N}", f"seed={seed}"]


def run_baseline(spec: StudySpec, name: str, out_dir: Path, threads: int, client=None, exp_id: str | None = None,
                 parent: str | None = None, say: Callable[[str], None] = print) -> list[Path]:
    """The study's best-of-n baseline, one `algo=bon` run per seed into OUT/baseline/seed-N/ (skipped when its
    summary.json exists), with the trials' thread count so it reuses their cached reference and RM; each run
    is an MLflow run nested in the study's. Returns the summary paths."""
    from rlhf_sweep.run import tracking

    paths = []
    for seed in spec.seeds:
        run_dir = layout.seed_dir(layout.baseline_dir(out_dir), seed)
        paths.append(layout.summary_path(run_dir))
        if paths[-1].is_file():
            continue
        say(f"best-of-n baseline, seed {seed}: algo=bon, n' = 1…{BASELINE_N}, {BASELINE_N} reference samples per held-out prompt")
        cfg, summary = pipeline.run_config(baseline_overrides(spec, seed), run_dir, threads=threads, progress=False, say=say)
        if client is not None and exp_id is not None:
            tracking.log_finished(client, exp_id, summary, cfg.run_dir, f"{name}-baseline-s{seed}",
                                  tags={"study": name, "seed": str(seed), "rlhf_sweep.role": "baseline"}, parent_run_id=parent)
    return paths


def run_trial_baselines(spec: StudySpec, name: str, storage: str, out_dir: Path, client=None, exp_id: str | None = None,
                        parent: str | None = None) -> None:
    """Every complete trial's own best-of-n baseline (varies_rm), where its summary.json is missing."""
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        params = {p.name: t.params[p.name] for p in spec.space if p.name in t.params}
        run_baseline(trial_spec(spec, params, t.user_attrs.get("seeds")), name, layout.trial_dir(out_dir, t.number), int(t.user_attrs.get("threads") or 1), client, exp_id,
                     parent, say=lambda msg, n=t.number: None if ": cached" in msg else print(f"trial {n}: {msg}", flush=True))


def run_trial(job: Job, study, trial, client, say: Callable[[str], None], storage=None) -> dict:
    """Run one asked trial over its seeds (a planned trial's own, else the study's), log it, and tell
    Optuna; returns a short record. storage: the study's, when the caller has it open."""
    from rlhf_sweep.run import tracking

    spec, t0 = job.spec, time.perf_counter()
    seeds = list(trial.user_attrs.get("seeds") or spec.seeds)
    plan_name = trial.user_attrs.get("plan_name") or ""
    trial_dir = layout.trial_dir(job.out_dir, trial.number)
    params: dict[str, Any] = {}
    run_id = None
    try:
        params = spec.suggest(trial)  # a retried trial gets its parameters back
        trial.set_user_attr("run_dir", str(trial_dir))
        trial.set_user_attr("threads", job.threads)  # part of the cache keys: the report reuses the trials' reference and RM
        retry_of = _retried_trial_number(storage or open_storage(job.storage), study.study_name, trial)
        if retry_of is not None:
            say(f"trial {trial.number}: retries trial {retry_of}, whose worker died")
        if client is not None:
            run_id = tracking.start_run(client, job.experiment_id, f"{job.study_name}-t{trial.number:04d}",
                                        tags={"study": job.study_name, "trial": str(trial.number), "rlhf_sweep.role": "trial",
                                              **({"retry_of": str(retry_of)} if retry_of is not None else {}),
                                              **({"plan": plan_name} if plan_name else {})},
                                        parent_run_id=job.parent_run_id)
            trial.set_user_attr("mlflow_run_id", run_id)
        summaries = []
        for seed in seeds:
            cfg, summary = pipeline.run_config(spec.trial_overrides(params, seed), layout.seed_dir(trial_dir, seed), threads=job.threads,
                                                 progress=False, say=say)
            summaries.append(summary)
            if client is not None and len(seeds) > 1:
                seed_run = tracking.start_run(client, job.experiment_id, f"{job.study_name}-t{trial.number:04d}-s{seed}",
                                              tags={"study": job.study_name, "trial": str(trial.number), "seed": str(seed),
                                                    "rlhf_sweep.role": "seed"}, parent_run_id=run_id)
                tracking.log_summary(client, seed_run, summary, cfg.run_dir)
                client.set_terminated(seed_run, status="FINISHED")
        if varies_rm(spec):
            # its RM differs from trial to trial, so best-of-n belongs to the trial, not to the study
            try:
                run_baseline(trial_spec(spec, params, seeds), job.study_name, trial_dir, job.threads, client, job.experiment_id,
                             run_id, say=say)
            except Exception as e:  # the trial's own runs stand; the sweep's end (or the next `sweep`) retries it
                say(f"warning: trial {trial.number}'s best-of-n failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                    "the sweep runs it again after the trials")
        combined = layout.combine_seeds(summaries, seeds)
        metrics = combined["metrics"]
        values = [float(metrics[o.metric]) for o in spec.objectives]
        bad = [o.metric for o, v in zip(spec.objectives, values, strict=True) if not math.isfinite(v)]
        bad += [c.metric for c in spec.constraints if not math.isfinite(float(metrics[c.metric]))]
        if bad:
            raise ValueError(f"metric {', '.join(dict.fromkeys(bad))} is not finite")
        trial.set_user_attr("metrics", _clean(metrics))
        trial.set_user_attr("per_seed", {str(seed): _clean({m: s["metrics"][m] for m in _tracked_metrics(spec)})
                                         for seed, s in zip(seeds, summaries, strict=True)})
        for c in spec.constraints:
            trial.set_constraint(c.text, c.violation(metrics))
        seconds = round(time.perf_counter() - t0, 2)
        trial.set_user_attr("seconds", seconds)
        if client is not None:
            tracking.log_summary(client, run_id, combined, summaries[0]["config"]["run_dir"] if len(summaries) == 1 else None)
            client.set_terminated(run_id, status="FINISHED")
        # tell last: once COMPLETE is visible, its MLflow run is complete too
        study.tell(trial, values)
        return {"number": trial.number, "state": "COMPLETE", "values": values, "params": params, "seconds": seconds}
    except BaseException as e:
        if isinstance(e, Exception) and _finished(storage or open_storage(job.storage), study.study_name, trial.number):
            # another worker saw no heartbeat from this one for the grace period (a stalled machine or a lost
            # database connection), failed the trial and queued its retry: the storage refuses this attempt's
            # attributes and result (UpdateFinishedTrialError, "Cannot tell a FAIL trial"), which are void
            msg = "failed by another worker: no heartbeat within the grace period; its retry runs instead"
            _fail_mlflow_run(client, run_id, msg)
            return {"number": trial.number, "state": "FAIL", "error": msg, "params": params, "seconds": round(time.perf_counter() - t0, 2)}
        interrupted = isinstance(e, KeyboardInterrupt)
        if interrupted:  # a second Ctrl-C must not cut the bookkeeping short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        msg = "interrupted (Ctrl-C)" if interrupted else f"{type(e).__name__}: {' '.join(str(e).split())}"[:1000]
        trial.set_user_attr("error", msg)
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "error.txt").write_text(traceback.format_exc())
        if client is not None and run_id:
            try:
                client.set_tag(run_id, "error", msg[:5000])
                client.set_terminated(run_id, status="KILLED" if interrupted else "FAILED")
            except Exception:
                pass
        study.tell(trial, state=TrialState.FAIL)
        if interrupted or not isinstance(e, Exception):
            raise
        return {"number": trial.number, "state": "FAIL", "error": msg, "params": params,
                "seconds": round(time.perf_counter() - t0, 2)}


def _finished(storage, study_name: str, number: int) -> bool:
    return storage.get_trial(trial_id(storage, study_name, number)).state.is_finished()


def _tracked_metrics(spec: StudySpec) -> list[str]:
    return list(dict.fromkeys([o.metric for o in spec.objectives] + [c.metric for c in spec.constraints]))


def work(job: Job, index: int, progress=None) -> None:
    """A worker: ask for trials and run them until the study has n_trials COMPLETE ones
    (a planned sweep: until every planned trial is complete, or none is left to run)."""
    from rlhf_sweep.run import tracking

    quiet()
    storage = open_storage(job.storage, job.heartbeat)
    lock = _lock_path(job.storage, Path(job.out_dir))
    study = optuna.load_study(study_name=job.study_name, storage=storage)
    study.sampler = make_sampler(job.spec, worker_seed(job.spec, index, len(study.get_trials(deepcopy=False))))
    client = tracking.client_for(job.tracking_uri) if job.tracking_uri else None
    failures_at_start = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    max_failures = max(3, MAX_FAILURES_FACTOR * job.n_trials)
    token = owner_token()
    tag = f"[worker {index}] " if job.workers > 1 else ""

    def say(msg: str) -> None:
        if ": cached" in msg:  # every trial loads the cached SFT/RM: only builds are news
            return
        if progress is not None:
            progress.write(f"{tag}{msg}")
        else:  # another worker's line on a terminal: clear the parent's progress bar line first (it redraws)
            print(f"{CLEAR_LINE if job.workers > 1 and sys.stdout.isatty() else ''}{tag}{msg}", flush=True)

    while True:
        with file_lock(lock):
            for n in fail_stale_trials(study, storage, client):
                say(f"trial {n}: its worker died; marked failed")
            trials = study.get_trials(deepcopy=False)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            failed = sum(t.state == TrialState.FAIL for t in trials) - failures_at_start
            if job.plan_keys:
                done = len(set(job.plan_keys) & {t.user_attrs.get("plan_key") for t in trials if t.state == TrialState.COMPLETE})
                # planned: only queued trials run; when none is queued and none of ours runs, the rest failed
                room = any(t.state == TrialState.WAITING for t in trials)
                if not room and not any(t.user_attrs.get("plan_key") in job.plan_keys for t in running):
                    return
            else:
                done = sum(t.state == TrialState.COMPLETE for t in trials)
                room = done + len(running) < job.n_trials
            if done >= job.n_trials:
                return
            if failed >= max_failures:
                say(f"stopping: {failed} trials failed in this run (see trials.csv and the error attribute)")
                return
            trial = None
            if room:
                trial = _ask(study)
                trial.set_user_attr("worker", token)
        if trial is not None and job.plan_keys and trial.user_attrs.get("plan_key") not in job.plan_keys:
            # queued by an earlier, interrupted call with another plan, or sampled because another machine took the last queued one
            trial.set_user_attr("error", "not run: not a trial of this sweep's plan")
            study.tell(trial, state=TrialState.PRUNED)
            trial = None
            continue
        if trial is not None and not job.plan_keys and _over_budget(study, trial, job.n_trials):
            # a worker on another machine (no shared file lock) took the last slot at the same moment
            trial.set_user_attr("error", "not run: the study already had n_trials complete or running trials")
            study.tell(trial, state=TrialState.PRUNED)
            trial = None
        if trial is None:
            # the remaining trials are running elsewhere; wait in case one of them fails. With
            # heartbeats, a dead worker's trial on any machine is failed and retried, so wait for
            # every running trial; without, trials of other hosts are left to their own sweeps
            if not heartbeats(storage) and all(owner_alive(t.user_attrs.get("worker", "")) is None for t in running):
                return
            time.sleep(1.0)
            continue
        with heartbeat_thread(storage, trial_id(storage, job.study_name, trial.number)):  # none on a journal
            rec = run_trial(job, study, trial, client, say, storage)
        if progress is not None:
            progress.update(int(rec["state"] == "COMPLETE"))
        if rec["state"] == "COMPLETE":
            vals = ", ".join(f"{o.metric}={fmt(v)}" for o, v in zip(job.spec.objectives, rec["values"], strict=True))
            say(f"trial {rec['number']} complete in {rec['seconds']:.1f}s: {vals}")
        else:
            say(f"trial {rec['number']} failed: {rec['error']}")


def _retried_trial_number(storage, study_name: str, trial) -> int | None:
    """The number of the trial this one retries (a trial whose worker died), or None."""
    import warnings

    with warnings.catch_warnings():  # "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        frozen = storage.get_trial(trial_id(storage, study_name, trial.number))
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


def _ask(study):
    import warnings

    with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": the sweep runs it itself
        warnings.filterwarnings("ignore", message=".*Heartbeat.*")
        return study.ask()


def _over_budget(study, trial, n_trials: int) -> bool:
    """Whether n_trials trials were complete, running or queued before this one was asked.

    Workers on one machine ask under a file lock and never get here with True; workers on several
    machines can each see room for the last trial. Trial numbers order the asks, so the later of
    two such trials steps back on every machine's view alike.
    """
    ahead = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
    return sum(t.number < trial.number for t in ahead) >= n_trials


def _worker_entry(job: Job, index: int) -> None:
    set_worker_threads(job.threads)  # each worker its share of the cores
    try:
        work(job, index)
    except KeyboardInterrupt:
        pass
    except StudyError as e:  # e.g. the journal was torn under it: one line, as the parent prints its own
        print(f"rlhf-sweep: error: [worker {index}] {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----- the study ----------------------------------------------------------------------------------
@dataclass
class SweepResult:
    study_name: str
    storage: str
    out_dir: str
    n_trials: int
    n_complete: int
    n_failed: int
    pareto: list[int]
    interrupted: bool = False
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    table: str = ""
    # a planned sweep: per planned trial, in order, its complete trial ({number, run_dir, seeds, seconds}) or None
    planned: list[dict | None] = field(default_factory=list)


def _parent_run(client, exp_id: str, study, spec: StudySpec, name: str, uri: str, storage: str, joined: bool = False) -> str:
    """One MLflow parent run per study, reused when the study resumes on the same tracking URI.

    joined: another process created the study (e.g. a worker on another machine, started at the
    same time); a fresh study's parent run is that process's to create, so wait for it.
    """
    from mlflow.entities import Param as MLParam

    from rlhf_sweep.config.schema import flatten
    from rlhf_sweep.run import tracking

    attrs = study.user_attrs
    if joined and attrs.get("mlflow_tracking_uri") != uri and not study.get_trials(deepcopy=False):
        deadline = time.monotonic() + PARENT_RUN_WAIT_S
        while time.monotonic() < deadline and study.user_attrs.get("mlflow_tracking_uri") != uri and not study.get_trials(deepcopy=False):
            time.sleep(0.5)
        attrs = study.user_attrs
    if attrs.get("mlflow_tracking_uri") == uri and attrs.get("mlflow_parent_run_id"):
        try:
            run_id = attrs["mlflow_parent_run_id"]
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:  # deleted or another store: start a new parent
            pass
    run_id = tracking.start_run(client, exp_id, name, tags={"study": name, "rlhf_sweep.role": "study"})
    params = {"study.file": spec.path, "study.sampler": spec.sampler, "study.n_trials": spec.n_trials,
              "study.seeds": ",".join(map(str, spec.seeds)), "study.storage": hide_password(storage),
              "study.objectives": ", ".join(f"{o.metric} {o.direction}" for o in spec.objectives),
              "study.constraints": "; ".join(c.text for c in spec.constraints),
              **{f"space.{p.name}": json.dumps({k: v for k, v in dataclasses.asdict(p).items() if v not in (None, [], False) and k != "name"})
                 for p in spec.space},
              **({"study.trials": _planned_param(spec)} if spec.trials else {}),
              **{f"fixed.{k}": v for k, v in flatten(spec.fixed).items()}}
    client.log_batch(run_id, params=[MLParam(k, str(v)[:6000]) for k, v in params.items()])
    study.set_user_attr("mlflow_parent_run_id", run_id)
    study.set_user_attr("mlflow_tracking_uri", uri)
    return run_id


def effective_spec(study: str | StudySpec, n_trials: int | None, workers: int) -> tuple[StudySpec, str | None]:
    """The study as this sweep runs it (--n-trials applied, a grid capped at its size), and a note when capped;
    StudyError for bad arguments. `sweep --dry-run` (dryrun.py) resolves its arguments here too."""
    spec = study if isinstance(study, StudySpec) else load_spec(study)
    if n_trials is not None and not spec.trials:  # a planned study runs exactly its trials
        if n_trials < 1:
            raise StudyError(f"--n-trials must be >= 1, got {n_trials}")
        spec = dataclasses.replace(spec, n_trials=n_trials)
    if workers < 1:
        raise StudyError(f"--workers must be >= 1, got {workers}")
    if spec.sampler == "grid" and not spec.trials:
        size = math.prod(len(p.grid_values()) for p in spec.space)
        if spec.n_trials > size:
            return dataclasses.replace(spec, n_trials=size), f"grid has {size} points: running {size} trials, not {spec.n_trials}"
    return spec, None


def sweep(study: str | StudySpec, n_trials: int | None = None, workers: int = 1, storage: str | None = None,
          name: str | None = None, tracking_uri: str | None = None, out: str | None = None, progress: bool = True,
          heartbeat: int = HEARTBEAT_S, baseline: bool = True) -> SweepResult:
    """Run (or resume) a study until it has n_trials COMPLETE trials (a planned study: until each of its
    `trials` is complete); then (with `baseline`) its best-of-n baseline runs; write the CSVs; return a
    summary. The report is the caller's (report.write_report).

    Everything that can be wrong with the inputs raises StudyError before any trial runs.
    heartbeat: seconds between the heartbeats of a running trial on an RDB storage.
    """
    import multiprocessing as mp

    from rlhf_sweep.run import tracking

    quiet()
    if heartbeat < 1:
        raise StudyError(f"--heartbeat must be >= 1 second, got {heartbeat}")
    # servers first: one that is down fails the command in seconds, before the study is composed
    if tracking_uri:
        why = tracking.unreachable(tracking_uri)
        if why:
            raise StudyError(f"cannot reach --tracking-uri {tracking_uri}: {why}; is the MLflow server running and reachable from this machine?")
    store = open_storage(storage, heartbeat) if storage and "://" in storage else None
    spec, note = effective_spec(study, n_trials, workers)
    if note:
        print(note)
    name = name or spec.name
    out_dir = layout.study_dir(name, out)
    storage = storage or str(layout.journal_path(out_dir))
    base = compose(spec.fixed_overrides())
    uri = tracking_uri or (base.mlflow.tracking_uri if base.mlflow.enabled else None)
    if journal.is_journal(storage):
        journal.check(storage)  # a torn or damaged journal stops the command before anything is created
    try:  # before the study or its folder exist: both will be written, and every trial logs to the store
        preflight.check(uri, "--tracking-uri" if tracking_uri else "mlflow.tracking_uri", {"--out": out_dir, "cache_dir": base.cache_dir})
    except preflight.PreflightError as e:
        raise StudyError(str(e)) from None

    store = store or open_storage(storage, heartbeat)
    directions = spec.directions
    try:  # atomic in the storage: exactly one of several workers started at once creates the study
        ostudy, joined = optuna.create_study(study_name=name, storage=store, directions=directions), False
    except optuna.exceptions.DuplicatedStudyError:
        ostudy, joined = optuna.load_study(study_name=name, storage=store), True
    if [d.name.lower() for d in ostudy.directions] != directions:
        have = ", ".join(d.name.lower() for d in ostudy.directions)
        raise StudyError(f"study {name!r} in {storage} has directions [{have}], the file asks for [{', '.join(directions)}]; "
                         "pass --name for a new study")
    check_space(ostudy, spec, storage)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "spec" not in ostudy.user_attrs:  # the plan is not part of it: each call of a planned sweep brings its own
        ostudy.set_user_attr("spec", _clean(json.loads(json.dumps({**spec.to_dict(), "trials": []}, default=str))))
    name_objectives(ostudy, spec)

    # MLflow: the store is created (migrated) here, once, before any worker opens it
    client = exp_id = parent = None
    if uri:
        client = tracking.client_for(uri)
        exp_id = tracking.experiment_id(client, base.mlflow.experiment, uri)
        parent = _parent_run(client, exp_id, ostudy, spec, name, uri, storage, joined)

    # a planned sweep keeps the thread count of the workers asked for: it is part of each trial's key
    plan_threads = max(1, cores() // workers)
    keys = plan_keys(spec, plan_threads) if spec.trials else []
    with file_lock(_lock_path(storage, out_dir)):
        stale = fail_stale_trials(ostudy, store, client)
        if keys:
            enqueue_planned(ostudy, spec, keys)
    if stale:
        print(f"marked {len(stale)} stale RUNNING trial(s) from a dead process as failed: {', '.join(map(str, stale))}")
    if keys:
        spec = dataclasses.replace(spec, n_trials=len(set(keys)))
        done = len(set(keys) & {t.user_attrs.get("plan_key") for t in ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))})
    else:
        done = len(ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    remaining = max(0, spec.n_trials - done)
    workers = max(1, min(workers, remaining or 1))
    threads = plan_threads if keys else max(1, cores() // workers)
    job = Job(spec=spec, study_name=name, storage=storage, out_dir=str(out_dir), n_trials=spec.n_trials, threads=threads,
              tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent, workers=workers, heartbeat=heartbeat,
              plan_keys=list(dict.fromkeys(keys)))
    print(f"study {name}: {done} of {spec.n_trials} {'planned ' if keys else ''}trials complete; "
          f"{remaining} to run with {workers} worker(s) x {threads} thread(s)"
          f"\n  storage: {hide_password(storage)}\n  outputs: {out_dir}" + (f"\n  MLflow:  {uri} (parent run {parent})" if uri else ""), flush=True)

    interrupted = False
    if remaining:
        # workers 1..K-1 are spawned (a fresh interpreter each: no forked torch, thread pools or
        # database connections); the parent is worker 0, so it starts trials while they import
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_entry, args=(job, i), name=f"sweep-worker-{i}") for i in range(1, workers)]
        for p in procs:
            p.start()
        bar = study_progress(job) if progress else None
        try:
            try:
                work(job, 0, bar)
                for p in procs:
                    p.join()
            finally:
                if bar is not None:
                    bar.close()
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            interrupted = True
            # Ctrl-C in a terminal reaches the workers too; a `kill -INT` of the parent alone does not
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGINT)
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
    if baseline and not interrupted:
        try:
            run_baseline(spec, name, out_dir, threads, client, exp_id, parent,
                         say=lambda msg: None if ": cached" in msg else print(msg, flush=True))
            if varies_rm(spec):  # trials stored before a worker ran their best-of-n, or whose best-of-n failed
                run_trial_baselines(spec, name, storage, out_dir, client, exp_id, parent)
        except Exception as e:  # the trials are stored either way; the next `sweep` retries it
            print(f"warning: the best-of-n baseline failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                  "the same command runs it again", flush=True)
    return finish(spec, name, storage, out_dir, client, parent, uri, interrupted, keys)


def _planned_param(spec: StudySpec) -> str:
    """The planned trials as one MLflow parameter (at most 6000 characters: MLflow's limit)."""
    text = json.dumps([{"params": t.params, "seeds": t.seeds} for t in spec.trials], default=str)
    return text if len(text) <= 6000 else f"{len(spec.trials)} planned trials (see the study's trials.csv)"


def name_objectives(ostudy, spec: StudySpec) -> None:
    """Optuna's names for the objectives (gold/policy, kl/exact): optuna-dashboard and Optuna's plots label axes with them."""
    import warnings

    if ostudy.metric_names is None:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ostudy.set_metric_names([o.metric for o in spec.objectives])


def study_progress(job: Job):
    """The study-level progress bar (progress.py), reading the study through its own storage connection."""
    from rlhf_sweep.study.progress import StudyProgress

    return StudyProgress(lambda: optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage, job.heartbeat)),
                         job.n_trials, job.workers, desc=job.study_name)


# ----- planned trials -----------------------------------------------------------------------------
RUN_ONLY_KEYS = ("run_dir", "progress", "mlflow", "cache_dir", "threads")  # config keys that cannot change a result


def plan_key(spec: StudySpec, planned: PlannedTrial, threads: int) -> str:
    """What identifies a planned trial: the configs it composes to on each of its seeds (less the keys
    that cannot change a result) and the torch thread count (float reduction order)."""
    configs = []
    for seed in planned.seeds:
        c = to_dict(compose(spec.trial_overrides(planned.params, seed)))
        configs.append({k: v for k, v in c.items() if k not in RUN_ONLY_KEYS})
    return config_hash(configs, threads)


def plan_keys(spec: StudySpec, threads: int) -> list[str]:
    from rlhf_sweep.study.spec import check_planned

    for i, t in enumerate(spec.trials):
        check_planned(t, spec.space, f"study {spec.name}: trials[{i}]", partial=True)
    try:
        return [plan_key(spec, t, threads) for t in spec.trials]
    except ConfigError as e:
        raise StudyError(f"study {spec.name}: a planned trial does not compose: {e}") from None


def enqueue_planned(study, spec: StudySpec, keys: list[str]) -> int:
    """Queue each planned trial that has no COMPLETE, RUNNING or WAITING trial with its key; returns how many.
    The caller holds the sweep's lock (one machine); across machines two callers may queue one twice."""
    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    have = {t.user_attrs.get("plan_key") for t in study.get_trials(deepcopy=False, states=live)}
    n = 0
    for t, key in zip(spec.trials, keys, strict=True):
        if key not in have:
            study.enqueue_trial(t.params, user_attrs={"plan_key": key, "seeds": list(t.seeds), "plan_name": t.name,
                                                    "plan_params": list(t.params)})
            have.add(key)
            n += 1
    return n


def planned_results(trials, keys: list[str]) -> list[dict | None]:
    """Per planned key, the latest COMPLETE trial with it: number, run_dir, seeds, seconds, metrics."""
    by_key = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == TrialState.COMPLETE and t.user_attrs.get("plan_key"):
            by_key[t.user_attrs["plan_key"]] = {"number": t.number, "run_dir": t.user_attrs.get("run_dir"),
                                                "seeds": t.user_attrs.get("seeds"), "seconds": t.user_attrs.get("seconds"),
                                                "metrics": t.user_attrs.get("metrics")}
    return [by_key.get(k) for k in keys]


def check_space(study, spec: StudySpec, storage: str) -> None:
    """A stored study's categorical choices cannot change (Optuna refuses a trial that suggests other ones)."""
    stored = {p["name"]: p for p in (study.user_attrs.get("spec") or {}).get("space", [])}
    for p in spec.space:
        old = stored.get(p.name)
        if p.kind == "categorical" and old and old.get("kind") == "categorical" and list(old.get("choices")) != list(p.choices):
            raise StudyError(f"study {study.study_name!r} in {hide_password(storage)} has {p.name} choices {old.get('choices')}, "
                             f"this run asks for {p.choices}; pass --name (or another --out) for a new study")


# ----- outputs ------------------------------------------------------------------------------------
def trial_rows(spec: StudySpec, trials, study_trials=None) -> tuple[list[str], list[list[Any]]]:
    """trials.csv / pareto.csv: objectives, params, constraints, per-seed objectives, bookkeeping,
    and the study's hypervolume once each complete trial was in (frontier.py; over `study_trials`,
    every trial of the study, when `trials` is a subset such as the Pareto front)."""
    from rlhf_sweep.maths.hypervolume import study_hypervolume

    names = [p.name for p in spec.space]
    tracked = _tracked_metrics(spec)
    header = ["number", "state", *[o.metric for o in spec.objectives], *names]
    # constraint metrics that are not objectives get a column of their own
    extra = [c.metric for c in spec.constraints if c.metric not in {o.metric for o in spec.objectives}]
    if spec.constraints:
        header += ["feasible", *dict.fromkeys(extra)]
    if len(spec.seeds) > 1:
        header += [f"{m}[seed={s}]" for s in spec.seeds for m in tracked]
    if spec.trials:  # a planned trial's own seeds and label
        header += ["seeds", "plan"]
    header += ["seconds", "datetime_start", "datetime_complete", "run_dir", "mlflow_run_id", "error"]
    hv = study_hypervolume(spec, trials if study_trials is None else study_trials)
    hv_at = hv.by_trial() if hv is not None else None
    if hv_at is not None:
        header.append("hypervolume")
    rows = []
    for t in trials:
        row: list[Any] = [t.number, t.state.name, *(t.values or [None] * len(spec.objectives)), *(t.params.get(n) for n in names)]
        if spec.constraints:
            cons = t.constraints
            row += [all(v <= 0 for v in cons.values()) if cons else None,
                    *((t.user_attrs.get("metrics") or {}).get(m) for m in dict.fromkeys(extra))]
        if len(spec.seeds) > 1:
            per = t.user_attrs.get("per_seed") or {}
            row += [(per.get(str(s)) or {}).get(m) for s in spec.seeds for m in tracked]
        if spec.trials:
            row += [" ".join(map(str, t.user_attrs.get("seeds") or [])), t.user_attrs.get("plan_name")]
        row += [t.user_attrs.get("seconds"), t.datetime_start, t.datetime_complete, t.user_attrs.get("run_dir"),
                t.user_attrs.get("mlflow_run_id"), t.user_attrs.get("error")]
        if hv_at is not None:
            row.append(hv_at.get(t.number))
        rows.append(row)
    return header, rows


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([["" if v is None else v for v in r] for r in rows])


def pareto_table(spec: StudySpec, best, n_complete: int) -> str:
    names = spec.param_names
    first = spec.objectives[0]
    best = sorted(best, key=lambda t: t.values[0], reverse=first.direction == "maximize")
    headers = ["trial", *names, *[f"{o.metric} ({o.direction[:3]})" for o in spec.objectives]]
    rows = [[t.number, *(t.params.get(n) for n in names), *t.values] for t in best]
    feas = f" satisfying {'; '.join(c.text for c in spec.constraints)}" if spec.constraints else ""
    title = f"Pareto-optimal trials{feas}: {len(best)} of {n_complete} complete"
    return format_table(headers, rows, title=title)


def finish(spec: StudySpec, name: str, storage: str, out_dir: Path, client, parent: str | None, uri: str | None,
           interrupted: bool, keys: list[str] | None = None) -> SweepResult:
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    planned = planned_results(trials, keys) if keys else []
    n_done = len({k for k, r in zip(keys, planned, strict=True) if r}) if keys else len(complete)
    best = study.best_trials if complete else []
    header, rows = trial_rows(spec, trials)
    write_csv(out_dir / "trials.csv", header, rows)
    write_csv(out_dir / "pareto.csv", *trial_rows(spec, best, trials))
    table = pareto_table(spec, best, len(complete)) if best else "no Pareto-optimal trials yet" + (
        " (no complete trial satisfies the constraints)" if complete else "")
    n_failed = sum(t.state == TrialState.FAIL for t in trials)
    if client is not None and parent:
        try:
            client.log_artifact(parent, str(out_dir / "trials.csv"))
            client.log_artifact(parent, str(out_dir / "pareto.csv"))
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(parent, metrics=[Metric("study/complete", len(complete), now, 0), Metric("study/failed", n_failed, now, 0),
                                              Metric("study/pareto", len(best), now, 0)])
            client.set_terminated(parent, status="FINISHED" if n_done >= spec.n_trials else "KILLED" if interrupted else "FAILED")
        except Exception as e:  # the study is in Optuna either way
            print(f"MLflow: could not finish the parent run: {type(e).__name__}: {e}")
    return SweepResult(study_name=name, storage=storage, out_dir=str(out_dir), n_trials=spec.n_trials, n_complete=n_done,
                       n_failed=n_failed, pareto=[t.number for t in best], interrupted=interrupted, tracking_uri=uri,
                       parent_run_id=parent, table=table, planned=planned)
