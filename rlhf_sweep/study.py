"""The study file: `studies/NAME.yaml` -> a checked `StudySpec`.

A study names its objectives (metric keys and directions), a search space over config keys
(float and int, optionally log-scaled or on a grid, and categorical) or an explicit list of
planned trials (`trials:`, each a mapping of config overrides; a list value expands into one
trial per value), fixed overrides, seeds per trial, the number of trials, the sampler and
optional constraints (`kl/exact <= 20`).
Every problem is found here, before any trial runs, and reported as one line that names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from .config import ConfigError, compose
from .tables import fmt

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
SAMPLERS = ("tpe", "nsga2", "random", "grid")
DIRECTIONS = {"maximize": "maximize", "max": "maximize", "minimize": "minimize", "min": "minimize"}
PARAM_TYPES = ("float", "int", "categorical")

# The keys of summary["metrics"] (evaluate.evaluate plus what pipeline.run adds);
# tests/test_sweep.py checks this list against a real trial so that it cannot drift.
METRIC_KEYS: tuple[str, ...] = (
    *(f"{k}/{s}" for k in ("rm", "gold") for s in (
        "policy", "policy_lo", "policy_hi", "ref", "ref_lo", "ref_hi", "win_rate", "win_rate_lo", "win_rate_hi")),
    *(f"{k}/{side}" for side in ("policy", "ref") for k in ("len", "filler", "directness", "correct", "wrong", "ended")),
    "kl/exact", "kl/k1", "kl/k3", "kl/exact_per_token",
    "rm/acc_labels", "rm/acc_gold",
    "ppo/beta", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/value_loss",
)

# Keys the sweep sets itself on every trial's config.
RESERVED_KEYS = ("seed", "run_dir", "progress", "threads")

class StudyError(ValueError):
    """A bad study file or sweep option; the message is one line that names the problem."""


# ----- the study file ---------------------------------------------------------------------------
@dataclass
class Param:
    """One searched config key.

    name: a dotted config key (`ppo.beta`) or a config group (`model`).
    kind: float | int | categorical.
    low, high: the range of float and int params (inclusive); taken from `grid` when omitted.
    log: sample on a log scale (low > 0).
    step: optional discretisation step of float/int params (not with log).
    choices: the values of a categorical param.
    grid: the values the grid sampler visits for a float/int param.
    """

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] = field(default_factory=list)
    grid: list[Any] = field(default_factory=list)

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid_values(self) -> list[Any]:
        return list(self.choices) if self.kind == "categorical" else list(self.grid)

    def probe_values(self) -> list[Any]:
        """The values composed at load time: both ends of a range, every choice or grid value."""
        if self.kind == "categorical":
            return list(self.choices)
        return list(dict.fromkeys([self.low, self.high, *self.grid]))


@dataclass
class Objective:
    """metric: a key of summary["metrics"] (e.g. gold/policy); direction: maximize | minimize."""

    metric: str
    direction: str


@dataclass
class Constraint:
    """`metric <= bound` or `metric >= bound` on the seed-averaged metrics (Optuna: feasible when <= 0)."""

    metric: str
    op: str
    bound: float

    @property
    def text(self) -> str:
        return f"{self.metric} {self.op} {fmt(self.bound)}"

    def violation(self, metrics: dict[str, float]) -> float:
        v = float(metrics[self.metric])
        return v - self.bound if self.op == "<=" else self.bound - v


@dataclass
class StudySpec:
    """A study file, checked.

    name: the study name (default: the file's stem); also names outputs/studies/NAME/.
    path: where it was read from.
    description: free text.
    objectives: metrics and directions, in order (Optuna's `values`).
    space: the searched config keys.
    fixed: overrides applied to every trial (`key: value`, as on the `rlhf-sweep run` command line).
    seeds: the config seeds each trial runs; objectives are averaged over them.
    n_trials: how many COMPLETE trials the study ends with.
    sampler: tpe | nsga2 | random | grid.
    sampler_seed: base seed of the sampler (each worker derives its own from it).
    sampler_options: extra keyword arguments of the Optuna sampler (e.g. n_startup_trials, population_size).
    constraints: `metric <= bound` / `metric >= bound`; infeasible trials stay off the Pareto front.
    trials: planned trials (instead of a space): each a mapping of config overrides, run exactly once.
    """

    name: str
    path: str
    description: str
    objectives: list[Objective]
    space: list[Param]
    fixed: dict[str, Any]
    seeds: list[int]
    n_trials: int
    sampler: str = "tpe"
    sampler_seed: int = 0
    sampler_options: dict[str, Any] = field(default_factory=dict)
    constraints: list[Constraint] = field(default_factory=list)
    # planned trials, in place of a search space: each a mapping of config keys to values, run exactly
    # (the sweep enqueues them in Optuna); n_trials is their count
    trials: list[dict[str, Any]] = field(default_factory=list)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def param_names(self) -> list[str]:
        """The config keys that vary between trials: the searched ones, or every key of the planned trials."""
        if self.trials:
            return list(dict.fromkeys(k for t in self.trials for k in t))
        return [p.name for p in self.space]

    def planned_choices(self) -> dict[str, list[Any]]:
        """Every value each key takes across the planned trials: its categorical distribution in Optuna
        (one distribution per name for the whole study, whichever trial suggests it)."""
        out: dict[str, list[Any]] = {}
        for t in self.trials:
            for k, v in t.items():
                if v not in out.setdefault(k, []):
                    out[k].append(v)
        return out

    def suggest(self, trial) -> dict[str, Any]:
        """A trial's config overrides: sampled from the space, or its planned trial's (`planned` user attribute,
        set when the sweep enqueued it; Optuna hands the enqueued values back)."""
        if not self.trials:
            return {p.name: p.suggest(trial) for p in self.space}
        i = trial.user_attrs.get("planned")
        if i is None or not 0 <= int(i) < len(self.trials):
            raise StudyError(f"trial {trial.number} is not one of the study's {len(self.trials)} planned trials")
        choices = self.planned_choices()
        return {k: trial.suggest_categorical(k, choices[k]) for k in self.trials[int(i)]}

    def fixed_overrides(self) -> list[str]:
        return [f"{k}={override_value(v)}" for k, v in self.fixed.items()]

    def trial_overrides(self, params: dict[str, Any], seed: int) -> list[str]:
        return [*self.fixed_overrides(), *(f"{k}={override_value(v)}" for k, v in params.items()), f"seed={seed}"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StudySpec:
        """Back from to_dict (as a sweep stores it in the study); fields missing in older studies keep their defaults."""
        nested = {"objectives": Objective, "space": Param, "constraints": Constraint}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: [nested[k](**x) for x in v or []] if k in nested else v for k, v in d.items() if k in known})


def override_value(v: Any) -> str:
    """A Python value as the right-hand side of a Hydra override."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)
    s = str(v)
    if re.search(r"[\s,=\[\]{}()'\"\\:]", s):  # Hydra's grammar would split or misread these
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return s


def _number(v: Any, where: str) -> float | int:
    # PyYAML reads `1e-3` (no dot) as a string; accept it as the number it means.
    if isinstance(v, bool) or v is None:
        raise StudyError(f"{where}: expected a number, got {v!r}")
    if isinstance(v, (int, float)):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        raise StudyError(f"{where}: expected a number, got {v!r}") from None


def _scalar(v: Any, where: str) -> Any:
    if isinstance(v, str):
        try:
            return float(v) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v) else v
        except ValueError:
            return v
    if v is None or isinstance(v, (bool, int, float)):
        return v
    raise StudyError(f"{where}: choices must be numbers, strings, booleans or null, got {v!r}")


def _check_keys(d: dict, allowed: tuple[str, ...], where: str) -> None:
    for k in d:
        if k not in allowed:
            hint = difflib.get_close_matches(str(k), allowed, n=1)
            raise StudyError(f"{where}: unknown field {k!r}" + (f" (did you mean {hint[0]!r}?)" if hint else f"; fields: {', '.join(allowed)}"))


def _metric(name: Any, where: str) -> str:
    if name not in METRIC_KEYS:
        hint = difflib.get_close_matches(str(name), METRIC_KEYS, n=1)
        raise StudyError(f"{where}: unknown metric {name!r}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else f"; metrics: {', '.join(METRIC_KEYS)}"))
    return name


def _param(name: str, raw: Any, where: str) -> Param:
    if isinstance(raw, list):  # shorthand: `model: [gpt2, llama]`
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, dict):
        raise StudyError(f"{where}: expected a mapping like {{type: float, low: 0.01, high: 1.0}}, got {raw!r}")
    _check_keys(raw, ("type", "low", "high", "log", "step", "choices", "grid"), where)
    kind = raw.get("type", "categorical" if "choices" in raw else "float")
    if kind not in PARAM_TYPES:
        raise StudyError(f"{where}: type {kind!r} is not one of {', '.join(PARAM_TYPES)}")
    if name in RESERVED_KEYS:
        raise StudyError(f"{where}: {name} is set by the sweep" + (" (use 'seeds')" if name == "seed" else ""))
    p = Param(name=name, kind=kind, log=bool(raw.get("log", False)))
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise StudyError(f"{where}: a categorical param needs a non-empty list 'choices'")
        p.choices = [_scalar(c, where) for c in choices]
        if len({json.dumps(c) for c in p.choices}) < len(p.choices):
            raise StudyError(f"{where}: choices repeat a value")
        return p
    if "choices" in raw:
        raise StudyError(f"{where}: 'choices' belongs to type categorical; a {kind} param takes low/high")
    grid = raw.get("grid") or []
    if not isinstance(grid, list):
        raise StudyError(f"{where}: grid must be a list of values")
    def cast(v: Any, at: str) -> float | int:
        x = _number(v, at)
        if kind == "int" and float(x) != int(x):
            raise StudyError(f"{at}: an int param takes integers, got {v!r}")
        return int(x) if kind == "int" else float(x)

    p.grid = [cast(g, where + ".grid") for g in grid]
    if "low" not in raw and "high" not in raw and p.grid:
        p.low, p.high = min(p.grid), max(p.grid)
    elif "low" not in raw or "high" not in raw:
        raise StudyError(f"{where}: a {kind} param needs 'low' and 'high'")
    else:
        p.low, p.high = cast(raw["low"], where + ".low"), cast(raw["high"], where + ".high")
        if p.low > p.high:
            raise StudyError(f"{where}: low {fmt(p.low)} > high {fmt(p.high)}")
        if p.low == p.high:
            raise StudyError(f"{where}: low == high ({fmt(p.low)}); put a constant under 'fixed'")
    if p.log and p.low <= 0:
        raise StudyError(f"{where}: log scale needs low > 0, got {fmt(p.low)}")
    if raw.get("step") is not None:
        p.step = cast(raw["step"], where + ".step")
        if p.step <= 0:
            raise StudyError(f"{where}: step must be > 0")
        if p.log:
            raise StudyError(f"{where}: step and log cannot be combined (Optuna)")
    for g in p.grid:
        if not p.low <= g <= p.high:
            raise StudyError(f"{where}: grid value {fmt(g)} is outside [{fmt(p.low)}, {fmt(p.high)}]")
    return p


def planned_trials(raw: Any, where: str) -> list[dict[str, Any]]:
    """`trials:` -> one dict of overrides per trial. An entry is a mapping of config keys to values; a list
    value expands the entry into one trial per value (several lists: every combination, in order), so
    `{algo: rloo, rloo.beta: [0.01, 0.1]}` plans two trials."""
    if not isinstance(raw, list) or not raw:
        raise StudyError(f"{where}: expected a non-empty list of mappings of config keys to values")
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or not entry:
            raise StudyError(f"{at}: expected a mapping of config keys to values, got {entry!r}")
        for k in entry:
            if k in RESERVED_KEYS:
                raise StudyError(f"{at}: {k} is set by the sweep" + (" (use 'seeds')" if k == "seed" else ""))
        axes = [[_scalar(x, at) for x in v] if isinstance(v, list) else [_scalar(v, at)] for v in entry.values()]
        if any(not a for a in axes):
            raise StudyError(f"{at}: an empty list of values")
        out += [dict(zip(entry, combo, strict=True)) for combo in itertools.product(*axes)]
    seen = [json.dumps(t, sort_keys=True) for t in out]
    dup = next((t for i, t in enumerate(seen) if t in seen[:i]), None)
    if dup is not None:
        raise StudyError(f"{where}: the trial {dup} is planned twice")
    return out


CONSTRAINT_RE = re.compile(r"^\s*(\S+)\s*(<=|>=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def find_study_file(study: str) -> Path:
    """STUDY is a path to a YAML file or a name in studies/."""
    p = Path(study)
    if p.is_file():
        return p
    named = STUDIES_DIR / f"{study}.yaml"
    if named.is_file():
        return named
    known = sorted(f.stem for f in STUDIES_DIR.glob("*.yaml"))
    raise StudyError(f"no study {study!r}: not a file, and not a name in {STUDIES_DIR} (studies: {', '.join(known) or 'none'})")


def load_spec(study: str, check_config: bool = True) -> StudySpec:
    """Read and check a study file; every problem raises StudyError with one line.

    With check_config, every searched value and the fixed overrides are composed
    against the config schema (Hydra + `config.validate`), so a misspelt key or an
    out-of-range bound fails here, before any trial runs.
    """
    path = find_study_file(study)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise StudyError(f"study {path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    name = path.stem
    where = f"study {name}"
    if not isinstance(raw, dict):
        raise StudyError(f"{where}: expected a mapping with objectives, space, n_trials, ...")
    _check_keys(raw, ("description", "objectives", "space", "trials", "fixed", "seeds", "n_trials", "sampler",
                      "sampler_seed", "sampler_options", "constraints"), where)

    objectives_raw = raw.get("objectives")
    if isinstance(objectives_raw, str):  # a single metric to maximize? no: make the direction explicit
        raise StudyError(f"{where}: objectives: give a mapping metric: maximize|minimize, e.g. {{gold/policy: maximize}}")
    if not isinstance(objectives_raw, dict) or not objectives_raw:
        raise StudyError(f"{where}: objectives: expected a mapping metric: maximize|minimize (one or several)")
    objectives = []
    for metric, direction in objectives_raw.items():
        _metric(metric, f"{where}: objectives")
        if str(direction).lower() not in DIRECTIONS:
            raise StudyError(f"{where}: objectives: {metric}: direction {direction!r} is not maximize or minimize")
        objectives.append(Objective(metric, DIRECTIONS[str(direction).lower()]))

    space_raw = raw.get("space")
    planned = planned_trials(raw.get("trials"), f"{where}: trials") if "trials" in raw else []
    if planned and space_raw:
        raise StudyError(f"{where}: give either 'space' (a search) or 'trials' (planned trials), not both")
    if planned:
        space_raw = {}
    elif not isinstance(space_raw, dict) or not space_raw:
        raise StudyError(f"{where}: space: expected a mapping of config keys to {{type, low, high}} or {{choices}}"
                         " (or 'trials': a list of planned trials)")
    space = [_param(str(k), v, f"{where}: space: {k}") for k, v in space_raw.items()]

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise StudyError(f"{where}: fixed: expected a mapping of config keys to values")
    for k in fixed:
        if k in RESERVED_KEYS:
            raise StudyError(f"{where}: fixed: {k} is set by the sweep" + (" (use 'seeds')" if k == "seed" else ""))
        if k in space_raw:
            raise StudyError(f"{where}: {k} is both searched (space) and fixed")
        if any(k in t for t in planned):
            raise StudyError(f"{where}: {k} is both in planned trials and fixed")

    seeds_raw = raw.get("seeds", 1)
    if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool) and seeds_raw >= 1:
        seeds = list(range(seeds_raw))
    elif isinstance(seeds_raw, list) and seeds_raw and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_raw):
        seeds = list(dict.fromkeys(seeds_raw))
    else:
        raise StudyError(f"{where}: seeds: expected a count >= 1 or a list of seeds >= 0, got {seeds_raw!r}")

    n_trials = raw.get("n_trials", len(planned) if planned else None)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise StudyError(f"{where}: n_trials: expected an integer >= 1, got {n_trials!r}")
    if planned and n_trials != len(planned):
        raise StudyError(f"{where}: n_trials is {n_trials} but 'trials' plans {len(planned)}; leave n_trials out")

    sampler = str(raw.get("sampler", "tpe")).lower()
    if sampler not in SAMPLERS:
        raise StudyError(f"{where}: sampler {raw.get('sampler')!r} is not one of {', '.join(SAMPLERS)}")
    if sampler == "grid" and not planned:
        missing = [p.name for p in space if not p.grid_values()]
        if missing:
            raise StudyError(f"{where}: the grid sampler needs 'grid' values (or categorical choices) for {', '.join(missing)}")
    sampler_seed = raw.get("sampler_seed", 0)
    if not isinstance(sampler_seed, int) or isinstance(sampler_seed, bool):
        raise StudyError(f"{where}: sampler_seed: expected an integer, got {sampler_seed!r}")
    options = raw.get("sampler_options") or {}
    if not isinstance(options, dict):
        raise StudyError(f"{where}: sampler_options: expected a mapping of keyword arguments")

    constraints = []
    for c in raw.get("constraints") or []:
        m = CONSTRAINT_RE.match(str(c))
        if not m:
            raise StudyError(f"{where}: constraints: {c!r} is not 'metric <= number' or 'metric >= number'")
        constraints.append(Constraint(_metric(m.group(1), f"{where}: constraints"), m.group(2), float(m.group(3))))

    spec = StudySpec(name=name, path=str(path), description=str(raw.get("description", "")).strip(), objectives=objectives,
                     space=space, fixed=dict(fixed), seeds=seeds, n_trials=n_trials, sampler=sampler,
                     sampler_seed=sampler_seed, sampler_options=dict(options), constraints=constraints, trials=planned)
    try:
        make_sampler(spec, seed=0)
    except (TypeError, ValueError) as e:
        raise StudyError(f"{where}: sampler_options: {str(e).splitlines()[0]}") from None
    if check_config:
        check_against_config(spec)
    return spec


def check_against_config(spec: StudySpec) -> None:
    """Compose the fixed overrides, then each searched value on top, against the config schema."""
    where = f"study {spec.name}"
    try:
        compose(spec.fixed_overrides())
    except ConfigError as e:
        raise StudyError(f"{where}: fixed: {e}") from None
    for i, t in enumerate(spec.trials):
        try:
            compose(spec.trial_overrides(t, spec.seeds[0]))
        except ConfigError as e:
            raise StudyError(f"{where}: trials[{i}] {json.dumps(t)}: {e}") from None
    if not spec.space:
        return
    base = {p.name: p.probe_values()[0] for p in spec.space}
    try:
        compose(spec.trial_overrides(base, spec.seeds[0]))
    except ConfigError as e:
        raise StudyError(f"{where}: space: {e}") from None
    for p in spec.space:
        for v in p.probe_values()[1:]:
            try:
                compose(spec.trial_overrides({**base, p.name: v}, spec.seeds[0]))
            except ConfigError as e:
                raise StudyError(f"{where}: space: {p.name}={override_value(v)}: {e}") from None


def make_sampler(spec: StudySpec, seed: int):
    if spec.trials:  # every trial is planned and enqueued: Optuna hands back their values, nothing is sampled
        return optuna.samplers.RandomSampler(seed=seed)
    opts = dict(spec.sampler_options)
    if spec.sampler == "tpe":
        # constant_liar: a running trial counts as a bad result, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, **{"constant_liar": True, **opts})
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **opts)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed, **opts)
    # grid ids index a grid shuffled by the seed: every worker must use the same seed
    return _GridSampler({p.name: p.grid_values() for p in spec.space}, seed=spec.sampler_seed, **opts)


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler without its after_trial `study.stop()`, which is only legal inside
    `study.optimize`; the sweep stops by counting trials instead."""

    def after_trial(self, study, trial, state, values) -> None:
        return None
