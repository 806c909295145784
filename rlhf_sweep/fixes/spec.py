"""compare-fixes' settings: the study file `studies/compare_fixes.yaml` with the command line on top (`FixesSpec`),
the arms (experiment overlays in `conf/experiment/`; `a+b` composes two) and the planned study that runs
(arm, seed) pairs through the sweep. Every bad value is one line naming its key and the fix.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.paths import config_dirs, group_options, shipped_studies_dir
from rlhf_sweep.config.schema import ConfigError
from rlhf_sweep.study.spec import RESERVED_KEYS, Objective, Param, PlannedTrial, StudySpec, config_override
from rlhf_sweep.utils.yamlfile import YamlFileError, read_yaml

STUDY_FILE = shipped_studies_dir() / "compare_fixes.yaml"
STUDY_NAME = "compare_fixes"

# (summary metric, label, +1 if larger is better for the team, -1 if smaller is, 0 if neither)
METRICS = (
    ("gold/policy", "gold", +1),
    ("gold/win_rate", "gold win rate", +1),
    ("len/policy", "length", -1),
    ("filler/policy", "filler", -1),
    ("kl/exact", "KL exact", -1),
    ("rm/policy", "RM score", 0),
)
DECIDE_ON = "gold/policy"  # the metric the racing and the recommendation read


class FixesError(ValueError):
    """A bad arm, seed count, budget or study file; the message is one line naming the key and the fix."""


@dataclass
class FixesSpec:
    """studies/compare_fixes.yaml, checked.

    arms: the baseline and the single fixes it races (overlays in conf/experiment/);
    combinations: arms that combine others (`a+b`, or an overlay such as `combined`): scored on the
        confirmation seeds beside the recommended pair, never raced or recommended;
    first_seed: the seed pool starts here: selection seeds first_seed .. first_seed+max_seeds-1, then
        confirm_seeds held-out seeds after them;
    seeds: the first block (every arm); seeds_per_round: seeds added per look to the arms in contention;
    budget_minutes: wall time for the whole comparison (the first block always runs);
    alpha: the Holm-adjusted level of every "helps", "hurts" and "beats".
    """

    arms: list[str]
    seeds: int = 6
    max_seeds: int = 15
    confirm_seeds: int = 5
    first_seed: int = 0
    seeds_per_round: int = 2
    budget_minutes: float = 40.0
    baseline: str = "baseline"
    combinations: list[str] = field(default_factory=list)
    workers: int = 2
    confidence: float = 0.95
    alpha: float = 0.05

    @property
    def singles(self) -> list[str]:
        return [a for a in self.arms if a != self.baseline and "+" not in a and a not in self.combinations]

    @property
    def extras(self) -> list[str]:
        """Combinations asked for (arms with '+' or listed under combinations): confirmed, never raced."""
        return list(dict.fromkeys([*(a for a in self.arms if a not in (self.baseline, *self.singles)), *self.combinations]))

    @property
    def selection_seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.max_seeds))

    @property
    def held_out_seeds(self) -> list[int]:
        start = self.first_seed + self.max_seeds
        return list(range(start, start + self.confirm_seeds))

    def combo(self, a: str, b: str) -> str:
        """The arm that composes two single fixes, named in the order of `arms`."""
        order = self.singles
        return "+".join(sorted((a, b), key=order.index))

    @property
    def choices(self) -> list[str]:
        """Every arm a run of this comparison can have: Optuna fixes them when the study is made."""
        pairs = [self.combo(a, b) for a, b in itertools.combinations(self.singles, 2)]
        return list(dict.fromkeys([self.baseline, *self.singles, *self.extras, *pairs]))


def experiments() -> list[str]:
    """The experiment overlays of the shipped conf/ and of the user's config directories."""
    return group_options("experiment")


def arm_parts(arm: str) -> list[str]:
    """'rm_ensemble+kl_control' -> ['rm_ensemble', 'kl_control'] (checked against conf/experiment/)."""
    parts = [p.strip() for p in arm.split("+") if p.strip()]
    known = experiments()
    for p in parts:
        if p not in known:
            raise FixesError(f"unknown arm {p!r}; arms are experiment overlays in conf/experiment/: {', '.join(known)} "
                             f"(combine two with a+b; looked in {', '.join(str(d / 'experiment') for d in config_dirs())})")
    if not parts:
        raise FixesError("an empty arm name; give --arms a,b,c with names from conf/experiment/")
    return parts


def arm_overrides(arm: str) -> list[str]:
    """The overrides an arm's runs compose: `experiment=a`, or `experiment=[a,b]` for `a+b` (study.spec.config_override)."""
    return [config_override("experiment", "+".join(arm_parts(arm)))]


KEYS = {"description", "arms", "seeds", "max_seeds", "confirm_seeds", "first_seed", "seeds_per_round", "budget_minutes",
        "baseline", "combinations", "workers", "confidence", "alpha"}


def _int(v, key: str, low: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise FixesError(f"{key}={v!r} is invalid: {key} accepts an integer >= {low} ({what})")
    return v


def load_spec(path: str | Path = STUDY_FILE, arms: list[str] | None = None, seeds: int | None = None, max_seeds: int | None = None,
              first_seed: int | None = None, budget: float | None = None, confirm_seeds: int | None = None) -> FixesSpec:
    """The study file with the command line's values on top; every bad value is one line naming its key."""
    try:  # not UTF-8, not YAML, a key given twice: one line
        raw = read_yaml(path) or {}
    except YamlFileError as e:
        raise FixesError(str(e)) from None
    for k in raw:
        if k not in KEYS:
            raise FixesError(f"unknown key {k!r} in {path}; keys: {', '.join(sorted(KEYS))}")
    pick = lambda flag, key, default: flag if flag is not None else raw.get(key, default)  # noqa: E731
    spec = FixesSpec(arms=list(arms or raw.get("arms", [])), baseline=raw.get("baseline", "baseline"),
                     combinations=list(raw.get("combinations", [])), workers=int(raw.get("workers", 2)),
                     confidence=float(raw.get("confidence", 0.95)), alpha=float(raw.get("alpha", 0.05)),
                     seeds_per_round=_int(raw.get("seeds_per_round", 2), "seeds_per_round", 1, "seeds added per look"))
    spec.seeds = _int(pick(seeds, "seeds", 6), "--seeds", 2, "the first block of seeds, every arm; 2 is the least that gives an interval")
    spec.max_seeds = _int(pick(max_seeds, "max_seeds", 15), "--max-seeds", 2, "selection seeds per arm at most")
    spec.first_seed = _int(pick(first_seed, "first_seed", 0), "--first-seed", 0, "where the seed pool starts")
    spec.confirm_seeds = _int(pick(confirm_seeds, "confirm_seeds", 5), "--confirm-seeds", 2, "held-out seeds for the confirmation")
    b = pick(budget, "budget_minutes", 40.0)
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
        raise FixesError(f"--budget={b!r} is invalid: --budget accepts minutes > 0 (the first block of seeds always runs)")
    spec.budget_minutes = float(b)
    if spec.max_seeds < spec.seeds:
        raise FixesError(f"--max-seeds={spec.max_seeds} is below --seeds={spec.seeds}: the first block is part of the selection "
                         "seeds; give --max-seeds >= --seeds")
    if spec.baseline not in spec.arms:
        spec.arms.insert(0, spec.baseline)
    if not 0 < spec.alpha < 1 or not 0 < spec.confidence < 1:
        raise FixesError(f"alpha={spec.alpha} / confidence={spec.confidence} in {path}: both accept a number in (0, 1)")
    if len(spec.singles) < 2:
        raise FixesError(f"--arms needs at least two single fixes besides {spec.baseline} to choose a pair from, got {spec.singles}")
    for arm in spec.choices:
        try:
            compose([*arm_overrides(arm), "seed=0"])  # unknown arms and bad overlays fail here, in one line
        except ConfigError as e:
            raise FixesError(f"arm {arm}: {e}") from None
    return spec


def study_spec(spec: FixesSpec, extra: tuple[str, ...], planned: list[tuple[str, int]]) -> StudySpec:
    """The planned study that runs `planned` (arm, seed) pairs; `extra` overrides go to every run."""
    fixed = {}
    for o in extra:
        key, sep, value = o.partition("=")
        if not sep or key.startswith(("+", "~")):
            raise FixesError(f"override {o!r}: give key=value (e.g. ppo.iterations=50)")
        if key == "progress":  # the sweep's runs never draw bars of their own
            continue
        if key in RESERVED_KEYS or key == "experiment":
            raise FixesError(f"override {o!r}: {key} is set by compare-fixes per run (arms: --arms; seeds: --first-seed/--seeds; "
                             "threads: --workers)")
        fixed[key] = yaml.safe_load(value) if value else ""
    return StudySpec(name=STUDY_NAME, path=str(STUDY_FILE), description="compare-fixes: arm x seed runs, raced",
                     objectives=[Objective(DECIDE_ON, "maximize")], space=[Param("experiment", "categorical", choices=spec.choices)],
                     fixed=fixed, seeds=[spec.first_seed], n_trials=max(1, len(planned)), sampler="random",
                     trials=[PlannedTrial({"experiment": a}, [s], name=f"{a} seed {s}") for a, s in planned])
