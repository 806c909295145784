"""What makes a study one experiment, recorded in the study when it is created, and the guard that refuses
to resume it with another.

A study's definition is what a trial's numbers mean: the searched keys and their domains (type, range,
log scale, step, categorical choices), the fixed overrides, the seeds every trial runs, the objectives and
the constraints. Left out, because they change how many or which points are tried but not what a trial
measures: n_trials, the sampler, its seed and options, a grid's values, the report's reference point and
the description; and fixed overrides of keys that cannot change a result (planning.RUN_ONLY_KEYS:
mlflow, cache_dir, ...). A planned study is defined by its space, objectives and constraints only: each
planned trial carries its own seeds and is identified by the whole config it composes to, fixed overrides
included (study.planning.plan_key), so a trial of another config is another trial and its results are
read back by that key; compare-fixes relies on it, adding (arm, seed) runs of new overrides to its study
across invocations.

The sweep stores the definition and its fingerprint in the study's user attributes (`definition`,
`definition_fingerprint`); resuming with another definition raises `DefinitionChanged`, one line naming
each change (`fixed ppo.iterations: 3 -> 5`) and how to start a new study. `new_study_name` is the name
`sweep --new-study` gives the study of an edited file: the same file always gets the same name.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rlhf_sweep.study.planning import RUN_ONLY_KEYS
from rlhf_sweep.study.spec import Param, StudyError, StudySpec

DEFINITION_ATTR = "definition"
FINGERPRINT_ATTR = "definition_fingerprint"


class DefinitionChanged(StudyError):
    """A stored study was made with another definition; `changes` lists them, one short phrase each."""

    def __init__(self, msg: str, changes: list[str]):
        super().__init__(msg)
        self.changes = changes


def _domain(p: Param) -> dict[str, Any]:
    if p.kind == "categorical":
        return {"type": "categorical", "choices": list(p.choices)}
    return {"type": p.kind, "low": p.low, "high": p.high, "log": p.log, "step": p.step}


def definition(spec: StudySpec) -> dict[str, Any]:
    """The study's definition (see the module docstring), as JSON holds it (what the storage gives back)."""
    d: dict[str, Any] = {
        "objectives": [f"{o.metric} {o.direction}" for o in spec.objectives],
        "constraints": [f"{c.metric} {c.op} {c.bound!r}" for c in spec.constraints],
        "space": {p.name: _domain(p) for p in spec.space},
    }
    if not spec.trials:  # a planned trial's key holds its seeds and its fixed overrides (module docstring)
        d["fixed"] = {k: v for k, v in spec.fixed.items() if str(k).split(".")[0] not in RUN_ONLY_KEYS}
        d["seeds"] = list(spec.seeds)
    return json.loads(json.dumps(d, default=str))


def fingerprint(defn: dict[str, Any]) -> str:
    """A stable hash of a definition: key order and YAML layout do not change it."""
    return hashlib.sha256(json.dumps(defn, sort_keys=True, default=str).encode()).hexdigest()[:16]


def new_study_name(name: str, spec: StudySpec) -> str:
    """`--new-study`: NAME-<the first 8 characters of the definition's fingerprint>."""
    return f"{name}-{fingerprint(definition(spec))[:8]}"


def _text(v: Any) -> str:
    if v is None:
        return "(not set)"
    return v if isinstance(v, str) else json.dumps(v)


def _domain_text(d: dict | None) -> str:
    if not d:
        return "(not searched)"
    if d.get("type") == "categorical":
        return f"choices {_text(d.get('choices'))}"
    return (f"{d.get('type')} [{_text(d.get('low'))}, {_text(d.get('high'))}]" + (" log" if d.get("log") else "")
            + (f" step {_text(d['step'])}" if d.get("step") is not None else ""))


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two definitions, each as `section key: old -> new`."""
    out = []
    for section in ("objectives", "constraints", "seeds"):
        if old.get(section) != new.get(section):
            out.append(f"{section}: {_text(old.get(section))} -> {_text(new.get(section))}")
    for section, text in (("space", _domain_text), ("fixed", _text)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in dict.fromkeys([*b, *a]):  # the file's order (a storage may give keys back sorted)
            if a.get(key) != b.get(key):
                out.append(f"{section} {key}: {text(a.get(key))} -> {text(b.get(key))}")
    return out


def guard(study, spec: StudySpec, where: str, way_out: str) -> None:
    """Record the definition in a study that has none; refuse (DefinitionChanged) one recorded with another.

    where: the study as the message names it (`study 'smoke' in PATH`); way_out: how to start a new study.
    """
    new = definition(spec)
    fp = fingerprint(new)
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        # a new study, or one made before definitions were recorded: nothing to compare with, so it is
        # accepted as it stands and this definition is recorded; from now on an edit is refused
        study.set_user_attr(DEFINITION_ATTR, new)
        study.set_user_attr(FINGERPRINT_ATTR, fp)
        return
    if stored == fp:
        return
    diff = changes(study.user_attrs.get(DEFINITION_ATTR) or {}, new) or ["its definition"]
    raise DefinitionChanged(f"{where} was made with another definition ({'; '.join(diff)}); its trials and these would share "
                            f"one front and one report: {way_out}", diff)
