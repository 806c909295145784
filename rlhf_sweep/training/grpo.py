"""GRPO: group-relative advantages and a per-token clipped ratio (Shao et al. 2024, DeepSeekMath), as TRL
1.16's GRPOTrainer computes it, with the KL term of the KL-penalty machinery (maths/kl.py).

For G = num_generations completions of one prompt with rewards r_1..r_G (groups.py samples them):
  A_i = (r_i - mean(r)) / (std(r) + 1e-4)        Shao et al. sec. 4.1.2 (outcome supervision); TRL adds 1e-4
                                                 and uses the Bessel std; a group whose rewards are all equal
                                                 (std 0) gets A = 0 (TRL logs frac_reward_zero_std)
  scale_rewards: group (above) | batch (std over the whole batch, PPO Lite) | none (no division, Dr. GRPO)
The per-token loss is PPO's clip on rho_t = pi(y_t) / pi_old(y_t) with the sequence's A on every token
(Shao et al. eq. 3; DAPO's epsilon_high for an asymmetric clip), plus, with kl_in=loss, beta times the
per-token KL estimate (eq. 4: k3, "unbiased and >= 0"; TRL: per_token_loss + beta * per_token_kl). As published its
gradient is that of KL(ref || pi), not of the KL it names (Tang & Munos 2025); TRL 1.16 by default multiplies
the term by pi / pi_old (use_bias_correction_kl, DeepSeek-V3.2), which makes it KL(pi || ref)'s; kl_estimator
and kl_in pick the other corrected variants (k1 in the reward, exact in the loss). Token losses are aggregated by loss_type
(TRL's names): grpo = mean over sequences of each one's token mean (Shao et al.); bnpo = token mean over
the minibatch; dr_grpo = token sum / (sequences x max_new_tokens) (Liu et al. 2025); dapo = token sum /
(the generation batch's tokens / steps_per_generation) (Yu et al. 2025; TRL's default).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from rlhf_sweep.config.algorithms import GRPOConfig
from rlhf_sweep.maths import kl as klmod
from rlhf_sweep.models.reward import RewardModel
from rlhf_sweep.simulation.world import World
from rlhf_sweep.training.core import AlgorithmInputs, masked_mean, surrogate_terms
from rlhf_sweep.training.groups import train_groups


# ----- the maths: pure functions -------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, k: int, scale_rewards: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(r - group mean) / (std + 1e-4) per group of k adjacent rows; returns (advantages, zero-std mask per row)."""
    grouped = rewards.view(-1, k)
    mean = grouped.mean(1, keepdim=True).expand_as(grouped).reshape(-1)
    if scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    else:  # group; with none it only tells which groups carry no signal
        std = grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return adv, torch.isclose(std, torch.zeros_like(std))


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int,
              tokens_per_step: float) -> torch.Tensor:
    """TRL's loss_type: how token losses become one number (see the module docstring)."""
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_new_tokens)
    if loss_type == "dapo":
        return (per_token_loss * mask).sum() / max(tokens_per_step, 1.0)
    raise ValueError(f"grpo.loss_type={loss_type!r}: accepts grpo | bnpo | dr_grpo | dapo")


def bias_corrected(kl_t: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """A sampled per-token KL term times the ratio pi / pi_old, gradient through both (TRL's
    use_bias_correction_kl, from DeepSeek-V3.2): for tokens drawn from pi_old, the k3 term's expected
    gradient becomes that of KL(pi || ref) instead of KL(ref || pi)."""
    return kl_t * torch.exp(logprobs - old_logprobs)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float, epsilon_high: float | None, kl_t: torch.Tensor | None, beta: float, loss_type: str,
              max_new_tokens: int, tokens_per_step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate with the sequence advantage on each token, + beta * kl_t (when given),
    aggregated by loss_type; returns (loss, fraction of tokens where the clip binds)."""
    per_token, clipped = surrogate_terms(logprobs, old_logprobs, advantages[:, None], epsilon, epsilon_high)
    if kl_t is not None:
        per_token = per_token + beta * kl_t
    return aggregate(per_token, mask, loss_type, max_new_tokens, tokens_per_step), masked_mean(clipped.float(), mask)


# ----- the trainer ---------------------------------------------------------------------------
def train_grpo(
    lm: nn.Module,
    ref: nn.Module,
    rm: RewardModel,
    world: World,
    cfg: GRPOConfig,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    progress: bool = True,
    on_iteration: Callable[[int, dict, dict], None] | None = None,
) -> list[dict[str, float]]:
    """cfg.iterations of GRPO on the policy LM `lm` (no value head); one history entry per iteration, with
    the shared keys and grpo/* (beta, reward, reward_std, frac_reward_zero_std, kl (the penalty's per-token
    mean), clipfrac, approx_kl, entropy, loss)."""
    T = world.cfg.max_new_tokens
    in_loss = cfg.kl_in == "loss" and cfg.beta > 0

    def advantages(batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        kl_t = klmod.per_token(cfg.kl_estimator, batch["logprobs"], batch["ref_logprobs"], batch["logits"], batch["ref_logits"])
        r = batch["scores"]
        if cfg.kl_in == "reward":
            r = r - cfg.beta * klmod.sequence_sum(kl_t, batch["mask"])
        adv, zero_std = group_advantages(r, cfg.num_generations, cfg.scale_rewards)
        batch["tokens_per_step"] = batch["mask"].sum() / cfg.steps_per_generation
        return adv, {"reward": r.mean().item(), "reward_std": r.view(-1, cfg.num_generations).std(1).mean().item(),
                     "frac_reward_zero_std": zero_std.float().mean().item(),
                     "kl": masked_mean(kl_t, batch["mask"]).item()}

    def loss_fn(batch: dict, idx: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        responses, m = batch["responses"][idx], batch["mask"][idx]
        logprobs = logp.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        kl_t = None
        if in_loss:  # logp are log-softmaxed logits: exact KL normalises them again, which changes nothing
            kl_t = klmod.per_token(cfg.kl_estimator, logprobs, batch["ref_logprobs"][idx], logp, batch["ref_logits"][idx])
            if cfg.use_bias_correction_kl and cfg.kl_estimator != "exact":
                kl_t = bias_corrected(kl_t, logprobs, batch["logprobs"][idx])
        loss, clipfrac = grpo_loss(logprobs, batch["logprobs"][idx], batch["seq_advantages"][idx], m, cfg.epsilon,
                                   cfg.epsilon_high, kl_t, cfg.beta, cfg.loss_type, T, float(batch["tokens_per_step"]))
        return loss, {"clipfrac": clipfrac.item()}

    return train_groups("grpo", lm, ref, rm, world, cfg, advantages, loss_fn, rng, gen, device, progress, on_iteration)


def train(x: AlgorithmInputs) -> tuple[nn.Module, list[dict[str, float]]]:
    """`algo=grpo`: the policy LM trained on the policy stream."""
    return x.policy_lm, train_grpo(x.policy_lm, x.ref, x.rm, x.world, x.knobs, x.rng, x.gen, x.device, x.cfg.progress, x.on_iteration)
