"""KL penalties in real runs: the temperature the rollout samples at is the one its log-probs, KL and
ratio use; a run with a non-unbiased penalty warns once and carries the kl/gradient tag (summary.json
and MLflow); explain.md part (c) names the penalty, its gradient and what it charged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import ModelConfig, PPOConfig, WorldConfig
from rlhf_sweep.models.lm import PolicyWithValue, build_lm, lm_logits, response_logits, sample
from rlhf_sweep.models.reward import RewardModel
from rlhf_sweep.reporting import explain
from rlhf_sweep.run import pipeline, tracking
from rlhf_sweep.simulation.world import PROMPT_LEN, World
from rlhf_sweep.training import ppo

from .conftest import TINY

T = 0.5


def peaked_lm(world: World, seed: int) -> torch.nn.Module:
    """A tiny random GPT-2 whose next-token distributions are far from uniform (so T = 0.5 and T = 1 differ)."""
    torch.manual_seed(seed)
    lm = build_lm(ModelConfig(n_layer=1, n_embd=16, n_head=2), world.vocab.size, PROMPT_LEN + world.cfg.max_new_tokens)
    with torch.no_grad():
        lm.transformer.ln_f.weight.mul_(8.0)  # logits scale with it (tied head, zero ln_f bias)
    return lm.eval()


@pytest.fixture(scope="module")
def tiny():
    world = World(WorldConfig(max_new_tokens=6))
    policy = PolicyWithValue(peaked_lm(world, 0), 16)
    ref = peaked_lm(world, 1)
    rm = RewardModel(peaked_lm(world, 2), 16)
    return world, policy, ref, rm


def test_sampling_at_a_temperature_draws_from_the_tempered_softmax(tiny):
    """What "the distribution sampled from" is: first tokens of one prompt, 20000 draws at T = 0.5."""
    world, policy, _, _ = tiny
    prompts = world.sample_prompts(1, np.random.default_rng(0)).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    responses, logits, _ = sample(policy.lm, prompts, 6, gen, T, with_states=True)
    freq = torch.bincount(responses[:, 0], minlength=world.vocab.size).double() / len(responses)
    tv = lambda p: float((freq - p).abs().sum() / 2)  # noqa: E731
    assert tv(torch.softmax(logits[0, 0].double() / T, -1)) < 0.02
    assert tv(torch.softmax(logits[0, 0].double(), -1)) > 0.1  # the T = 1 softmax is another distribution


def test_rollout_and_update_use_the_sampled_distribution(tiny):
    world, policy, ref, rm = tiny
    cfg = PPOConfig(batch_size=32, temperature=T, epochs=1, minibatches=1, lr=1e-12, kl_estimator="k1")
    batch = ppo.rollout(policy, ref, rm, world, cfg, 0.1, np.random.default_rng(0), torch.Generator().manual_seed(0),
                        torch.device("cpu"), ppo.RunningMoments())
    with torch.no_grad():
        logits = response_logits(lm_logits(policy.lm, batch["seqs"])) / T
        ref_logits = response_logits(lm_logits(ref, batch["seqs"])) / T
    lp = torch.log_softmax(logits, -1).gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1)
    rlp = torch.log_softmax(ref_logits, -1).gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1)
    m = batch["mask"].bool()
    assert torch.allclose(batch["logprobs"][m], lp[m], atol=1e-4)
    assert torch.allclose(batch["ref_logprobs"][m], rlp[m], atol=1e-4)
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits),
                                                 torch.distributions.Categorical(logits=ref_logits))
    assert torch.allclose(batch["kl_exact"][m], expected[m], atol=1e-4)
    # the first step's ratio is 1: update recomputes the log-probs at the same temperature
    stats = ppo.update(policy, torch.optim.SGD(policy.parameters(), lr=1e-12), batch, cfg, 0.1, np.random.default_rng(0))
    assert stats["ppo/approx_kl"] < 1e-8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One SFT reference and RM for every run of this module (PPO knobs are not in their cache keys)."""
    return tmp_path_factory.mktemp("kl-cache")


def test_at_a_temperature_the_policy_starts_at_kl_zero(cache):
    """The reference is compared at the same temperature: the first rollout's policy is the reference."""
    cfg = compose([*TINY, "ppo.iterations=2", "ppo.temperature=0.7", "mlflow.enabled=false", f"cache_dir={cache}"])
    s = pipeline.run(cfg, say=lambda *_: None)
    assert s["history"][0]["kl/exact"] < 1e-4
    assert s["metrics"]["len/ref"] > 0


@pytest.fixture(scope="module")
def biased_run(tmp_path_factory, cache):
    d = tmp_path_factory.mktemp("kl-run")
    cfg = compose([*TINY, "ppo.iterations=4", "kl_penalty=loss_k3", "mlflow.enabled=false", f"cache_dir={cache}"])
    cfg.run_dir = str(d / "run")
    said: list[str] = []
    summary = pipeline.run(cfg, say=said.append)
    return d, summary, said


def test_a_biased_penalty_warns_once_and_is_tagged(biased_run, tmp_path):
    d, summary, said = biased_run
    warnings = [m for m in said if m.startswith("warning:")]
    assert warnings == ["warning: ppo.kl_in=loss with ppo.kl_estimator=k3 has a biased KL gradient: it minimizes the "
                        "forward KL(ref || pi) per token (GRPO's penalty; no importance ratio after the first minibatch), "
                        "not the sequence KL(pi || ref) (unbiased: kl_in=reward with k1, kl_in=both with exact)"]
    on_disk = json.loads((d / "run" / "summary.json").read_text())
    assert on_disk["config"]["kl/gradient"] == "biased" and on_disk["tags"] == {"kl/gradient": "biased"}
    # what the penalty charged is its own estimator's sequence sum: k3 here
    assert [h["kl/penalty"] for h in on_disk["history"]] == [h["kl/k3"] for h in on_disk["history"]]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    run_id = tracking.log_finished(client, tracking.experiment_id(client, "kl-tags", uri), on_disk, None, name="biased")
    assert client.get_run(run_id).data.tags["kl/gradient"] == "biased"


def test_the_default_penalty_is_unbiased_and_silent(cache):
    cfg = compose([*TINY, "ppo.iterations=2", "mlflow.enabled=false", f"cache_dir={cache}"])
    said: list[str] = []
    s = pipeline.run(cfg, say=said.append)
    assert s["tags"] == {"kl/gradient": "unbiased"} and s["config"]["kl/gradient"] == "unbiased"
    assert not [m for m in said if "warning" in m]


def test_explain_names_the_penalty_and_what_it_charged(biased_run):
    d, summary, _ = biased_run
    text = explain.explain(d / "run").read_text()
    part_c = text.split("## (c)")[1]
    h = summary["history"]
    assert "**Penalty: k3 as a term of the PPO loss (ppo.kl_in=loss, ppo.kl_estimator=k3); its expected update is biased**" in part_c
    assert "it minimizes the forward KL(ref || pi) per token" in part_c
    assert f"What it charged: {h[0]['kl/penalty']:.2f} -> {h[-1]['kl/penalty']:.2f} nats per sequence" in part_c
    gap = h[-1]["kl/penalty"] - h[-1]["kl/exact"]
    assert f"{abs(gap):.2f} nats {'above' if gap > 0 else 'below'} the exact KL" in part_c
