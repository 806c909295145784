"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics"), as TRL 1.16's
RLOOTrainer computes it.

For k = num_generations completions y_1..y_k of one prompt x (groups.py samples them):
  r_i = RM(x, y_i) - beta * sum_t (log pi(y_i,t) - log ref(y_i,t))   KL in the reward, k1 summed (paper eq. 1;
                                                                     TRL: rewards - beta * kl)
  b_i = (sum_{j != i} r_j) / (k - 1)                                   the leave-one-out baseline (paper eq. 5;
                                                                     TRL: (grouped_sum - r) / (k - 1))
  A_i = r_i - b_i                                                      (TRL: advantages = rewards - baselines)
optionally normalised over the batch (TRL's normalize_advantages: (A - mean) / (std + 1e-4)). The loss is
PPO's clip on the *sequence* ratio rho_i = exp(sum_t log pi(y_i,t) - log pi_old(y_i,t)), averaged over
sequences: mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)) (TRL's RLOOTrainer._compute_loss;
with one on-policy step, rho = 1 and this is the paper's REINFORCE estimator).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from rlhf_sweep.config.algorithms import RLOOConfig
from rlhf_sweep.maths import kl as klmod
from rlhf_sweep.models.reward import RewardModel
from rlhf_sweep.simulation.world import World
from rlhf_sweep.training.core import AlgorithmInputs, masked_mean, surrogate_terms
from rlhf_sweep.training.groups import train_groups


# ----- the maths: pure functions -------------------------------------------------------------
def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         beta: float) -> torch.Tensor:
    """RM score minus beta times the sequence's summed k1 (log pi - log ref over its tokens)."""
    return scores - beta * klmod.sequence_sum(klmod.k1(logprobs, ref_logprobs), mask)


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = r_i - mean of the other k - 1 rewards of its group (rows of a group adjacent)."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def normalise(advantages: torch.Tensor) -> torch.Tensor:
    """TRL's normalize_advantages: zero mean, unit (Bessel) std over the batch, +1e-4 in the denominator."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-4)


def sequence_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate on sequence log-probabilities (token log-probs summed under the mask):
    the mean over sequences, and the fraction of sequences where the clip binds."""
    seq = klmod.sequence_sum(logprobs, mask)
    old = klmod.sequence_sum(old_logprobs, mask)
    loss, clipped = surrogate_terms(seq, old, advantages, epsilon)
    ones = torch.ones_like(loss)
    return masked_mean(loss, ones), masked_mean(clipped.float(), ones)


# ----- the trainer ---------------------------------------------------------------------------
def train_rloo(
    lm: nn.Module,
    ref: nn.Module,
    rm: RewardModel,
    world: World,
    cfg: RLOOConfig,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    progress: bool = True,
    on_iteration: Callable[[int, dict, dict], None] | None = None,
) -> list[dict[str, float]]:
    """cfg.iterations of RLOO on the policy LM `lm` (no value head); one history entry per iteration,
    with the shared keys and rloo/* (beta, reward, reward_std, baseline, advantage_std, clipfrac,
    approx_kl, entropy, loss)."""

    def advantages(batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        r = kl_penalised_rewards(batch["scores"], batch["logprobs"], batch["ref_logprobs"], batch["mask"], cfg.beta)
        adv = leave_one_out_advantages(r, cfg.num_generations)
        stats = {"reward": r.mean().item(), "reward_std": r.view(-1, cfg.num_generations).std(1).mean().item(),
                 "non_score_reward": (r - batch["scores"]).mean().item()}
        if cfg.normalize_advantages:
            adv = normalise(adv)
        stats["advantage_std"] = adv.std().item()
        return adv, stats

    def loss_fn(batch: dict, idx: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logprobs = logp.gather(-1, batch["responses"][idx].unsqueeze(-1)).squeeze(-1)
        loss, clipfrac = sequence_loss(logprobs, batch["logprobs"][idx], batch["seq_advantages"][idx], batch["mask"][idx],
                                       cfg.epsilon)
        return loss, {"clipfrac": clipfrac.item()}

    return train_groups("rloo", lm, ref, rm, world, cfg, advantages, loss_fn, rng, gen, device, progress, on_iteration)


def train(x: AlgorithmInputs) -> tuple[nn.Module, list[dict[str, float]]]:
    """`algo=rloo`: the policy LM trained on the policy stream."""
    return x.policy_lm, train_rloo(x.policy_lm, x.ref, x.rm, x.world, x.knobs, x.rng, x.gen, x.device, x.cfg.progress, x.on_iteration)
