"""The study file: `studies/NAME.yaml` -> a checked `StudySpec`, and the one builder of Hydra overrides.

A study names its objectives (metric keys and directions), a search space over config keys
(float and int, optionally log-scaled or on a grid, and categorical), fixed overrides, seeds
per trial, the number of trials, the sampler and optional constraints (`kl/exact <= 20`).
Instead of sampling, a study can list its trials (`trials:`, `PlannedTrial`); the sweep then runs
exactly those (study.planning). An entry is `{params: {key: value}, seeds: [..], name: ..}`, or a
plain mapping of config keys to values where a list value expands into one trial per value
(`{algo: rloo, rloo.beta: [0.01, 0.1]}` plans two). Without a `space`, every key the trials set
is searched as a categorical of the values they give it.
A value `a+b` of a config group (`experiment: [baseline, rm_ensemble+kl_control]`, fixed or
searched) composes both options, as `experiment=[a,b]` does on the command line: `config_override`
writes every override of a trial, a best-of-n baseline and a compare-fixes arm.
Every problem is found here, before any trial runs, and reported as one line that names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.paths import PathsError, config_dirs, shipped_studies_dir, study_dirs
from rlhf_sweep.config.schema import MAX_SEED, ConfigError
from rlhf_sweep.study.samplers import make_sampler
from rlhf_sweep.utils.tables import fmt
from rlhf_sweep.utils.yamlfile import YamlFileError, read_yaml

STUDIES_DIR = shipped_studies_dir()
SAMPLERS = ("tpe", "nsga2", "random", "grid", "gp")
DIRECTIONS = {"maximize": "maximize", "max": "maximize", "minimize": "minimize", "min": "minimize"}
PARAM_TYPES = ("float", "int", "categorical")

# The keys of summary["metrics"] (evaluation.metrics plus what run.pipeline adds);
# tests/test_sweep.py checks this list against a real trial so that it cannot drift.
METRIC_KEYS: tuple[str, ...] = (
    *(f"{k}/{s}" for k in ("rm", "gold") for s in (
        "policy", "policy_lo", "policy_hi", "ref", "ref_lo", "ref_hi", "win_rate", "win_rate_lo", "win_rate_hi")),
    *(f"{k}/{side}" for side in ("policy", "ref") for k in ("len", "filler", "directness", "correct", "wrong", "ended", "repeat")),
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
class PlannedTrial:
    """A trial the study runs as given instead of sampling it.

    params: a value for every searched key (categorical: one of its choices; float/int: within [low, high]).
    seeds: the config seeds it runs; its objectives are averaged over them.
    name: a label for logs and MLflow (e.g. `rm_ensemble seed 3`); optional.
    """

    params: dict[str, Any]
    seeds: list[int]
    name: str = ""


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
    sampler: tpe | nsga2 | random | grid | gp (Gaussian-process Bayesian optimization).
    sampler_seed: base seed of the sampler (each worker derives its own from it).
    sampler_options: extra keyword arguments of the Optuna sampler (e.g. n_startup_trials, population_size).
    constraints: `metric <= bound` / `metric >= bound`; infeasible trials stay off the Pareto front.
    reference_point: the hypervolume's reference point, {metric: value} for every objective (one or
        two); empty: the default rule of maths.hypervolume (the reference model's values and a KL cap).
    trials: planned trials; when given, the sweep runs exactly these (n_trials = len(trials)) and samples none.
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
    reference_point: dict[str, float] = field(default_factory=dict)
    trials: list[PlannedTrial] = field(default_factory=list)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def param_names(self) -> list[str]:
        """The config keys that vary between trials (the searched ones)."""
        return [p.name for p in self.space]

    def suggest(self, trial) -> dict[str, Any]:
        """A trial's config overrides: sampled from the space, or for a planned trial (queued by the sweep;
        Optuna hands the queued values back) the keys it sets (`plan_params`)."""
        keys = trial.user_attrs.get("plan_params")
        return {p.name: p.suggest(trial) for p in self.space if keys is None or p.name in keys}

    @property
    def tracked_metrics(self) -> list[str]:
        """The metrics a trial records per seed: the objectives, then the constraints' other metrics."""
        return list(dict.fromkeys([o.metric for o in self.objectives] + [c.metric for c in self.constraints]))

    def fixed_overrides(self) -> list[str]:
        return [config_override(k, v) for k, v in self.fixed.items()]

    def trial_overrides(self, params: dict[str, Any], seed: int) -> list[str]:
        return [*self.fixed_overrides(), *(config_override(k, v) for k, v in params.items()), config_override("seed", seed)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StudySpec:
        """Back from to_dict (as a sweep stores it in the study); fields missing in older studies keep their defaults."""
        nested = {"objectives": Objective, "space": Param, "constraints": Constraint, "trials": PlannedTrial}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: [nested[k](**x) for x in v or []] if k in nested else v for k, v in d.items() if k in known})


RM_KEYS = ("rm.n_layer", "rm.n_embd", "rm.n_pairs")


def varies_rm(spec: StudySpec) -> bool:
    """A study that searches the RM's own keys (its size or data): each trial then gets its own best-of-n
    baseline in its directory (TRIAL/baseline/seed-N/), run by the worker right after the trial's seeds."""
    return any(p.name in RM_KEYS for p in spec.space)


def trial_spec(spec: StudySpec, params: dict[str, Any], seeds: list[int] | None = None) -> StudySpec:
    """The study with one trial's parameters fixed (and its seeds): what that trial's own best-of-n runs on."""
    return dataclasses.replace(spec, fixed={**spec.fixed, **params}, seeds=list(seeds or spec.seeds))


GROUP_LIST_RE = re.compile(r"^[A-Za-z_][\w-]*(\+[A-Za-z_][\w-]*)+$")


def config_override(key: str, v: Any) -> str:
    """The Hydra override `key=value` that sets config key `key` to `v`: the one builder of every override a
    trial, a best-of-n baseline and a compare-fixes arm compose. A value `a+b` of a config group (a folder of
    conf/, e.g. `experiment`) composes both options, `group=[a,b]`, as on the command line."""
    if isinstance(v, str) and "." not in key and GROUP_LIST_RE.match(v) and any((d / key).is_dir() for d in config_dirs()):
        return f"{key}=[{','.join(v.split('+'))}]"
    return f"{key}={override_value(v)}"


def override_value(v: Any) -> str:
    """A Python value as the right-hand side of a Hydra override (how `config_override` and the dry run write it)."""
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
        if not math.isfinite(x):  # Optuna accepts an infinite bound and then every trial fails
            raise StudyError(f"{at}: expected a finite number, got {v!r}")
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
        # Optuna samples low, low+step, ... and silently lowers `high` to the last of them: [1, 3] step 5 is [1, 1]
        width, step = Decimal(str(p.high)) - Decimal(str(p.low)), Decimal(str(p.step))  # as Optuna computes it
        if width < step or width % step:
            n, last = float(width / step), p.low + int(width // step) * p.step
            raise StudyError(f"{where}: step {fmt(p.step)} does not fit [{fmt(p.low)}, {fmt(p.high)}]: Optuna would sample "
                             f"[{fmt(p.low)}, {fmt(last)}]; make high - low a multiple of step (e.g. high: {fmt(p.low + max(1, round(n)) * p.step)})")
    for g in p.grid:
        if not p.low <= g <= p.high:
            raise StudyError(f"{where}: grid value {fmt(g)} is outside [{fmt(p.low)}, {fmt(p.high)}]")
    return p


MAX_SEEDS = 1000  # seeds per trial: a count beyond this is a typo, not an experiment (and a list that size)


def _seeds(raw: Any, where: str) -> list[int]:
    """A count (seeds 0..n-1) or a list; every seed is checked, not only the first one composed."""
    if isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw <= MAX_SEEDS:
        return list(range(raw))
    if isinstance(raw, list) and raw and all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        bad = [s for s in raw if not 0 <= s <= MAX_SEED]
        if bad:
            raise StudyError(f"{where}: seed {bad[0]} is out of range: a seed is an integer in [0, {MAX_SEED}]")
        return list(dict.fromkeys(raw))
    raise StudyError(f"{where}: expected a count in [1, {MAX_SEEDS}] or a list of seeds in [0, {MAX_SEED}], got {raw!r}")


def check_planned(t: PlannedTrial, space: list[Param], where: str, partial: bool = False) -> None:
    """A planned trial gives every searched key a value its Param admits, and nothing else; with `partial`
    (a study whose space is the keys its trials set) it may leave keys out, which keep the config's value."""
    names = [p.name for p in space]
    extra = [k for k in t.params if k not in names]
    missing = [] if partial else [n for n in names if n not in t.params]
    if extra or missing or not t.params:
        raise StudyError(f"{where}: params must give {'searched' if partial else 'exactly the searched'} keys ({', '.join(names)})"
                         + (f"; unknown: {', '.join(extra)}" if extra else "") + (f"; missing: {', '.join(missing)}" if missing else "")
                         + ("" if t.params else "; it gives none"))
    for p in space:
        if p.name not in t.params:
            continue
        v = t.params[p.name]
        if p.kind == "categorical":
            if v not in p.choices:
                raise StudyError(f"{where}: {p.name}={v!r} is not one of its choices {p.choices}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not p.low <= v <= p.high:
            raise StudyError(f"{where}: {p.name}={v!r} is not a number in [{fmt(p.low)}, {fmt(p.high)}]")


def _planned(raw: Any, space: list[Param], seeds: list[int], where: str, partial: bool = False) -> PlannedTrial:
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict):
        raise StudyError(f"{where}: expected a mapping {{params: {{key: value, ...}}, seeds: [..], name: ..}}")
    _check_keys(raw, ("params", "seeds", "name"), where)
    t = PlannedTrial(params={k: _scalar(v, where) for k, v in raw["params"].items()},
                     seeds=_seeds(raw["seeds"], f"{where}.seeds") if "seeds" in raw else list(seeds), name=str(raw.get("name", "")))
    check_planned(t, space, where, partial)
    return t


def expand_planned(entry: dict, at: str) -> list[dict[str, Any]]:
    """A plain `trials:` entry -> one dict of overrides per trial: a list value expands the entry into one
    trial per value (several lists: every combination, in order), so `{algo: rloo, rloo.beta: [0.01, 0.1]}`
    plans two trials."""
    if not entry:
        raise StudyError(f"{at}: expected a mapping of config keys to values, got {entry!r}")
    for k in entry:
        if k in RESERVED_KEYS:
            raise StudyError(f"{at}: {k} is set by the sweep" + (" (use 'seeds')" if k == "seed" else ""))
    axes = [[_scalar(x, at) for x in v] if isinstance(v, list) else [_scalar(v, at)] for v in entry.values()]
    if any(not a for a in axes):
        raise StudyError(f"{at}: an empty list of values")
    return [dict(zip(entry, combo, strict=True)) for combo in itertools.product(*axes)]


CONSTRAINT_RE = re.compile(r"^\s*(\S+)\s*(<=|>=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def find_study_file(study: str) -> Path:
    """STUDY is a path to a YAML file or a name in the study directories (paths.study_dirs: the user's,
    ./studies, the shipped ones; the first match wins)."""
    p = Path(study)
    if p.is_file():
        return p
    try:
        dirs = study_dirs()
    except PathsError as e:
        raise StudyError(str(e)) from None
    for d in dirs:
        for suffix in (".yaml", ".yml"):
            named = d / f"{study}{suffix}"
            if named.is_file():
                return named
    known = sorted({f.stem for d in dirs for f in [*d.glob("*.yaml"), *d.glob("*.yml")]})
    raise StudyError(f"no study {study!r}: not a file, and not a name in {', '.join(map(str, dirs))} "
                     f"(studies: {', '.join(known) or 'none'}; add yours with --studies-dir DIR)")


def load_spec(study: str, check_config: bool = True) -> StudySpec:
    """Read and check a study file; every problem raises StudyError with one line.

    With check_config, every searched value and the fixed overrides are composed
    against the config schema (Hydra + `config.validate`), so a misspelt key or an
    out-of-range bound fails here, before any trial runs.
    """
    path = find_study_file(study)
    try:  # not UTF-8, not YAML, a key given twice: one line with the file and the line
        raw = read_yaml(path)
    except (YamlFileError, OSError) as e:
        raise StudyError(f"study {e}" if isinstance(e, YamlFileError) else f"study {path}: cannot be read ({e.strerror})") from None
    name = path.stem
    where = f"study {name}"
    if not isinstance(raw, dict):
        raise StudyError(f"{where}: expected a mapping with objectives, space, n_trials, ...")
    _check_keys(raw, ("description", "objectives", "space", "trials", "fixed", "seeds", "n_trials", "sampler",
                      "sampler_seed", "sampler_options", "constraints", "reference_point"), where)

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

    space_raw = raw.get("space") or {}
    trials_raw = raw.get("trials")
    if trials_raw is not None and (not isinstance(trials_raw, list) or not trials_raw):
        raise StudyError(f"{where}: trials: expected a non-empty list of planned trials")
    if not isinstance(space_raw, dict) or (not space_raw and not trials_raw):
        raise StudyError(f"{where}: space: expected a mapping of config keys to {{type, low, high}} or {{choices}}"
                         " (or 'trials': a list of planned trials)")
    seeds = _seeds(raw.get("seeds", 1), f"{where}: seeds")
    entries = []  # (the {params, seeds, name} form, where), a plain entry expanded
    for i, t in enumerate(trials_raw or []):
        at = f"{where}: trials[{i}]"
        if isinstance(t, dict) and "params" not in t:
            entries += [({"params": p}, at) for p in expand_planned(t, at)]
        else:
            entries.append((t, at))
    if trials_raw and not space_raw:  # searched: every key the trials set, as a categorical of the values they give it
        choices: dict[str, list[Any]] = {}
        for t, at in entries:
            for k, v in (t.get("params") or {}).items() if isinstance(t, dict) and isinstance(t.get("params"), dict) else ():
                if _scalar(v, at) not in choices.setdefault(str(k), []):
                    choices[str(k)].append(_scalar(v, at))
        space_raw = {k: v for k, v in choices.items()}
    space = [_param(str(k), v, f"{where}: space: {k}") for k, v in space_raw.items()]

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise StudyError(f"{where}: fixed: expected a mapping of config keys to values")
    for k in fixed:
        if k in RESERVED_KEYS:
            raise StudyError(f"{where}: fixed: {k} is set by the sweep" + (" (use 'seeds')" if k == "seed" else ""))
        if k in space_raw:
            raise StudyError(f"{where}: {k} is both " + ("searched (space)" if "space" in raw else "in planned trials") + " and fixed")

    trials = [_planned(t, space, seeds, at, partial=not raw.get("space")) for t, at in entries]
    seen = [json.dumps([t.params, t.seeds], sort_keys=True, default=str) for t in trials]
    dup = next((i for i, k in enumerate(seen) if k in seen[:i]), None)
    if dup is not None:
        raise StudyError(f"{entries[dup][1]}: the trial {json.dumps(trials[dup].params, default=str)} on seeds {trials[dup].seeds} "
                         "is planned twice")

    n_trials = raw.get("n_trials", len(trials) if trials else None)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise StudyError(f"{where}: n_trials: expected an integer >= 1, got {n_trials!r}")
    if trials and n_trials != len(trials):
        raise StudyError(f"{where}: n_trials is {n_trials} but {len(trials)} trials are listed; leave n_trials out with 'trials'")

    sampler = str(raw.get("sampler", "tpe")).lower()
    if sampler not in SAMPLERS:
        raise StudyError(f"{where}: sampler {raw.get('sampler')!r} is not one of {', '.join(SAMPLERS)}")
    if sampler == "grid" and not trials:
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

    reference_point = _reference_point(raw.get("reference_point"), objectives, where)
    spec = StudySpec(name=name, path=str(path), description=str(raw.get("description", "")).strip(), objectives=objectives,
                     space=space, fixed=dict(fixed), seeds=seeds, n_trials=n_trials, sampler=sampler,
                     sampler_seed=sampler_seed, sampler_options=dict(options), constraints=constraints,
                     reference_point=reference_point, trials=trials)
    try:
        make_sampler(spec, seed=0)
    except (TypeError, ValueError) as e:
        raise StudyError(f"{where}: sampler_options: {str(e).splitlines()[0]}") from None
    if check_config:
        check_against_config(spec)
    return spec


def _reference_point(raw: Any, objectives: list[Objective], where: str) -> dict[str, float]:
    """`reference_point: {gold/policy: 0.5, kl/exact: 20}`: a number for each objective, nothing else."""
    if raw is None:
        return {}
    names = [o.metric for o in objectives]
    example = "{" + ", ".join(f"{m}: ..." for m in names) + "}"
    if len(names) > 2:
        raise StudyError(f"{where}: reference_point: the hypervolume is computed for one or two objectives, this study has {len(names)}")
    if not isinstance(raw, dict) or sorted(raw) != sorted(names):
        raise StudyError(f"{where}: reference_point: expected a number for each objective, {example}, got {raw!r}")
    point = {m: float(_number(raw[m], f"{where}: reference_point: {m}")) for m in names}
    bad = [m for m, v in point.items() if not math.isfinite(v)]
    if bad:
        raise StudyError(f"{where}: reference_point: {bad[0]} must be a finite number")
    return point


def check_against_config(spec: StudySpec) -> None:
    """Compose the fixed overrides, then each searched value on top, against the config schema."""
    where = f"study {spec.name}"
    try:
        compose(spec.fixed_overrides())
    except ConfigError as e:
        raise StudyError(f"{where}: fixed: {e}") from None
    for i, t in enumerate(spec.trials):  # a planned study composes exactly its trials
        try:
            compose(spec.trial_overrides(t.params, t.seeds[0]))
        except ConfigError as e:
            raise StudyError(f"{where}: trials[{i}] {json.dumps(t.params, default=str)}: {e}") from None
    if not spec.space or spec.trials:
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
