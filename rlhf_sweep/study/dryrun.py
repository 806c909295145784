"""`rlhf-sweep sweep STUDY --dry-run`: what a sweep would do, without doing it.

It prints the study's search space composed on its fixed config (each searched key with its range and
the value the fixed config gives it), the fixed overrides, objectives, constraints, seeds, sampler,
the trial count (and what a stored study already has), and an estimated wall time from trials
measured on this machine, saying which:

1. this study's own complete trials, when its storage has some (their recorded seconds), else
2. runs under `outputs/` (their `summary.json`) with the same PPO and evaluation sizes, plus the
   measured build time of the SFT reference and RM when this study's are not cached yet.

Nothing is run, created or written; with nothing measured, the estimate says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import Config, flatten, to_dict
from rlhf_sweep.run import layout, pipeline
from rlhf_sweep.study.spec import StudySpec, override_value
from rlhf_sweep.study.sweep import cap_workers, check_name, effective_spec, new_study_target
from rlhf_sweep.utils.runtime import cores
from rlhf_sweep.utils.tables import fmt, format_table

# What a trial's PPO and evaluation cost depends on (a run with the same values costs the same per seed)
RUN_COST_KEYS = ("algo", "model", "world.max_new_tokens", "ppo.iterations", "ppo.batch_size", "ppo.epochs", "ppo.minibatches",
                 "eval.n_prompts", "rm.ensemble_size", "device")
# ... and what building the SFT reference and the RM costs
BUILD_COST_KEYS = (*RUN_COST_KEYS, "sft.n_demos", "sft.epochs", "sft.batch_size", "rm.n_pairs", "rm.n_eval_pairs",
                   "rm.epochs", "rm.batch_size", "rm.pairs")
MAX_SUMMARIES = 400  # the newest summary.json files read for timings


@dataclass
class Estimate:
    seconds: float | None  # wall seconds for the remaining trials; None when nothing was measured
    source: str  # which measurements, in words


@dataclass
class Plan:
    spec: StudySpec
    name: str
    storage: str
    n_trials: int
    complete: int
    workers: int
    threads: int
    base: Config
    estimate: Estimate
    notes: list[str] = field(default_factory=list)


def _pick(d: dict, keys: tuple[str, ...], exclude: set[str]) -> dict:
    flat = flatten(d)
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys) and k not in exclude}


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _stored_trials(storage: str, name: str) -> tuple[list[Any], str | None]:
    """The study's trials if its storage exists (read only: a missing journal is not created)."""
    try:
        if "://" in storage:
            store = optuna.storages.RDBStorage(storage, skip_table_creation=True, skip_compatibility_check=True)
        elif Path(storage).is_file():
            store = JournalStorage(JournalFileBackend(storage))
        else:
            return [], None
        return optuna.load_study(study_name=name, storage=store).get_trials(deepcopy=False), None
    except KeyError:
        return [], None
    except Exception as e:  # an RDB that does not answer: the plan is still worth printing
        return [], f"storage not read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"


def _summaries(root: Path) -> list[dict]:
    # MLflow's artifact folders hold copies of the same files
    found = layout.find_summaries(root)
    files = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:MAX_SUMMARIES]
    out = []
    for f in files:
        try:
            s = layout.read_summary(f)
            if isinstance(s.get("timing"), dict) and isinstance(s.get("config"), dict):
                out.append(s)
        except (OSError, ValueError):
            continue
    return out


def _cached(cfg: Config, seeds: list[int], threads: int) -> bool:
    """Whether the SFT reference and RM of every seed are in the cache at this thread count."""
    device = pipeline.pick_device(cfg.device)
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=seed, threads=threads)
        keys = [pipeline.sft_key(c, device), *(pipeline.rm_key(c, device, m) for m in range(c.rm.ensemble_size))]
        if not all((Path(c.cache_dir) / f"{k}.pt").exists() for k in keys):
            return False
    return True


def estimate(spec: StudySpec, base: Config, trials: list[Any], remaining: int, workers: int, threads: int,
             outputs: Path = Path("outputs")) -> Estimate:
    """Wall seconds for `remaining` trials with `workers` workers, from measurements on this machine."""
    if remaining <= 0:
        return Estimate(0.0, "nothing left to run")
    per_worker = math.ceil(remaining / workers)
    done = [t for t in trials if t.state == TrialState.COMPLETE and isinstance(t.user_attrs.get("seconds"), (int, float))]
    if done:
        per_trial = _median([float(t.user_attrs["seconds"]) for t in done])
        used = sorted({t.user_attrs.get("threads") for t in done if t.user_attrs.get("threads")})
        return Estimate(per_worker * per_trial,
                        f"{remaining} trials / {workers} worker(s) x {per_trial:.1f} s per trial (median of this study's "
                        f"{len(done)} complete trials" + (f", {'/'.join(map(str, used))} thread(s) each" if used else "") + ")")

    searched = {p.name for p in spec.space}
    want_run = _pick(to_dict(base), RUN_COST_KEYS, searched)
    want_build = _pick(to_dict(base), BUILD_COST_KEYS, searched)
    runs, builds_sft, builds_rm = [], [], []
    for s in _summaries(outputs):
        have_threads = s["config"].get("threads") or cores()  # 0: every core (this machine's, as far as we can tell)
        if _pick(s["config"], RUN_COST_KEYS, searched) != want_run:
            continue
        cache = s.get("cache") or {}
        sft_built = (cache.get("sft") or {}).get("cached") is False
        rm_built = (cache.get("rm") or {}).get("cached") is False
        t = s["timing"]
        runs.append((have_threads, float(t.get("total", 0.0)) - (float(t.get("sft", 0.0)) if sft_built else 0.0)
                     - (float(t.get("rm", 0.0)) if rm_built else 0.0)))
        if _pick(s["config"], BUILD_COST_KEYS, searched) == want_build:
            if sft_built:
                builds_sft.append((have_threads, float(t.get("sft", 0.0))))
            if rm_built:
                builds_rm.append((have_threads, float(t.get("rm", 0.0))))
    if not runs:
        return Estimate(None, f"no measurement yet: this study has no complete trial and no run under {outputs}/ has its "
                              "PPO and evaluation sizes; run one trial (e.g. --n-trials 1) and ask again")

    def prefer_threads(xs: list[tuple[int | None, float]]) -> tuple[list[float], bool]:
        same = [v for th, v in xs if th == threads]
        return (same, True) if same else ([v for _th, v in xs], False)

    run_s, same = prefer_threads(runs)
    per_run = _median(run_s)
    seeds = len(spec.seeds)
    text = (f"{remaining} trials / {workers} worker(s) x {seeds} seed(s) x {per_run:.1f} s per run (median pipeline time of "
            f"{len(run_s)} run(s) under {outputs}/ with the same PPO and evaluation sizes; MLflow logging not included"
            + ("" if same else f", measured with another thread count than this sweep's {threads}") + ")")
    seconds = per_worker * seeds * per_run
    try:
        cached = _cached(base, spec.seeds, threads)
    except Exception:  # the estimate only; the sweep itself reports a real problem
        cached = True
    if not cached:
        sft_s, _ = prefer_threads(builds_sft)
        rm_s, _ = prefer_threads(builds_rm)
        if sft_s and rm_s:
            build = seeds * (_median(sft_s) + _median(rm_s))
            seconds += build
            text += f", + {build:.0f} s to build the SFT reference and RM of {seeds} seed(s) (not cached; measured builds)"
        else:
            text += ", + building the SFT reference and RM (not cached; no build of this size measured here)"
    return Estimate(seconds, text)


def plan(study: str, n_trials: int | None = None, workers: int = 1, storage: str | None = None, name: str | None = None,
         out: str | None = None, new_study: bool = False) -> Plan:
    """Everything `sweep` would do with these arguments, checked as it checks them (StudyError on a bad input)."""
    spec, note = effective_spec(study, n_trials, workers)
    workers, capped = cap_workers(workers)
    notes = [n for n in (note, capped) if n]
    name = check_name(name or spec.name)
    if new_study:
        name, out = new_study_target(name, spec, out)
    out_dir = layout.study_dir(name, out)
    storage = storage or str(layout.journal_path(out_dir))
    trials, why = _stored_trials(storage, name)
    if why:
        notes.append(why)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    remaining = max(0, spec.n_trials - complete)
    workers = max(1, min(workers, remaining or 1))
    threads = max(1, cores() // workers)
    base = compose(spec.fixed_overrides())
    return Plan(spec=spec, name=name, storage=storage, n_trials=spec.n_trials, complete=complete, workers=workers,
                threads=threads, base=base, estimate=estimate(spec, base, trials, remaining, workers, threads), notes=notes)


def _range(p) -> str:
    if p.kind == "categorical":
        return "{" + ", ".join(override_value(c) for c in p.choices) + "}"
    text = f"[{fmt(p.low)}, {fmt(p.high)}]" + (f" step {fmt(p.step)}" if p.step else "")
    return text + (f" grid {', '.join(fmt(g) for g in p.grid)}" if p.grid else "")


def duration_text(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def render(pl: Plan) -> str:
    spec, flat = pl.spec, flatten(to_dict(pl.base))
    out = [f"study {pl.name} ({spec.path})" + (f": {' '.join(spec.description.split())}" if spec.description else "")]
    out.append("objectives: " + ", ".join(f"{o.metric} ({o.direction})" for o in spec.objectives))
    if spec.constraints:
        out.append("constraints: " + "; ".join(c.text for c in spec.constraints))
    rows = [(p.name, p.kind, _range(p), "log" if p.log else "linear", fmt(flat.get(p.name, "(config group)"))) for p in spec.space]
    out.append(format_table(("searched key", "type", "range / choices", "scale", "value in the fixed config"), rows,
                            title="\nsearch space, composed on the study's fixed config:"))
    if spec.fixed:
        out.append("fixed overrides: " + " ".join(spec.fixed_overrides()))
    out.append(f"seeds per trial: {', '.join(map(str, spec.seeds))}; sampler: {spec.sampler}"
               + (f" {json.dumps(spec.sampler_options)}" if spec.sampler_options else ""))
    have = f"{pl.complete} complete in {pl.storage}" if pl.complete else f"none stored yet ({pl.storage})"
    left = max(0, pl.n_trials - pl.complete)
    out.append(f"trials: {pl.n_trials} complete to end with; {have}; {left} to run with {pl.workers} worker(s) x {pl.threads} thread(s)")
    e = pl.estimate
    out.append(f"estimated wall time: {'unknown' if e.seconds is None else '~' + duration_text(e.seconds)} ({e.source})")
    out += [f"note: {n}" for n in pl.notes]
    out.append("dry run: nothing was run or written")
    return "\n".join(out)
