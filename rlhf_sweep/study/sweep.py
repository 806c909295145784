"""`rlhf-sweep sweep STUDY`: run (or resume) an Optuna study over config keys until it has `n_trials` complete trials.

This module owns the sweep as a whole: the study's arguments as this sweep runs them (`effective_spec`),
creating or joining the Optuna study in its storage, the MLflow parent run (one per study, reused when it
resumes), starting the worker processes (study.workers: the trials themselves, and the concurrency model),
queuing a planned study's trials (study.planning), the best-of-n baseline after the trials
(study.baselines), and the end-of-study outputs: `trials.csv`, `pareto.csv`, a terminal table of the
Pareto-optimal trials, and the study's counts and CSVs on the parent run.

The end-of-study report is the caller's: `rlhf-sweep sweep` writes it after `sweep` returns
(reporting.report.write_report), so studies never import the reporting layer.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing as mp
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import flatten
from rlhf_sweep.maths.hypervolume import study_hypervolume
from rlhf_sweep.run import layout, preflight, tracking
from rlhf_sweep.study import baselines, journal
from rlhf_sweep.study.definition import guard, new_study_name
from rlhf_sweep.study.planning import enqueue_planned, plan_keys, planned_results
from rlhf_sweep.study.progress import StudyProgress
from rlhf_sweep.study.spec import StudyError, StudySpec, load_spec, varies_rm
from rlhf_sweep.study.storage import (
    HEARTBEAT_S,
    fail_stale_trials,
    hide_password,
    json_safe,
    open_storage,
    quiet,
    sweep_lock_path,
)
from rlhf_sweep.study.workers import Job, work, worker_entry
from rlhf_sweep.utils.runtime import cores, file_lock
from rlhf_sweep.utils.tables import format_table

# a worker joining a study that another machine has just created waits this long for its MLflow parent run
PARENT_RUN_WAIT_S = 60.0


@dataclass
class SweepResult:
    """What a sweep ends with: its study, the counts, the Pareto-optimal trial numbers and the table printed for them."""

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
    from mlflow.entities import Param as MLParam  # mlflow loads in seconds: only a study that logs to it pays that

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
    StudyError for bad arguments. `sweep --dry-run` (study.dryrun) resolves its arguments here too."""
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


def check_name(name: str) -> str:
    """A study name is one folder name under outputs/studies: `--name ../../x` would write elsewhere."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise StudyError(f"--name {name!r}: a study name is one folder name under {layout.OUTPUTS / 'studies'} (no '/', '\\', "
                         "'.' or '..'); pass --out DIR to write the study's outputs elsewhere")
    return name


def cap_workers(workers: int) -> tuple[int, str | None]:
    """At most one worker per core: each is a fresh interpreter (~400 MB) and more than the cores only queue."""
    n = cores()
    if workers > n:
        return n, f"--workers {workers}: this machine runs {n} at once (cores available to this process); using {n}"
    return workers, None


def sweep(study: str | StudySpec, n_trials: int | None = None, workers: int = 1, storage: str | None = None,
          name: str | None = None, tracking_uri: str | None = None, out: str | None = None, progress: bool = True,
          heartbeat: int = HEARTBEAT_S, baseline: bool = True, new_study: bool = False) -> SweepResult:
    """Run (or resume) a study until it has n_trials COMPLETE trials (a planned study: until each of its
    `trials` is complete); then (with `baseline`) its best-of-n baseline runs; write the CSVs; return a
    summary. The report is the caller's (reporting.report.write_report).

    Everything that can be wrong with the inputs raises StudyError before any trial runs.
    heartbeat: seconds between the heartbeats of a running trial on an RDB storage.
    new_study: run the study file as the study NAME-<fingerprint> (study.definition.new_study_name; with
    --out, in OUT-<fingerprint>): an edited file gets a study of its own, the same one on every call.
    """
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
    workers, capped = cap_workers(workers)
    for line in (note, capped):
        if line:
            print(line)
    name = check_name(name or spec.name)
    if new_study:
        name, out = new_study_target(name, spec, out)
        print(f"--new-study: study {name} (its definition's fingerprint), outputs in {layout.study_dir(name, out)}")
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
    guard(ostudy, spec, f"study {name!r} in {hide_password(storage)}", _way_out(name, spec, out, new_study))
    check_space(ostudy, spec, storage)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "spec" not in ostudy.user_attrs:  # the plan is not part of it: each call of a planned sweep brings its own
        ostudy.set_user_attr("spec", json_safe(json.loads(json.dumps({**spec.to_dict(), "trials": []}, default=str))))
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
    with file_lock(sweep_lock_path(storage, out_dir)):
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
        procs = [ctx.Process(target=worker_entry, args=(job, i), name=f"sweep-worker-{i}") for i in range(1, workers)]
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
            baselines.run_baseline(spec, name, out_dir, threads, client, exp_id, parent,
                                   say=lambda msg: None if ": cached" in msg else print(msg, flush=True))
            if varies_rm(spec):  # trials stored before a worker ran their best-of-n, or whose best-of-n failed
                baselines.run_trial_baselines(spec, name, storage, out_dir, client, exp_id, parent)
        except Exception as e:  # the trials are stored either way; the next `sweep` retries it
            print(f"warning: the best-of-n baseline failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                  "the same command runs it again", flush=True)
    return finish(spec, name, storage, out_dir, client, parent, uri, interrupted, keys)


def new_study_target(name: str, spec: StudySpec, out: str | None) -> tuple[str, str | None]:
    """--new-study: the study name and --out (a sibling of the one given) for this definition."""
    new = new_study_name(name, spec)
    return new, (f"{str(out).rstrip('/')}{new[len(name):]}" if out else None)


def _way_out(name: str, spec: StudySpec, out: str | None, new_study: bool) -> str:
    """How to start a new study, for the refusal of an edited one."""
    if new_study:  # NAME-FP already holds another definition: only a hash collision gets here
        return "pass --name NEW"
    alt, alt_out = new_study_target(name, spec, out)
    where = f" in {alt_out}" if alt_out else ""
    return (f"run the edited file as a new study with --new-study (it makes {alt}{where}), or pass "
            + ("another --out (and --name NEW if the storage is shared)" if out else "--name NEW"))


def _planned_param(spec: StudySpec) -> str:
    """The planned trials as one MLflow parameter (at most 6000 characters: MLflow's limit)."""
    text = json.dumps([{"params": t.params, "seeds": t.seeds} for t in spec.trials], default=str)
    return text if len(text) <= 6000 else f"{len(spec.trials)} planned trials (see the study's trials.csv)"


def name_objectives(ostudy, spec: StudySpec) -> None:
    """Optuna's names for the objectives (gold/policy, kl/exact): optuna-dashboard and Optuna's plots label axes with them."""
    if ostudy.metric_names is None:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ostudy.set_metric_names([o.metric for o in spec.objectives])


def study_progress(job: Job):
    """The study-level progress bar (study.progress), reading the study through its own storage connection."""
    return StudyProgress(lambda: optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage, job.heartbeat)),
                         job.n_trials, job.workers, desc=job.study_name)


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
    and the study's hypervolume once each complete trial was in (maths.hypervolume; over `study_trials`,
    every trial of the study, when `trials` is a subset such as the Pareto front)."""
    names = [p.name for p in spec.space]
    tracked = spec.tracked_metrics
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
    """The end of a sweep: trials.csv, pareto.csv, the Pareto table, the parent run's counts and CSVs and its status."""
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
            from mlflow.entities import Metric  # mlflow loads in seconds: only a study that logs to it pays that

            now = int(time.time() * 1000)
            client.log_batch(parent, metrics=[Metric("study/complete", len(complete), now, 0), Metric("study/failed", n_failed, now, 0),
                                              Metric("study/pareto", len(best), now, 0)])
            tracking.finish_run(client, parent, files=[out_dir / "trials.csv", out_dir / "pareto.csv"],
                                status="FINISHED" if n_done >= spec.n_trials else "KILLED" if interrupted else "FAILED")
        except Exception as e:  # the study is in Optuna either way
            print(f"MLflow: could not finish the parent run: {type(e).__name__}: {e}")
    return SweepResult(study_name=name, storage=storage, out_dir=str(out_dir), n_trials=spec.n_trials, n_complete=n_done,
                       n_failed=n_failed, pareto=[t.number for t in best], interrupted=interrupted, tracking_uri=uri,
                       parent_run_id=parent, table=table, planned=planned)
