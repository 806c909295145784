"""A sweep's workers: the `Job` they share, the loop that asks Optuna for trials, and `run_trial`, which runs one
trial's seeds through `run.pipeline.run_config`, logs its MLflow runs and tells Optuna the result.

Concurrency model: K worker processes share one study. Before each trial a worker takes a file lock,
fails trials whose local owner process is dead, counts COMPLETE and RUNNING trials, and only asks for
a new trial when that leaves room under `n_trials`; so a study ends with exactly `n_trials` complete
trials, and a rerun of the same command after Ctrl-C or `kill -9` runs only the remainder.

Across machines (`--storage postgresql://...`) there is no shared file lock: the RDB storage records a
heartbeat per running trial, a trial whose heartbeat stops is failed by whichever worker notices and
re-queued with its parameters (Optuna's RetryHeartbeatStaleTrialCallback), and a trial asked beyond
`n_trials` by a worker on another machine at the same moment is pruned before it runs.

MLflow: a trial is a run nested in the study's parent run, and each of its seeds a run nested in the
trial's when it has several; all are ended through `run.tracking.finish_run`.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from rlhf_sweep.run import layout, tracking
from rlhf_sweep.study import baselines
from rlhf_sweep.study.samplers import make_sampler, worker_seed
from rlhf_sweep.study.spec import StudyError, StudySpec, trial_spec, varies_rm
from rlhf_sweep.study.storage import (
    HEARTBEAT_S,
    fail_mlflow_run,
    fail_stale_trials,
    heartbeat_thread,
    heartbeats,
    json_safe,
    open_storage,
    owner_alive,
    owner_token,
    quiet,
    sweep_lock_path,
    trial_id,
)
from rlhf_sweep.utils.runtime import file_lock, set_worker_threads
from rlhf_sweep.utils.tables import fmt

# A worker gives up after this many failed trials in one invocation (a study whose
# every trial fails would otherwise retry forever); the count is over all workers.
MAX_FAILURES_FACTOR = 1  # times n_trials, at least 3

CLEAR_LINE = "\r\x1b[K"  # carriage return + erase to the end of the line


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


def run_trial(job: Job, study, trial, client, say: Callable[[str], None], storage=None) -> dict:
    """Run one asked trial over its seeds (a planned trial's own, else the study's), log it, and tell
    Optuna; returns a short record. storage: the study's, when the caller has it open."""
    # torch loads where a trial or baseline runs: a refused, resumed-complete or reporting sweep never pays for it
    from rlhf_sweep.run import pipeline

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
                tracking.finish_run(client, seed_run, summary, cfg.run_dir)
        if varies_rm(spec):
            # its RM differs from trial to trial, so best-of-n belongs to the trial, not to the study
            try:
                baselines.run_baseline(trial_spec(spec, params, seeds), job.study_name, trial_dir, job.threads, client,
                                       job.experiment_id, run_id, say=say)
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
        trial.set_user_attr("metrics", json_safe(metrics))
        trial.set_user_attr("per_seed", {str(seed): json_safe({m: s["metrics"][m] for m in spec.tracked_metrics})
                                         for seed, s in zip(seeds, summaries, strict=True)})
        for c in spec.constraints:
            trial.set_constraint(c.text, c.violation(metrics))
        seconds = round(time.perf_counter() - t0, 2)
        trial.set_user_attr("seconds", seconds)
        if client is not None:
            tracking.finish_run(client, run_id, combined, summaries[0]["config"]["run_dir"] if len(summaries) == 1 else None)
        # tell last: once COMPLETE is visible, its MLflow run is complete too
        study.tell(trial, values)
        return {"number": trial.number, "state": "COMPLETE", "values": values, "params": params, "seconds": seconds}
    except BaseException as e:
        if isinstance(e, Exception) and _finished(storage or open_storage(job.storage), study.study_name, trial.number):
            # another worker saw no heartbeat from this one for the grace period (a stalled machine or a lost
            # database connection), failed the trial and queued its retry: the storage refuses this attempt's
            # attributes and result (UpdateFinishedTrialError, "Cannot tell a FAIL trial"), which are void
            msg = "failed by another worker: no heartbeat within the grace period; its retry runs instead"
            fail_mlflow_run(client, run_id, msg)
            return {"number": trial.number, "state": "FAIL", "error": msg, "params": params, "seconds": round(time.perf_counter() - t0, 2)}
        interrupted = isinstance(e, KeyboardInterrupt)
        if interrupted:  # a second Ctrl-C must not cut the bookkeeping short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        msg = "interrupted (Ctrl-C)" if interrupted else f"{type(e).__name__}: {' '.join(str(e).split())}"[:1000]
        trial.set_user_attr("error", msg)
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "error.txt").write_text(traceback.format_exc())
        fail_mlflow_run(client, run_id, msg, status="KILLED" if interrupted else "FAILED")
        study.tell(trial, state=TrialState.FAIL)
        if interrupted or not isinstance(e, Exception):
            raise
        return {"number": trial.number, "state": "FAIL", "error": msg, "params": params,
                "seconds": round(time.perf_counter() - t0, 2)}


def _finished(storage, study_name: str, number: int) -> bool:
    """Whether the stored trial has ended (another worker may have failed it while this one ran it)."""
    return storage.get_trial(trial_id(storage, study_name, number)).state.is_finished()


def work(job: Job, index: int, progress=None) -> None:
    """A worker: ask for trials and run them until the study has n_trials COMPLETE ones
    (a planned sweep: until every planned trial is complete, or none is left to run)."""
    quiet()
    storage = open_storage(job.storage, job.heartbeat)
    lock = sweep_lock_path(job.storage, Path(job.out_dir))
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
    with warnings.catch_warnings():  # "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        frozen = storage.get_trial(trial_id(storage, study_name, trial.number))
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


def _ask(study):
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


def worker_entry(job: Job, index: int) -> None:
    """A spawned worker process: its share of the cores, then `work` until the study is done."""
    set_worker_threads(job.threads)  # each worker its share of the cores
    try:
        work(job, index)
    except KeyboardInterrupt:
        pass
    except StudyError as e:  # e.g. the journal was torn under it: one line, as the parent prints its own
        print(f"rlhf-sweep: error: [worker {index}] {e}", file=sys.stderr, flush=True)
        sys.exit(2)
