"""compare-fixes: the paired bootstrap interval and the ensemble aggregation by hand values,
ensemble_size=1 is the single RM, and the whole comparison end to end on tiny arms."""

import json

import numpy as np
import pytest
import torch

from rlhf_sweep import fixes, pipeline
from rlhf_sweep.config import compose
from rlhf_sweep.reward import aggregate, score
from rlhf_sweep.world import World

from .conftest import TINY


# ----- pure statistics -----------------------------------------------------------------------------
def test_paired_bootstrap_ci_hand_values():
    # differences [0, 2]: resampled means are 0, 1, 2 with probability 1/4, 1/2, 1/4
    assert fixes.paired_bootstrap_ci([1, 5], [1, 3]) == (1.0, 0.0, 2.0)
    # a constant difference has no spread
    assert fixes.paired_bootstrap_ci([3, 4, 5], [1, 2, 3]) == (2.0, 2.0, 2.0)
    # differences [0, 0, 0, 3]: P(mean = 0) = (3/4)^4 = 0.32 > 2.5%, so low = 0;
    # P(mean >= 2.25) = 4 (1/4)^3 (3/4) + (1/4)^4 = 0.051 > 2.5% > P(mean = 3) = 0.004, so high = 2.25
    assert fixes.paired_bootstrap_ci([0, 0, 0, 3], [0, 0, 0, 0]) == (0.75, 0.0, 2.25)


def test_paired_bootstrap_ci_is_paired_by_seed():
    # a large seed effect shared by both arms cancels in the pairs: the interval excludes zero
    base = np.array([0.0, 10.0, -5.0, 3.0, 7.0])
    m, lo, hi = fixes.paired_bootstrap_ci(base + 1.0 + np.array([0.1, -0.1, 0.2, 0.0, -0.2]), base)
    assert m == pytest.approx(1.0) and 0.8 <= lo < 1.0 < hi <= 1.2 and fixes.excludes_zero(lo, hi)
    assert not fixes.excludes_zero(-0.1, 0.3)


def test_aggregate_hand_values():
    s = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]])  # 3 members x 2 responses
    # column 0: mean 2, population std sqrt(2/3); column 1: mean 1, std sqrt((1 + 1 + 4) / 3) = sqrt(2)
    assert aggregate(s, "mean_std", 1.0).tolist() == pytest.approx([2 - (2 / 3) ** 0.5, 1 - 2**0.5])
    assert aggregate(s, "mean_std", 0.5).tolist() == pytest.approx([2 - 0.5 * (2 / 3) ** 0.5, 1 - 0.5 * 2**0.5])
    assert aggregate(s, "min", 1.0).tolist() == [1.0, 0.0]
    assert aggregate(s, "mean", 1.0).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="rm.ensemble_agg"):
        aggregate(s, "max", 1.0)


def test_unknown_arm_is_one_line():
    with pytest.raises(fixes.FixesError) as e:
        fixes.arm_overrides("rm_ensmble")
    assert "rm_ensmble" in str(e.value) and "rm_ensemble" in str(e.value) and "\n" not in str(e.value)


def test_arms_compose_as_hydra_list():
    assert fixes.arm_overrides("rm_ensemble+kl_control") == ["experiment=[rm_ensemble,kl_control]"]
    c = compose(fixes.arm_overrides("rm_ensemble+length_penalty"))
    assert c.rm.ensemble_size > 1 and c.ppo.length_bonus < 0
    spec = fixes.load_spec()
    assert spec.seeds == [0, 1, 2, 3, 4] and spec.arms[0] == "baseline"
    for arm in ("rm_length_debias", "rm_ensemble", "kl_control", "length_penalty", "combined"):
        assert arm in spec.arms
        assert compose([f"experiment={arm}"]) != compose([])


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
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "fixes"
    arms = ["baseline", "rm_ensemble+length_penalty"]
    extra = (*TINY, f"cache_dir={tmp_path}/cache")
    res = fixes.compare_fixes(arms=arms, seeds=2, tracking_uri=uri, out=str(out), extra=extra, workers=2, progress=False)
    for f in ("fixes.md", "fixes.json"):
        assert (out / f).exists()
    summaries = {a: {s: json.loads((out / "runs" / a / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)} for a in arms}
    arm = arms[1]
    assert summaries[arm][0]["config"]["rm"]["ensemble_size"] == 3 and summaries[arm][0]["config"]["ppo"]["length_bonus"] < 0
    saved = json.loads((out / "fixes.json").read_text())
    md = (out / "fixes.md").read_text()
    for key, _label, _sign in fixes.METRICS:
        diffs = [summaries[arm][s]["metrics"][key] - summaries["baseline"][s]["metrics"][key] for s in (0, 1)]
        d = saved["arms"][arm]["diff"][key]
        assert d["mean"] == pytest.approx(np.mean(diffs)) and d["lo"] == pytest.approx(min(diffs)) and d["hi"] == pytest.approx(max(diffs))
        assert fixes.ci_text(d) in md and fixes.ci_text(d) in res.table  # with 2 seeds the interval spans both
        assert saved["arms"]["baseline"]["mean"][key] == pytest.approx(np.mean([summaries["baseline"][s]["metrics"][key] for s in (0, 1)]))
    assert saved["arms"][arm]["rm_side"] and "[" in md
    # MLflow: a parent run and one nested run per arm x seed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rlhf-sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("rlhf_sweep.role") == "compare-fixes"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert len(parents) == 1 and len(children) == 4
    # resumable: a second call runs nothing again
    mtime = (out / "runs" / arm / "seed-1" / "summary.json").stat().st_mtime
    again = fixes.compare_fixes(arms=arms, seeds=2, out=str(out), extra=(*extra, "mlflow.enabled=false"), workers=2, progress=False)
    assert (out / "runs" / arm / "seed-1" / "summary.json").stat().st_mtime == mtime
    assert again.result["arms"][arm]["diff"]["gold/policy"] == pytest.approx(saved["arms"][arm]["diff"]["gold/policy"])
    assert again.result["runs_this_invocation"] == 0
    # a run made with another config than its arm composes to now is not reused
    assert fixes.is_done(out, arm, 1, extra) and not fixes.is_done(out, arm, 1, (*extra, "ppo.beta=0.5"))
