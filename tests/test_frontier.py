"""The hypervolume (rlhf_sweep/maths/hypervolume.py): hand-computed areas, a brute-force count on a fine grid,
the history as trials complete, the default reference point, and the `hypervolume` column of trials.csv."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from rlhf_sweep.maths import hypervolume
from rlhf_sweep.study import sweep
from rlhf_sweep.study.spec import Constraint, Objective, Param, StudySpec

GOLD_KL = ["maximize", "minimize"]  # (gold/policy up, kl/exact down)


def brute_force(points, reference, directions, step: float = 0.01) -> float:
    """The dominated area by counting the centres of a fine grid of cells: another way to the same number."""
    pts, ref = np.asarray(points, dtype=float), np.asarray(reference, dtype=float)
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    pts, ref = pts * sign, ref * sign
    lo = np.minimum(pts.min(0), ref)
    xs = np.arange(lo[0] + step / 2, ref[0], step)
    ys = np.arange(lo[1] + step / 2, ref[1], step)
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    covered = np.zeros_like(X, dtype=bool)
    for x, y in pts:
        covered |= (X >= x) & (Y >= y)
    return float(covered.sum() * step * step)


def test_hand_computed_areas_with_dominated_duplicate_and_outside_points():
    ref = [0.5, 10.0]  # gold at least 0.5, KL at most 10
    # (gold, KL): a at KL 1 with gold 0.7, b at KL 4 with gold 0.9
    a, b = [0.7, 1.0], [0.9, 4.0]
    assert hypervolume.hypervolume([a], ref, GOLD_KL) == pytest.approx((10 - 1) * (0.7 - 0.5))  # 1.8
    # a alone covers KL 1..10 x gold 0.5..0.7; b adds KL 4..10 x gold 0.7..0.9
    assert hypervolume.hypervolume([a, b], ref, GOLD_KL) == pytest.approx(1.8 + 6 * 0.2)  # 3.0
    dominated = [0.6, 2.0]  # lower gold at a higher KL than a
    duplicate = list(a)
    below_reference_gold = [0.4, 0.5]  # KL better than all, gold worse than the reference's
    beyond_kl_cap = [1.5, 12.0]  # gold better than all, KL beyond the cap
    on_the_corner = [0.5, 10.0]
    nan = [math.nan, 1.0]
    points = [b, dominated, a, duplicate, below_reference_gold, beyond_kl_cap, on_the_corner, nan]
    assert hypervolume.hypervolume(points, ref, GOLD_KL) == pytest.approx(3.0)
    assert hypervolume.hypervolume([below_reference_gold, beyond_kl_cap], ref, GOLD_KL) == 0.0
    assert hypervolume.hypervolume([], ref, GOLD_KL) == 0.0
    # a tie in KL with more gold replaces the lower point; a tie in gold at lower KL replaces the other
    assert hypervolume.hypervolume([[0.7, 1.0], [0.8, 1.0]], ref, GOLD_KL) == pytest.approx(9 * 0.3)
    assert hypervolume.hypervolume([[0.7, 3.0], [0.7, 1.0]], ref, GOLD_KL) == pytest.approx(9 * 0.2)
    # both maximized, both minimized, one objective
    assert hypervolume.hypervolume([[2.0, 3.0], [3.0, 1.0]], [0.0, 0.0], ["maximize", "maximize"]) == pytest.approx(2 * 3 + 1 * 1)
    assert hypervolume.hypervolume([[1.0, 2.0], [2.0, 1.0]], [3.0, 3.0], ["minimize", "minimize"]) == pytest.approx(3.0)
    assert hypervolume.hypervolume([[0.9], [0.7], [0.3]], [0.5], ["maximize"]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="one or two objectives"):
        hypervolume.hypervolume([[1, 2, 3]], [0, 0, 0], ["minimize"] * 3)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_a_brute_force_count(seed):
    rng = np.random.default_rng(seed)
    # a cloud around a concave front, some points beyond the reference, a few exact repeats
    kl = rng.uniform(0, 12, 25)
    gold = 0.5 + 0.5 * np.sqrt(kl) / np.sqrt(12) + rng.normal(0, 0.15, 25)
    pts = np.column_stack([gold, kl])
    pts = np.vstack([pts, pts[:3]])
    ref = [0.6, 10.0]
    exact = hypervolume.hypervolume(pts, ref, GOLD_KL)
    assert exact > 0
    assert exact == pytest.approx(brute_force(pts, ref, GOLD_KL, step=0.002), rel=0.01, abs=0.01)


def test_history_and_the_trials_to_a_share():
    ref = [0.5, 10.0]
    pts = [[0.4, 1.0], [0.7, 1.0], [0.6, 2.0], [0.9, 4.0], [0.7, 1.0]]
    hist = hypervolume.hypervolume_history(pts, ref, GOLD_KL)
    assert hist == pytest.approx([0.0, 1.8, 1.8, 3.0, 3.0])
    assert all(np.diff(hist) >= 0)
    assert hypervolume.trials_to_share(hist, 3.0, 0.5) == 2  # 1.8 >= 1.5
    assert hypervolume.trials_to_share(hist, 3.0, 0.9) == 4
    assert hypervolume.trials_to_share(hist, 4.0, 0.9) is None
    assert hypervolume.trials_to_share(hist, 0.0) is None


def test_default_reference_point():
    metrics = [{"gold/policy": 0.9, "gold/ref": 0.76, "kl/exact": 1.0, "len/policy": 5.0, "len/ref": 4.0},
               {"gold/policy": 0.3, "gold/ref": 0.80, "kl/exact": 14.0, "len/policy": 7.0, "len/ref": 4.2}]
    ref, why = hypervolume.default_reference([("gold/policy", "maximize"), ("kl/exact", "minimize")], metrics)
    assert ref == pytest.approx([0.78, hypervolume.DEFAULT_KL_CAP]) and "gold/ref" in why[0] and "cap" in why[1]
    ref, why = hypervolume.default_reference([("gold/policy", "maximize"), ("kl/exact", "minimize")], metrics, kl_caps=[20.0, 12.0])
    assert ref[1] == 12.0 and "constraint" in why[1]
    ref, _ = hypervolume.default_reference([("gold/policy", "maximize"), ("len/policy", "minimize")], metrics)
    assert ref == pytest.approx([0.78, 4.1])
    ref, why = hypervolume.default_reference([("rm/acc_gold", "maximize")], [{"rm/acc_gold": 0.6}, {"rm/acc_gold": 0.7}])
    assert ref == [0.6] and "worst" in why[0]


def spec_for(reference_point=None, constraints=()) -> StudySpec:
    return StudySpec(name="t", path="t.yaml", description="", objectives=[Objective("gold/policy", "maximize"), Objective("kl/exact", "minimize")],
                     space=[Param("ppo.beta", "float", 0.01, 1.0, log=True)], fixed={}, seeds=[0], n_trials=4,
                     constraints=list(constraints), reference_point=reference_point or {})


def trial(number: int, gold: float, kl: float, minute: int, feasible: bool = True):
    import datetime

    t0 = datetime.datetime(2025, 1, 1, 12, 0)
    t = create_trial(values=[gold, kl], params={"ppo.beta": 0.1}, distributions={"ppo.beta": FloatDistribution(0.01, 1.0, log=True)},
                     user_attrs={"metrics": {"gold/policy": gold, "kl/exact": kl, "gold/ref": 0.5}}, state=TrialState.COMPLETE,
                     system_attrs={"constraints": [0.0 if feasible else 1.0]})
    t.number = number
    t.datetime_start = t0
    t.datetime_complete = t0 + datetime.timedelta(minutes=minute)
    return t


def test_trials_csv_hypervolume_column_follows_completion_order():
    # trial 1 finished first; trial 2 is infeasible (a constraint), so it adds nothing; trial 3 failed
    trials = [trial(0, 0.9, 4.0, minute=3), trial(1, 0.7, 1.0, minute=1), trial(2, 2.0, 0.1, minute=2, feasible=False)]
    failed = create_trial(state=TrialState.FAIL, values=None, params={}, distributions={})
    failed.number = 3
    spec = spec_for({"gold/policy": 0.5, "kl/exact": 10.0}, constraints=[Constraint("kl/exact", "<=", 20.0)])
    header, rows = sweep.trial_rows(spec, [*trials, failed])
    col = header.index("hypervolume")
    assert {r[0]: r[col] for r in rows} == pytest.approx({1: 1.8, 2: 1.8, 0: 3.0, 3: None})
    # pareto.csv lists only the front, but its values are the study's history
    _, front = sweep.trial_rows(spec, trials[:1], [*trials, failed])
    assert front[0][col] == pytest.approx(3.0)
    # no reference point in the file: the reference model's gold (0.5 here) and the KL constraint's bound
    hv = hypervolume.study_hypervolume(spec_for(constraints=[Constraint("kl/exact", "<=", 20.0)]), trials)
    assert hv.reference == [0.5, 20.0] and hv.final == pytest.approx(19 * 0.2 + 16 * 0.2)


def test_study_file_reference_point_is_checked(tmp_path):
    import yaml

    from rlhf_sweep.study.spec import StudyError, load_spec

    from .test_sweep import SMOKE

    raw = yaml.safe_load(SMOKE.read_text())
    for bad, message in (({"gold/policy": 0.5}, "expected a number for each objective"),
                         ({"gold/policy": 0.5, "kl/exact": "x"}, "expected a number"),
                         ([0.5, 10], "expected a number for each objective")):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({**raw, "reference_point": bad}))
        with pytest.raises(StudyError, match=message):
            load_spec(str(path), check_config=False)
    path.write_text(yaml.safe_dump({**raw, "reference_point": {"gold/policy": 0.5, "kl/exact": "1e1"}}))
    assert load_spec(str(path), check_config=False).reference_point == {"gold/policy": 0.5, "kl/exact": 10.0}


def test_gp_sampler_handles_two_objectives_constraints_and_its_options():
    """sampler: gp builds Optuna's GPSampler with the study's options, and it proposes from its model
    (not at random) after the start-up trials on a two-objective study with a constraint."""
    from rlhf_sweep.study.spec import make_sampler

    spec = spec_for()
    spec.sampler, spec.sampler_options = "gp", {"n_startup_trials": 4, "warn_independent_sampling": False}
    assert isinstance(make_sampler(spec, seed=3), optuna.samplers.GPSampler)

    def proposals(sampler) -> list[float]:
        study = optuna.create_study(directions=GOLD_KL, sampler=sampler)
        for _ in range(7):
            t = study.ask()
            x = t.suggest_float("x", 0.0, 1.0)
            t.set_constraint("c", x - 0.8)  # feasible below 0.8
            study.tell(t, [x, (x - 0.3) ** 2])
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 7
        return [t.params["x"] for t in study.trials]

    gp, random = proposals(make_sampler(spec, seed=3)), proposals(optuna.samplers.RandomSampler(seed=3))
    # its start-up trials are its random sampler's (same seed); from then on the model proposes
    assert gp[:4] == random[:4] and all(g != r for g, r in zip(gp[4:], random[4:], strict=True))
