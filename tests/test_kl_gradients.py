"""Each KL penalty's expected update, by exact enumeration, against what kl.PENALTIES declares.

A tabular world small enough to enumerate: 3 tokens, responses of length 3 (27 of them), a
softmax policy with its own logits at each of the 13 prefixes, a fixed reference. The expected
update of a penalty is the gradient of the PPO loss that ppo.py builds (kl_rewards ->
advantages_and_returns -> clipped_surrogate + kl_loss, with the per-token KL values of the
rollout), averaged over all 27 responses with their exact probabilities as token weights:
no sampling anywhere. The targets are gradients of enumerated sums by autograd:

- seq: the sequence KL(pi || ref) = sum_y pi(y) log(pi(y) / ref(y));
- rev_tok: sum_t E_{s_t ~ pi}[KL(pi(.|s_t) || ref(.|s_t))] with the state weights held fixed;
- fwd_tok: the same with the forward KL(ref(.|s_t) || pi(.|s_t)).

Published forms (REFERENCES.md, "KL terms"; Tang & Munos 2025; "A Comedy of Estimators" 2025;
Schulman's "Approximating KL divergence" for k1/k2/k3): reward + k1 gives -grad KL(pi||ref);
reward + k3 gives -(grad KL(pi||ref) - grad KL(ref||pi)) per token; reward + exact has no
direct term, only the effect on later states; loss + k1 gives 0 (E[grad log pi] = 0); loss + k2
and loss + exact give grad KL(pi||ref) per token; loss + k3 gives grad KL(ref||pi) per token
(GRPO); the full gradient adds sum_{t'>t} KL_t' to y_t's return, which is what both + exact does.
"""

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_sweep.config.compose import CONF_DIR
from rlhf_sweep.config.schema import PPOConfig
from rlhf_sweep.maths import kl
from rlhf_sweep.training import ppo

V, L = 3, 3
BETA = 0.1  # everything in float64: the tolerance is 1e-6 on gradients of size ~0.1


class Tabular:
    """Every response of length L over V tokens, the state (prefix) of each position, and logits per state."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        prefixes = [p for t in range(L) for p in itertools.product(range(V), repeat=t)]
        index = {p: i for i, p in enumerate(prefixes)}  # 1 + 3 + 9 = 13 states
        self.Y = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (27, L)
        self.S = torch.tensor([[index[tuple(y[:t])] for t in range(L)] for y in self.Y.tolist()])  # state of each position
        self.theta = (1.5 * torch.randn(len(prefixes), V, generator=g, dtype=torch.float64)).requires_grad_()
        self.ref = 1.5 * torch.randn(len(prefixes), V, generator=g, dtype=torch.float64)
        self.mask = torch.ones(len(self.Y), L, dtype=torch.float64)

    def forward(self):
        logits, ref_logits = self.theta[self.S], self.ref[self.S]  # (27, L, V)
        logprobs = logits.log_softmax(-1).gather(-1, self.Y.unsqueeze(-1)).squeeze(-1)
        ref_logprobs = ref_logits.log_softmax(-1).gather(-1, self.Y.unsqueeze(-1)).squeeze(-1)
        return logits, ref_logits, logprobs, ref_logprobs

    def grad(self, value: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(value, self.theta, retain_graph=True)
        return g

    def parts(self) -> dict[str, torch.Tensor]:
        """The gradients the declarations are made of (kl.PARTS), by autograd on enumerated sums."""
        logits, ref_logits, lp, rlp = self.forward()
        prob = lp.sum(1).exp()
        seq = (prob * (lp - rlp).sum(1)).sum()
        w = prob.detach()[:, None]  # each position's state weighted by how often pi reaches it, held fixed
        logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        rev = (w * (logp.exp() * (logp - ref_logp)).sum(-1)).sum()
        fwd = (w * (ref_logp.exp() * (ref_logp - logp)).sum(-1)).sum()
        return {"seq": self.grad(seq), "rev_tok": self.grad(rev), "fwd_tok": self.grad(fwd)}

    def exact_values(self, rewards: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """V(s_t) = E[sum_{t' >= t} r_t' | s_t] under pi: the value function a perfect critic would learn."""
        to_go = rewards.flip(1).cumsum(1).flip(1)
        values = torch.zeros_like(rewards)
        for t in range(L):
            same = (self.Y[:, None, :t] == self.Y[None, :, :t]).all(-1).double() * prob[None, :]  # (27, 27)
            values[:, t] = (same @ to_go[:, t]) / same.sum(1)
        return values


def expected_update(world: Tabular, pen: kl.Penalty, lam: float, critic: bool, whiten: bool) -> torch.Tensor:
    """E over the 27 responses of grad(PPO policy loss) at the sampling policy, in units of grad(beta x KL):
    the loss is a token mean (3 tokens a response) times the whitening factor, both divided out."""
    cfg = PPOConfig(gamma=1.0, lam=lam, whiten_advantages=whiten, kl_estimator=pen.estimator, kl_in=pen.placement)
    logits, ref_logits, logprobs, ref_logprobs = world.forward()
    prob = logprobs.sum(1).exp().detach()
    with torch.no_grad():  # as in ppo.rollout
        scores = torch.zeros(len(prob), dtype=torch.float64)  # the KL alone
        rewards, _ = ppo.kl_rewards(pen, logprobs, ref_logprobs, kl.exact(logits, ref_logits), scores, world.mask, BETA, 0.0)
        values = world.exact_values(rewards, prob) if critic else torch.zeros_like(rewards)
        advantages, _, adv_scale = ppo.advantages_and_returns(rewards, values, world.mask, cfg)
    weights = prob[:, None].expand(-1, L)  # exact expectation: every response weighted by its probability
    pg, _ = ppo.clipped_surrogate(logprobs, logprobs.detach(), advantages, weights, cfg.clip_eps)
    loss = pg + ppo.kl_loss(pen, logprobs, ref_logprobs, logits, ref_logits, weights, BETA, adv_scale)
    return world.grad(loss) * L / (BETA * float(adv_scale))


def target(pen: kl.Penalty, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((c * parts[name] for name, c in pen.target), torch.zeros_like(parts["seq"]))


SETTINGS = {  # (lam, exact critic, whitening): Monte Carlo returns, and the default GAE with a perfect critic
    "monte_carlo": (1.0, False, False),
    "gae_0.95_critic_whitened": (0.95, True, True),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", [p.name for p in kl.PENALTIES.values()])
def test_expected_update_matches_the_declaration(name, setting):
    world = Tabular()
    parts = world.parts()
    pen = next(p for p in kl.PENALTIES.values() if p.name == name)
    got = expected_update(world, pen, *SETTINGS[setting])
    true = parts["seq"]
    assert float(true.norm()) > 0.1  # a world where the KL has a real gradient
    assert torch.allclose(got, target(pen, parts), atol=1e-6), (name, (got - target(pen, parts)).abs().max())
    off = float((got - true).norm() / true.norm())
    if pen.gradient == "unbiased":
        assert off < 1e-6
    else:  # partial and biased ones really differ from the sequence KL's gradient here
        assert off > 0.1, (name, off)


def test_the_parts_differ_and_the_sequence_gradient_splits_into_direct_and_future():
    """The world is rich enough for every declaration to be told apart: the future-state part (seq - rev_tok)
    and the forward/reverse difference are both far from zero."""
    parts = Tabular().parts()
    assert float((parts["seq"] - parts["rev_tok"]).norm()) > 0.1 * float(parts["seq"].norm())
    assert float((parts["fwd_tok"] - parts["rev_tok"]).norm()) > 0.1 * float(parts["seq"].norm())


def test_reward_exact_plus_loss_exact_is_both_exact():
    """kl_in=both is exactly the two placements together: the future-state part plus the direct one."""
    world = Tabular(seed=1)
    by = {p.name: expected_update(world, p, 1.0, False, False) for p in kl.PENALTIES.values()}
    assert torch.allclose(by["reward_exact"] + by["loss_exact"], by["both_exact"], atol=1e-9)


def test_a_swapped_estimator_fails_the_check():
    """The check can fail: k3 (or k2's loss form) in the place of reward+k1's k1 does not give its declared gradient."""
    world = Tabular()
    parts = world.parts()
    declared = kl.PENALTIES["k1", "reward"]
    swapped = dataclasses.replace(declared, estimator="k3")
    assert torch.allclose(expected_update(world, declared, 1.0, False, False), target(declared, parts), atol=1e-6)
    assert not torch.allclose(expected_update(world, swapped, 1.0, False, False), target(declared, parts), atol=1e-3)


def test_declared_words_follow_the_targets():
    """unbiased means the sequence gradient, partial the per-token reverse KL only; biased says what instead."""
    for (est, placement), p in kl.PENALTIES.items():
        assert (p.estimator, p.placement) == (est, placement)
        assert p.gradient in kl.GRADIENTS and all(name in kl.PARTS for name, _ in p.target)
        assert (p.gradient == "unbiased") == (p.target == (("seq", 1),))
        assert (p.gradient == "partial") == (p.target == (("rev_tok", 1),))
        assert p.minimizes
    assert kl.PENALTIES["k1", "reward"].gradient == "unbiased"  # the default
    names = {p.name for p in kl.PENALTIES.values()}
    assert len(names) == len(kl.PENALTIES)
    every = {(e, p) for e in kl.ESTIMATORS for p in kl.PLACEMENTS}
    assert set(kl.PENALTIES) | set(kl.REFUSED) == every and not set(kl.PENALTIES) & set(kl.REFUSED)


def test_the_kl_penalty_config_group_is_the_table():
    """conf/kl_penalty/NAME.yaml sets exactly the pair that kl.PENALTIES names NAME, one file per pair."""
    files = {f.stem: yaml.safe_load(f.read_text()) for f in (Path(CONF_DIR) / "kl_penalty").glob("*.yaml")}
    assert set(files) == {p.name for p in kl.PENALTIES.values()}
    for p in kl.PENALTIES.values():
        assert files[p.name] == {"ppo": {"kl_estimator": p.estimator, "kl_in": p.placement}}


def test_config_errors_list_the_values_and_mark_the_unbiased_pairs():
    from rlhf_sweep.config.compose import compose
    from rlhf_sweep.config.schema import ConfigError

    for override, key in (("ppo.kl_estimator=k9", "ppo.kl_estimator"), ("ppo.kl_in=everywhere", "ppo.kl_in")):
        with pytest.raises(ConfigError) as e:
            compose([override])
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(key)
        assert "k1 | k2 | k3 | exact" in msg or "reward | loss | both" in msg
        assert "reward+k1 unbiased" in msg and "both+exact unbiased" in msg and "loss+k3 biased" in msg
    for refused in (["ppo.kl_estimator=k2"], ["ppo.kl_in=both"], ["ppo.kl_in=both", "ppo.kl_estimator=k3"]):
        with pytest.raises(ConfigError, match="does not run"):
            compose(refused)
    assert compose(["kl_penalty=both_exact"]).ppo.kl_in == "both"


def test_warning_only_for_non_unbiased_pairs():
    for p in kl.PENALTIES.values():
        w = kl.warning(p)
        assert (w is None) == (p.gradient == "unbiased")
        if w:
            assert "\n" not in w and p.gradient in w and p.minimizes in w


def test_config_import_does_not_load_torch():
    """The declarations live with the maths, but a bad config still fails without importing torch."""
    import subprocess
    import sys

    code = "import sys, rlhf_sweep.config; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
