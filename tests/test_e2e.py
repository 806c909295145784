"""End to end: the three observations on the default world (PPO, and where they apply RLOO, GRPO, DPO and
best-of-n), the causal control, a strong KL penalty, determinism, and what lands on disk and in MLflow.

The science tests run the default config (about a minute cold on 2 cores, then
cached SFT). Seed 0 runs in CI; set RLHF_SWEEP_SEEDS=0,1,2 for all three.
"""

import json
import os
import subprocess
import sys

import pytest

from rlhf_sweep.config.compose import compose
from rlhf_sweep.run import pipeline

from .conftest import TINY

pytestmark = pytest.mark.e2e
SEEDS = [int(s) for s in os.environ.get("RLHF_SWEEP_SEEDS", "0").split(",")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run(cache_dir, *overrides):
    cfg = compose(["progress=false", "mlflow.enabled=false", *overrides])
    cfg.cache_dir = cache_dir
    return pipeline.run(cfg, say=lambda *_: None)


@pytest.fixture(scope="module")
def default_runs(cache_dir):
    return {s: run(cache_dir, f"seed={s}") for s in SEEDS}


@pytest.mark.parametrize("seed", SEEDS)
def test_default_world_shows_all_three_observations(default_runs, seed):
    s = default_runs[seed]
    obs = s["observations"]
    assert obs["rm_prefers_policy"]["value"], obs["rm_prefers_policy"]
    assert obs["humans_prefer_reference"]["value"], obs["humans_prefer_reference"]
    assert obs["kl_increasing"]["value"], obs["kl_increasing"]
    m = s["metrics"]
    assert m["len/policy"] > m["len/ref"] + 1 and m["filler/policy"] > m["filler/ref"] + 0.5
    assert s["config"]["ppo"]["length_bonus"] == 0.0  # nothing in the PPO reward asked for length


@pytest.mark.parametrize("seed", SEEDS)
def test_unbiased_labelers_remove_the_verbosity_drift(default_runs, cache_dir, seed):
    base = default_runs[seed]["metrics"]
    ctrl = run(cache_dir, f"seed={seed}", "world.labeler.length_bias=0", "world.labeler.filler_bias=0")["metrics"]
    len_gain, fill_gain = base["len/policy"] - base["len/ref"], base["filler/policy"] - base["filler/ref"]
    assert ctrl["len/policy"] - ctrl["len/ref"] <= len_gain / 3
    assert ctrl["filler/policy"] - ctrl["filler/ref"] <= fill_gain / 3


def test_strong_kl_penalty_keeps_the_policy_near_the_reference(default_runs, cache_dir):
    base = default_runs[SEEDS[0]]["metrics"]
    strong = run(cache_dir, f"seed={SEEDS[0]}", "ppo.beta=1.0")["metrics"]
    assert strong["kl/exact"] < base["kl/exact"] / 10
    # gold stays close to the reference; the default's drift is many times larger
    assert abs(strong["gold/policy"] - strong["gold/ref"]) < 0.15
    assert abs(base["gold/policy"] - base["gold/ref"]) > 2 * abs(strong["gold/policy"] - strong["gold/ref"])


@pytest.fixture(scope="module")
def algo_runs(cache_dir):
    """Each other algorithm at its defaults on the default world (best-of-n on 64 samples per prompt, to stay cheap)."""
    extra = {"bon": ["bon.samples_per_prompt=64"]}
    return {(a, s): run(cache_dir, f"seed={s}", f"algo={a}", *extra.get(a, [])) for a in ("rloo", "grpo", "dpo", "bon") for s in SEEDS}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_rloo_and_grpo_show_the_observations(algo_runs, algo, seed):
    """Critic-free RL against the same RM over-optimizes as PPO does: the RM prefers the policy, gold prefers the
    reference (longer, more filler), and KL still rises over the second half although beta > 0. GRPO's rise passes
    verdict 3 (autocorrelation-robust trend and a rise of at least eval.trend_min_growth of its level); RLOO's KL
    rises too (the last fifth above the middle fifth, plain Mann-Kendall), but on seed 0 not by that much."""
    s = algo_runs[algo, seed]
    obs, m = s["observations"], s["metrics"]
    v3 = obs["kl_increasing"]
    assert obs["rm_prefers_policy"]["value"] and obs["humans_prefer_reference"]["value"], obs
    assert v3["kl_last_20pct"] > v3["kl_middle_20pct"] and v3["p_value_independent"] < 0.05 and v3["mann_kendall_S"] > 0, v3
    if algo == "grpo":
        assert v3["value"], v3
    assert m["len/policy"] > m["len/ref"] + 1 and m["filler/policy"] > m["filler/ref"] + 0.5
    assert v3["beta"] == s["config"][algo]["beta"] > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_dpo_learns_the_labelers_bias_without_querying_an_rm(algo_runs, seed):
    """DPO never sees the RM, yet the RM trained on the same labels prefers its policy (verdict 1, the separately
    trained RM's view), its answers grow longer, and KL keeps growing over its steps."""
    s = algo_runs["dpo", seed]
    obs, m = s["observations"], s["metrics"]
    assert obs["rm_prefers_policy"]["value"] and "never queried" in obs["rm_prefers_policy"]["judge"], obs
    assert obs["kl_increasing"]["value"], obs["kl_increasing"]
    assert m["len/policy"] > m["len/ref"]


@pytest.mark.parametrize("seed", SEEDS)
def test_best_of_n_sits_at_its_kl_bound_here(algo_runs, seed):
    """The reference's answers rarely repeat, so best-of-16's exact KL is within a few percent of log n - (n-1)/n;
    the RM prefers the choice, and no KL trend applies (nothing trains)."""
    s = algo_runs["bon", seed]
    obs, m = s["observations"], s["metrics"]
    assert obs["rm_prefers_policy"]["value"] and obs["kl_increasing"]["applies"] is False
    assert 0.95 * m["kl/bon_bound"] <= m["kl/exact"] <= m["kl/bon_bound"]
    assert m["bon/distinct_per_prompt"] > 0.5 * m["bon/samples_per_prompt"]


def test_summary_has_the_documented_keys(default_runs):
    s = default_runs[SEEDS[0]]
    for key in ("config", "metrics", "history", "observations", "diagnosis", "timing"):
        assert key in s
    for key in ("rm/policy", "rm/ref", "rm/win_rate", "gold/policy", "gold/ref", "gold/win_rate", "len/policy", "len/ref",
                "filler/policy", "filler/ref", "directness/policy", "directness/ref", "kl/exact", "kl/k1", "kl/k3",
                "kl/exact_per_token", "ppo/beta", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/value_loss",
                "rm/acc_labels", "rm/acc_gold"):
        assert key in s["metrics"], key
    for key in ("rm", "gold", "len", "filler", "kl/exact", "kl/k1", "kl/k3", "ppo/beta", "ppo/clipfrac", "ppo/approx_kl",
                "ppo/entropy", "ppo/value_loss"):
        assert key in s["history"][0], key
    assert len(s["history"]) == s["config"]["ppo"]["iterations"]
    for verdict in s["observations"].values():
        assert isinstance(verdict["value"], bool)


def test_same_seed_same_metrics_and_cache_reuse(tmp_path):
    first = run(str(tmp_path), *TINY)
    second = run(str(tmp_path), *TINY)  # loads SFT and RM from the cache
    assert not first["cache"]["sft"]["cached"] and second["cache"]["sft"]["cached"] and second["cache"]["rm"]["cached"]
    assert first["metrics"] == second["metrics"]
    assert first["history"] == second["history"]
    third = run(str(tmp_path), *TINY, "ppo.beta=0.2")  # a PPO knob: both artefacts reused
    assert third["cache"]["rm"]["cached"]
    fourth = run(str(tmp_path), *TINY, "rm.center_coef=0.01")  # an RM knob: only the reference reused
    assert fourth["cache"]["sft"]["cached"] and not fourth["cache"]["rm"]["cached"]


@pytest.mark.parametrize("extra", [["model=llama"], ["ppo.kl_estimator=exact", "ppo.kl_in=loss"], ["ppo.adaptive_kl=true", "ppo.reward_norm=true", "ppo.reward_clip=3", "rm.pairs=length_matched", "rm.length_decorr=0.5", "rm.center_coef=0.01"]])
def test_options_run(tmp_path, extra):
    s = run(str(tmp_path), *TINY, *extra)
    assert len(s["history"]) == 3


def test_cli_run_writes_summary_and_logs_to_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = subprocess.run(
        [sys.executable, "-m", "rlhf_sweep", "run", *TINY, f"cache_dir={tmp_path}/cache", f"mlflow.tracking_uri={uri}",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "humans prefer the reference" in r.stdout and "KL exact" in r.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["cache_dir"] == f"{tmp_path}/cache"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rlhf-sweep")
    (run_,) = client.search_runs([exp.experiment_id])
    assert run_.data.params["ppo.beta"] == "0.03"
    hist = client.get_metric_history(run_.info.run_id, "kl/exact")
    assert sorted(m.step for m in hist) == [0, 1, 2, 3]  # 3 iterations, then the held-out value
    assert run_.data.metrics["gold/win_rate"] == pytest.approx(summary["metrics"]["gold/win_rate"])
    assert "summary.json" in [a.path for a in client.list_artifacts(run_.info.run_id)]
