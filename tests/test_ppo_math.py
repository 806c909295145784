"""GAE, whitening and the PPO losses against hand-computed values."""

import math

import pytest
import torch

from rlhf_sweep.training.core import masked_mean
from rlhf_sweep.training.ppo import RunningMoments, clipped_surrogate, clipped_value_loss, gae, whiten


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # t2: 1 - 0.7 = 0.3; t1: 0.7 - 0.6 + 0.5*0.3 = 0.25; t0: 0.6 - 0.5 + 0.5*0.25 = 0.225
    assert adv.tolist()[0] == pytest.approx([0.225, 0.25, 0.3])
    assert ret.tolist()[0] == pytest.approx([0.725, 0.85, 1.0])


def test_gae_stops_at_the_mask():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])  # the 5 lies after the end: ignored
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, _ = gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
    # t1: 1 + 0 - 0.6 = 0.4; t0: 0.6 - 0.5 + 0.5*0.4 = 0.3
    assert adv.tolist()[0] == pytest.approx([0.3, 0.4, 0.0])


def test_gae_lambda_one_is_monte_carlo():
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.3, 0.2, 0.4]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert ret.tolist()[0] == pytest.approx([0.9, 0.8, 1.0])  # reward-to-go


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), math.log(1.5))  # ratio 1.5
    adv = torch.tensor([[1.0, -1.0]])
    loss, clipfrac = clipped_surrogate(new, old, adv, torch.ones(1, 2), clip_eps=0.2)
    # A=+1: max(-1.5, -1.2) = -1.2 (clipped); A=-1: max(1.5, 1.2) = 1.5 (not clipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_clipped_surrogate_gradient_vanishes_when_clipped():
    new = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss, _ = clipped_surrogate(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert new.grad.item() == 0.0


def test_clipped_value_loss_hand_computed():
    v, v_old, ret = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    # unclipped (1-2)^2 = 1; clipped v = 0.2 -> (0.2-2)^2 = 3.24; max = 3.24, times 0.5
    assert clipped_value_loss(v, v_old, ret, torch.ones(1, 1), 0.2).item() == pytest.approx(1.62)
    assert clipped_value_loss(v, v_old, ret, torch.ones(1, 1), 0.0).item() == pytest.approx(0.5)


def test_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    w = whiten(x, m)
    assert w[0, :2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-4)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)


def test_running_moments_match_numpy():
    torch.manual_seed(0)
    a, b = torch.randn(50) * 2 + 1, torch.randn(70) * 3 - 2
    rm = RunningMoments()
    rm.update(a)
    rm.update(b)
    both = torch.cat([a, b])
    assert rm.mean == pytest.approx(both.mean().item(), abs=1e-3)
    assert rm.var == pytest.approx(both.var(unbiased=False).item(), rel=1e-3)
