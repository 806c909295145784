"""Planned trials ("run exactly these"): each identified by a key, queued once, and found again after the sweep.

A StudySpec with `trials` (spec.PlannedTrial: a value for every searched key and the seeds of that
trial, from a study file's `trials:` list or built in code) is run as given, nothing sampled. Each
planned trial is identified by a hash of the configs it composes to on its seeds and the thread
count (`plan_key`: config keys that cannot change a result, such as run_dir, cache_dir and mlflow,
are left out), queued with Optuna's public `study.enqueue_trial` (user attributes `plan_key`,
`seeds`, `plan_name`, `plan_params`), and run once: calling `sweep` again with the same plan reruns
nothing, a plan that adds trials runs only the new ones, and a trial whose config changed (an
edited overlay in conf/) runs again. Workers only take queued trials (study.workers); one whose key
is not in the current plan (left WAITING by an interrupted earlier call) is pruned unrun. The
threads of a planned sweep are cores // workers as asked (not reduced when few trials remain), so
the keys stay the same between calls. `planned_results` (a sweep's `SweepResult.planned`) maps each
planned trial, in order, to its complete trial (run_dir, seconds), or None when it failed.
compare-fixes runs its arm x seed racing through this; any study can:

    spec = dataclasses.replace(load_spec("beta_clip_frontier"),
                               trials=[PlannedTrial({"ppo.beta": b, "ppo.clip_eps": 0.2}, seeds=[0, 1]) for b in (0.01, 0.1)])
    res = sweep(spec, workers=2)   # res.planned[i]["run_dir"] holds seed-0/ and seed-1/ of trial i
"""

from __future__ import annotations

from optuna.trial import TrialState

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import ConfigError, config_hash, to_dict
from rlhf_sweep.study.spec import PlannedTrial, StudyError, StudySpec, check_planned

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
    """Every planned trial's key, in order (each checked against the space first: one line names a bad one)."""
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
