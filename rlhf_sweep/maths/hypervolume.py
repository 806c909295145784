"""The hypervolume of a study's front: how much of the objective plane its trials dominate.

This module owns the hypervolume indicator for one or two objectives (any mix of maximize and
minimize), its history as trials complete, and a study's reference point: the corner every
trial must beat on all objectives to count. In two dimensions the hypervolume is the area of
the union of the rectangles spanned by each point and the reference point, computed by one
sorted sweep; in one it is the distance from the reference value to the best value.

Reference point: a study file may give one (`reference_point: {gold/policy: 0.0, kl/exact: 30}`);
otherwise each objective gets the default rule of `default_reference`:
- a maximized `X/policy` metric: the reference model's own value `X/ref` (the mean over the
  trials, which all evaluate the same reference): a policy must beat the model it started from;
- a minimized `X/policy` metric: the same, the reference's value as the worst acceptable;
- `kl/exact` (minimized): the tightest `kl/exact <= c` constraint of the study, else
  DEFAULT_KL_CAP sequence nats;
- any other objective: the worst value among the trials (so every trial counts, and the point
  moves with the trials; the report says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# sequence nats per response; in the default world gold has fallen back below the reference's well before it
DEFAULT_KL_CAP = 10.0


def _as_minimization(points, reference: Sequence[float], directions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    pts = np.asarray(points, dtype=float).reshape(-1, len(directions)) * sign
    return pts, np.asarray(reference, dtype=float) * sign


def hypervolume(points, reference: Sequence[float], directions: Sequence[str]) -> float:
    """The hypervolume that `points` (rows of objective values) dominate up to `reference`.

    directions: maximize | minimize per objective (one or two). Points that do not strictly beat
    the reference on every objective, and non-finite points, add nothing; dominated and repeated
    points add nothing beyond what their dominators do.
    """
    if len(directions) not in (1, 2) or len(reference) != len(directions):
        raise ValueError(f"hypervolume: one or two objectives with a reference value each, got {len(directions)} "
                         f"directions and {len(reference)} reference values")
    pts, ref = _as_minimization(points, reference, directions)
    pts = pts[np.isfinite(pts).all(axis=1) & (pts < ref).all(axis=1)]
    if not len(pts):
        return 0.0
    if len(directions) == 1:
        return float(ref[0] - pts[:, 0].min())
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]  # by the first objective, ties by the second
    area, ceiling = 0.0, ref[1]
    for x, y in pts:
        if y < ceiling:  # not dominated by a point already swept (those all have x' <= x)
            area += (ref[0] - x) * (ceiling - y)
            ceiling = y
    return float(area)


def hypervolume_history(points, reference: Sequence[float], directions: Sequence[str]) -> np.ndarray:
    """The hypervolume after each point, in the order given (entry k: the first k + 1 points)."""
    pts = np.asarray(points, dtype=float).reshape(-1, len(directions))
    return np.array([hypervolume(pts[: k + 1], reference, directions) for k in range(len(pts))])


def trials_to_share(history: Sequence[float], total: float, share: float = 0.9) -> int | None:
    """How many points the history took to reach `share` of `total` (1-based), or None if it never did."""
    if not total > 0:
        return None
    hit = np.flatnonzero(np.asarray(history, dtype=float) >= share * total)
    return int(hit[0]) + 1 if len(hit) else None


def default_reference(objectives: Sequence[tuple[str, str]], metrics: Sequence[dict], kl_caps: Sequence[float] = ()) -> tuple[list[float], list[str]]:
    """The default reference point of a study (see the module docstring) and a phrase per objective saying where it came from.

    objectives: (metric, direction) pairs; metrics: the seed-averaged metrics of the complete trials;
    kl_caps: the bounds of the study's `kl/exact <= c` constraints.
    """
    values, why = [], []
    for metric, direction in objectives:
        column = [float(m[metric]) for m in metrics if m.get(metric) is not None and math.isfinite(float(m[metric]))]
        if metric == "kl/exact" and direction == "minimize":
            if kl_caps:
                values.append(float(min(kl_caps)))
                why.append(f"{metric}: the study's constraint kl/exact <= {min(kl_caps):g}")
            else:
                values.append(DEFAULT_KL_CAP)
                why.append(f"{metric}: the default cap of {DEFAULT_KL_CAP:g} nats")
            continue
        ref_key = metric[: -len("/policy")] + "/ref" if metric.endswith("/policy") else None
        ref_vals = [float(m[ref_key]) for m in metrics if ref_key and m.get(ref_key) is not None and math.isfinite(float(m[ref_key]))]
        if ref_vals:
            values.append(float(np.mean(ref_vals)))
            why.append(f"{metric}: the reference model's {ref_key} ({np.mean(ref_vals):.4g}, mean over the trials)")
        elif column:
            worst = min(column) if direction == "maximize" else max(column)
            values.append(float(worst))
            why.append(f"{metric}: the worst trial's value ({worst:.4g}; moves with the trials)")
        else:
            values.append(math.nan)
            why.append(f"{metric}: no trial has a value")
    return values, why


@dataclass
class StudyHypervolume:
    """A study's hypervolume after each complete trial, in the order the trials completed.

    reference: the reference point (one value per objective); sources: where each value came from;
    numbers: trial numbers in completion order; values: the hypervolume once that trial was in
    (infeasible trials add nothing to the front but keep their place in the order).
    """

    reference: list[float]
    sources: list[str]
    numbers: list[int]
    values: list[float]

    @property
    def final(self) -> float:
        return self.values[-1] if self.values else 0.0

    def by_trial(self) -> dict[int, float]:
        return dict(zip(self.numbers, self.values, strict=True))


def study_reference(spec, metrics: Sequence[dict]) -> tuple[list[float], list[str]]:
    """The study file's `reference_point`, else the default rule, for spec.objectives."""
    objectives = [(o.metric, o.direction) for o in spec.objectives]
    given = getattr(spec, "reference_point", None) or {}
    if given:
        return [float(given[m]) for m, _ in objectives], [f"{m}: the study file's reference_point" for m, _ in objectives]
    caps = [c.bound for c in spec.constraints if c.metric == "kl/exact" and c.op == "<="]
    return default_reference(objectives, metrics, caps)


def study_hypervolume(spec, trials) -> StudyHypervolume | None:
    """The hypervolume history of a study's complete trials (Optuna FrozenTrials), or None when the
    study has more than two objectives or no complete trial."""
    from optuna.trial import TrialState

    if len(spec.objectives) > 2:
        return None
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.values),
                  key=lambda t: (t.datetime_complete is None, t.datetime_complete or 0, t.number))
    if not done:
        return None
    reference, sources = study_reference(spec, [t.user_attrs.get("metrics") or {} for t in done])
    # an infeasible trial stays off the front: its values count as missing
    points = [t.values if all(v <= 0 for v in (t.constraints or {}).values()) else [math.nan] * len(t.values) for t in done]
    values = hypervolume_history(points, reference, spec.directions) if all(map(math.isfinite, reference)) else np.zeros(len(done))
    return StudyHypervolume(reference=reference, sources=sources, numbers=[t.number for t in done], values=[float(v) for v in values])
