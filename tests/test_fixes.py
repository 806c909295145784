"""compare-fixes: the paired bootstrap interval and the ensemble aggregation by hand values,
ensemble_size=1 is the single RM, and the whole comparison end to end on tiny arms."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_sweep.config.compose import compose
from rlhf_sweep.fixes import compare, output, racing
from rlhf_sweep.fixes import spec as fixes_spec
from rlhf_sweep.fixes.runner import Runner, confirm, trials_before
from rlhf_sweep.models.reward import aggregate, score
from rlhf_sweep.run import pipeline
from rlhf_sweep.simulation.world import World

from .conftest import TINY


# ----- pure statistics -----------------------------------------------------------------------------
def test_paired_interval_is_the_student_t_interval_by_hand():
    from scipy.stats import t

    d = np.array([1.0, 2.0, 3.0, 6.0])  # mean 3, sample sd sqrt(14/3)
    half = t.ppf(0.975, 3) * (14 / 3) ** 0.5 / 2
    m, lo, hi = racing.paired_interval(d + 5.0, np.full(4, 5.0))  # paired: the shared 5 cancels
    assert (m, lo, hi) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    assert racing.paired_interval([3, 4, 5], [1, 2, 3]) == (2.0, 2.0, 2.0)  # a constant difference has no spread
    m, lo, hi = racing.paired_interval([1.0], [0.0])
    assert m == 1.0 and np.isnan(lo) and np.isnan(hi)  # one seed: no interval


def test_paired_interval_is_paired_by_seed():
    # a large seed effect shared by both arms cancels in the pairs: the interval excludes zero
    base = np.array([0.0, 10.0, -5.0, 3.0, 7.0])
    m, lo, hi = racing.paired_interval(base + 1.0 + np.array([0.1, -0.1, 0.2, 0.0, -0.2]), base)
    assert m == pytest.approx(1.0) and 0.7 <= lo < 1.0 < hi <= 1.3 and racing.excludes_zero(lo, hi)
    assert not racing.excludes_zero(-0.1, 0.3)


def bimodal(rng, size, effect, w=0.3, gap=1.0, sd=0.25):
    """Per-seed paired differences with two modes (a share w of seeds jumps by `gap`), mean exactly `effect`."""
    return effect + gap * ((rng.random(size) < w) - w) + sd * rng.standard_normal(size)


def test_intervals_hold_their_coverage_on_bimodal_seeds():
    """Must show 1: 2400 simulated comparisons of 10 seeds with a known effect (0, 0.3, 1.0) and bimodal outcomes,
    70/30 modes one gap apart, as when some seeds only pad and others exploit the RM: the 95% interval
    covers the true effect at least 93% of the time. The percentile bootstrap (what compare-fixes used
    before) covers markedly less on the same data, so this test can tell a bad interval from a good one."""
    from scipy import stats

    rng = np.random.default_rng(13)
    effects, per_effect, n = (0.0, 0.3, 1.0), 800, 10
    hits, pct_hits = 0, 0
    for effect in effects:
        d = bimodal(rng, (per_effect, n), effect)
        for row in d:
            _, lo, hi = racing.paired_interval(row, np.zeros(n))
            hits += lo <= effect <= hi
        boot = stats.bootstrap((d,), np.mean, axis=-1, vectorized=True, n_resamples=999, method="percentile", random_state=1)
        lo, hi = boot.confidence_interval
        pct_hits += int(((lo <= effect) & (effect <= hi)).sum())
    total = len(effects) * per_effect
    assert hits / total >= 0.93, hits / total
    assert pct_hits / total < 0.93, pct_hits / total


def test_holm_iqm_and_probability_of_improvement_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(that, 1 x 0.04): in the given order 0.03, 0.06, 0.06
    assert racing.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(0)
    for m in (1, 2, 6, 10):
        p = rng.random(m) ** 3
        assert racing.holm(p.tolist()) == pytest.approx(multipletests(p, method="holm")[1].tolist())
    assert racing.iqm([8, 1, 7, 2, 6, 3, 5, 4, 100, -100]) == pytest.approx(4.5)  # the middle half of ten: 2 cut from each end
    assert racing.prob_improvement([1, 2, 3, 4], [0, 2, 4, 3]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert racing.paired_p([0.0, 0.0]) == 1.0 and racing.paired_p([1.0, 1.0]) == 0.0
    from scipy.stats import ttest_1samp

    for d in ([0.3, -0.1, 0.5, 0.2], rng.normal(0.2, 1.0, 10)):
        assert racing.paired_p(d) == pytest.approx(ttest_1samp(d, 0.0).pvalue)
        lo, hi = ttest_1samp(d, 0.0).confidence_interval(0.9)
        assert racing.paired_interval(d, np.zeros(len(d)), 0.9)[1:] == pytest.approx((lo, hi))


def test_unknown_arm_is_one_line():
    with pytest.raises(fixes_spec.FixesError) as e:
        fixes_spec.arm_overrides("rm_ensmble")
    assert "rm_ensmble" in str(e.value) and "rm_ensemble" in str(e.value) and "\n" not in str(e.value)


def test_arms_compose_as_hydra_list_and_the_study_file_loads():
    assert fixes_spec.arm_overrides("rm_ensemble+kl_control") == ["experiment=[rm_ensemble,kl_control]"]
    c = compose(fixes_spec.arm_overrides("rm_ensemble+length_penalty"))
    assert c.rm.ensemble_size > 1 and c.ppo.length_bonus < 0
    spec = fixes_spec.load_spec()
    assert spec.arms[0] == "baseline" and spec.singles == ["rm_length_debias", "rm_ensemble", "kl_control", "length_penalty"]
    assert spec.selection_seeds == list(range(spec.max_seeds)) and spec.held_out_seeds[0] == spec.max_seeds  # disjoint
    assert "rm_ensemble+length_penalty" in spec.choices and spec.combo("length_penalty", "rm_ensemble") == "rm_ensemble+length_penalty"
    moved = fixes_spec.load_spec(first_seed=100)
    assert moved.selection_seeds[0] == 100 and not set(moved.selection_seeds + moved.held_out_seeds) & set(spec.selection_seeds + spec.held_out_seeds)
    for arm in spec.singles:
        assert compose([f"experiment={arm}"]) != compose([])


@pytest.mark.parametrize("flags,message", [
    ({"budget": 0}, "--budget=0 is invalid"), ({"seeds": 1}, "--seeds=1 is invalid"), ({"seeds": 6, "max_seeds": 4}, "--max-seeds=4 is below --seeds=6"),
    ({"first_seed": -1}, "--first-seed=-1 is invalid"), ({"arms": ["baseline", "kl_control"]}, "at least two single fixes"),
])
def test_bad_compare_fixes_values_are_one_line(flags, message):
    with pytest.raises(fixes_spec.FixesError) as e:
        fixes_spec.load_spec(**flags)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_budget_exits_2_before_any_run(tmp_path, capsys):
    from rlhf_sweep.app import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["compare-fixes", "--budget", "-5", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--budget=-5.0 is invalid" in err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        cli.main(["compare-fixes", "--out", str(tmp_path / "out"), "seed=3"])
    assert "seed is set by compare-fixes" in capsys.readouterr().err


# ----- the racing decision --------------------------------------------------------------------------
def _gold(means: dict[str, float], n: int, rng, spread=0.1) -> dict[str, dict[int, float]]:
    base = rng.normal(0, 1, n)  # a big seed effect shared by every arm: pairing removes it
    return {a: {s: float(base[s] + m + spread * rng.standard_normal()) for s in range(n)} for a, m in means.items()}


def test_decide_names_the_pair_only_when_it_is_separated():
    rng = np.random.default_rng(0)
    singles = ["a", "b", "c", "d"]
    d = racing.decide(_gold({"base": 0, "a": 1.0, "b": 0.9, "c": 0.2, "d": 0.1}, 12, rng), "base", singles)
    assert d.pair == ("a", "b") and set(d.out) == {"c", "d"} and d.verdict.startswith("recommended: a and b")
    assert "beaten by a and b" in d.out["c"] or "beaten by b and a" in d.out["c"]
    # b and c tie for second place: a is certainly in, the other two are within noise
    d = racing.decide(_gold({"base": 0, "a": 1.0, "b": 0.5, "c": 0.5, "d": 0.0}, 12, rng), "base", singles)
    assert d.pair is None and d.sure == ["a"] and set(d.alive) == {"a", "b", "c"}
    assert d.verdict.startswith("no stable pair: a is in the top two, but ") and d.verdict.endswith("are within noise after 12 seeds")
    # all equal: nothing is separated
    d = racing.decide(_gold({"base": 0, "a": 0.3, "b": 0.3, "c": 0.3, "d": 0.3}, 12, rng, spread=0.5), "base", singles)
    assert d.pair is None and not d.out and "are within noise after 12 seeds" in d.verdict
    # an arm that hurts is out; two clear leaders that do not beat the baseline are not recommended
    d = racing.decide(_gold({"base": 0, "a": 0.0, "b": 0.0, "c": -2.0, "d": -2.0}, 12, rng, spread=0.05), "base", singles)
    assert d.out["c"].startswith("beaten by") and d.pair is None and "not confidently better than base after 12 seeds" in d.verdict


def test_racing_drops_arms_and_stops_when_separated():
    rng = np.random.default_rng(1)
    means = {"base": 0, "a": 1.0, "b": 0.8, "c": 0.3, "d": -0.5}
    truth = _gold(means, 30, rng, spread=0.3)
    asked = []

    def outcome(runs):
        asked.extend(runs)
        return {(a, s): truth[a][s] for a, s in runs}

    sel = racing.select(outcome, "base", ["a", "b", "c", "d"], list(range(30)), first=4, step=2)
    assert sel.stopped == "separated" and sel.decision.pair == ("a", "b") and sel.runs == len(asked) == len(set(asked))
    late = {a for a, s in asked if s >= 4}
    assert "d" not in late or max(s for a, s in asked if a == "d") < max(s for a, s in asked)  # a dropped arm gets no new seeds
    n = sel.decision.n_seeds
    assert sel.runs < 5 * n  # fewer than every arm on every seed the race reached
    # a budget that refuses the next block stops it there
    sel = racing.select(outcome, "base", ["a", "b", "c", "d"], list(range(30)), first=2, step=2, afford=lambda k: False)
    assert sel.stopped == "budget" and sel.runs == 10



@pytest.mark.parametrize("exploit, truth, at_least", [
    # a true pair (+0.3 each, the other two no better than the baseline): named
    ({"base": 0.5, "a": 0.0, "b": 0.0, "c": 0.5, "d": 0.5}, "a+b", 0.88),
    # every arm equal: "no stable pair"
    ({"base": 0.4, "a": 0.4, "b": 0.4, "c": 0.4, "d": 0.4}, "none", 0.9),
    # a clear best, then two tied for second: no pair is best, so none may be named despite the repeated looks
    ({"base": 0.5, "a": 0.0, "b": 0.25, "c": 0.25, "d": 0.5}, "none", 0.9),
])
def test_racing_names_a_true_pair_and_no_pair_where_none_is_best(exploit, truth, at_least):
    """Must show 6 on bimodal synthetic arms (gold 0.8 padding / 0.2 exploiting, noise 0.2, a shared seed
    effect): 400 comparisons, up to 40 seeds per arm and 220 runs, the study file's first block and step."""
    arms = racing.SyntheticArms(exploit=exploit, high=0.8, low=0.2, noise=0.2, seed_sd=0.07)
    r = racing.simulate(arms, "base", ["a", "b", "c", "d"], n_seeds=40, first=6, step=2, alpha=0.05, budget_runs=5 * 40 + 20,
                       confirm_runs=20, n_sim=400, seed=4)
    assert r["named"].get(truth, 0) / r["n_sim"] >= at_least, r["named"]

def test_aggregate_hand_values():
    s = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]])  # 3 members x 2 responses
    # column 0: mean 2, population std sqrt(2/3); column 1: mean 1, std sqrt((1 + 1 + 4) / 3) = sqrt(2)
    assert aggregate(s, "mean_std", 1.0).tolist() == pytest.approx([2 - (2 / 3) ** 0.5, 1 - 2**0.5])
    assert aggregate(s, "mean_std", 0.5).tolist() == pytest.approx([2 - 0.5 * (2 / 3) ** 0.5, 1 - 0.5 * 2**0.5])
    assert aggregate(s, "min", 1.0).tolist() == [1.0, 0.0]
    assert aggregate(s, "mean", 1.0).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="rm.ensemble_agg"):
        aggregate(s, "max", 1.0)


# ----- ensembles in the pipeline -------------------------------------------------------------------
def _setup(cache, *extra):
    cfg = compose([*TINY, "mlflow.enabled=false", f"cache_dir={cache}", *extra])
    device = pipeline.pick_device(cfg.device)
    world = World(cfg.world)
    ref, _ = pipeline.get_reference(cfg, world, device, lambda *_: None)
    return cfg, world, ref, device


def test_ensemble_size_1_is_the_single_rm(tmp_path):
    """K = 1 ignores the aggregation knobs and shares the single RM's cache file and metrics."""
    a = pipeline.run(compose([*TINY, "mlflow.enabled=false", f"cache_dir={tmp_path}"]), say=lambda *_: None)
    b = pipeline.run(compose([*TINY, "mlflow.enabled=false", f"cache_dir={tmp_path}", "rm.ensemble_agg=min",
                              "rm.ensemble_lambda=3"]), say=lambda *_: None)
    assert b["cache"]["rm"]["cached"] and b["cache"]["rm"]["path"] == a["cache"]["rm"]["path"]
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"]


def test_ensemble_members_and_std_units(tmp_path):
    cfg1, world, ref, device = _setup(tmp_path)
    single, _ = pipeline.get_reward_model(cfg1, world, ref, device, lambda *_: None)
    cfg3, *_ = _setup(tmp_path, "rm.ensemble_size=3", "rm.ensemble_agg=mean_std", "rm.ensemble_lambda=1.0")
    ens, info = pipeline.get_reward_model(cfg3, world, ref, device, lambda *_: None)
    # member 0 of any ensemble is the single RM's cache entry (trained once, shared)
    assert pipeline.rm_key(cfg3, device, 0) == pipeline.rm_key(cfg1, device)
    assert pipeline.rm_key(cfg3, device, 1) != pipeline.rm_key(cfg1, device)
    pairs, _ = pipeline.labeled_pairs(cfg3, world, ref, device)
    p, y = torch.cat([pairs.prompts, pairs.prompts]), torch.cat([pairs.first, pairs.second])
    # member 0 is the single RM; members 1.. differ (another seed and a bootstrap resample)
    m0, m1 = score(ens.members[0], p, y, device), score(ens.members[1], p, y, device)
    assert torch.equal(m0, score(single, p, y, device)) and not torch.allclose(m0, m1)
    # the aggregated score is standardised again on reference samples
    s = score(ens, p, y, device)
    assert abs(s.mean().item()) < 1e-4 and s.std().item() == pytest.approx(1.0, abs=1e-4)
    members = torch.stack([score(m, p, y, device) for m in ens.members])
    assert torch.allclose(s, (aggregate(members, "mean_std", 1.0) - ens.shift) / ens.scale, atol=1e-5)
    # every member has its own cache file, and the calibration its own
    keys = {pipeline.rm_key(cfg3, device, m) for m in range(3)}
    assert len(keys) == 3 and all((tmp_path / f"{k}.pt").exists() for k in keys)
    assert (tmp_path / f"{pipeline.ensemble_key(cfg3, device)}.pt").exists()


# ----- compare-fixes end to end --------------------------------------------------------------------
@pytest.mark.e2e
def test_compare_fixes_end_to_end(tmp_path):
    """Tiny arms through the sweep: the outputs, MLflow, resume, an edited config, and the confirmation stage."""
    import optuna

    from rlhf_sweep.study.storage import open_storage

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "fixes"
    arms = ["baseline", "kl_control", "length_penalty"]
    extra = (*TINY, f"cache_dir={tmp_path}/cache")
    kw = dict(arms=arms, seeds=2, max_seeds=3, confirm_seeds=2, budget=60, out=str(out), extra=extra, workers=2, progress=False)
    res = compare.compare_fixes(tracking_uri=uri, **kw)
    for f in ("fixes.md", "fixes.json", "fixes.png"):
        assert (out / f).exists()
    saved = json.loads((out / "fixes.json").read_text())
    md = (out / "fixes.md").read_text()
    study = optuna.load_study(study_name="compare_fixes", storage=open_storage(str(out / "optuna.journal")))
    trials = {(t.params["experiment"], t.user_attrs["seeds"][0]): t for t in study.get_trials() if t.state.name == "COMPLETE"}
    summaries = {(a, s): json.loads((Path(t.user_attrs["run_dir"]) / f"seed-{s}" / "summary.json").read_text()) for (a, s), t in trials.items()}
    seeds = saved["arms"]["baseline"]["seeds"]
    assert seeds[:2] == [0, 1] and set(seeds) <= {0, 1, 2} and saved["held_out_seeds"] == [3, 4]
    assert saved["racing"]["runs"] == len(trials) == res.result["runs_this_invocation"]
    arm = "length_penalty"
    assert summaries[(arm, 0)]["config"]["ppo"]["length_bonus"] < 0 and summaries[("kl_control", 0)]["config"]["ppo"]["adaptive_kl"]
    for key, _label, _sign in fixes_spec.METRICS:
        diffs = [summaries[(arm, s)]["metrics"][key] - summaries[("baseline", s)]["metrics"][key] for s in seeds]
        d = saved["arms"][arm]["diff"][key]
        m, lo, hi = racing.paired_interval(np.array(diffs), np.zeros(len(diffs)))
        assert (d["mean"], d["lo"], d["hi"]) == pytest.approx((m, lo, hi))
        assert d["iqm"] == pytest.approx(racing.iqm(diffs)) and d["p_improve"] == pytest.approx(np.mean(np.array(diffs) > 0) + 0.5 * np.mean(np.array(diffs) == 0))
        assert output.ci_text(d) in md and output.ci_text(d) in res.table
    assert saved["verdict"] in res.table and saved["verdict"] in md and racing.INTERVAL in md
    # MLflow: the study's parent run carries the comparison; one nested run per arm x seed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.data.tags["rlhf_sweep.kind"] == "compare-fixes" and parent.data.tags["verdict"] == saved["verdict"]
    assert "length_penalty/d_gold/policy" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert sorted(r.data.tags["plan"] for r in children) == sorted(f"{a} seed {s}" for a, s in trials)
    # resumable: the same command runs nothing again and says the same
    again = compare.compare_fixes(**{**kw, "extra": (*extra, "mlflow.enabled=false")})
    assert again.result["runs_this_invocation"] == 0 and again.result["verdict"] == saved["verdict"]
    assert len(optuna.load_study(study_name="compare_fixes", storage=open_storage(str(out / "optuna.journal"))).trials) == len(study.trials)
    # another config (as an edited overlay makes) runs again: here for every arm, with a changed PPO knob
    changed = compare.compare_fixes(**{**kw, "extra": (*extra, "mlflow.enabled=false", "ppo.iterations=2"), "max_seeds": 2})
    assert changed.result["runs_this_invocation"] == 6
    # the confirmation stage, for a pair given here: the pair, its combination and the baseline on the held-out seeds
    spec = fixes_spec.load_spec(arms=arms, seeds=2, max_seeds=3, confirm_seeds=2)
    runner = Runner(spec, out, (*extra, "mlflow.enabled=false"), None, False, trials_before(out))
    sel = racing.select(runner, "baseline", spec.singles, spec.selection_seeds, 2, 1)  # replays the first comparison from the study
    assert runner.ran_now == 0 and sel.decision.verdict == saved["verdict"]
    confirmed = confirm(runner, spec, ("length_penalty", "kl_control"))
    assert confirmed == ["length_penalty", "kl_control", "kl_control+length_penalty"] and runner.ran_now == 8
    combo = runner.summaries["kl_control+length_penalty"][3]["config"]["ppo"]
    assert combo["adaptive_kl"] and combo["length_bonus"] < 0
    result = compare.compare(spec, runner.summaries, sel, confirmed)
    assert result["confirmation"]["seeds"] == [3, 4] and set(result["confirmation"]["arms"]) == {"baseline", *confirmed}
    held = result["confirmation"]["arms"]["kl_control+length_penalty"]["diff"]["gold/policy"]
    d = [runner.summaries["kl_control+length_penalty"][s]["metrics"]["gold/policy"] - runner.summaries["baseline"][s]["metrics"]["gold/policy"]
         for s in (3, 4)]
    assert held["mean"] == pytest.approx(np.mean(d)) and held["n"] == 2
    assert "confirmation on held-out seeds 3-4" in output.terminal_table(spec, result)
