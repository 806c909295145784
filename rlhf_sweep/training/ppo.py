"""PPO for language models, top to bottom (Ziegler et al. 2019; Ouyang et al. 2022).

Per iteration: sample one completion per prompt from the policy; score it with
the RM at its EOS; build per-token rewards `-beta * kl_t` (+ `length_bonus` per
content token) with the RM score added at the last token; GAE (gamma 1,
lambda 0.95); whitened advantages; then several epochs of minibatch updates of
the clipped surrogate plus a clipped value loss. The KL penalty sees only the
log-probabilities of the sampled tokens (unless kl_estimator=exact), and its
sequence total grows with length: that is what `kl/exact` and friends measure.

Where the penalty goes is `ppo.kl_in` (maths/kl.py: kl.PENALTIES declares what each choice's gradient
is): inside the return (`kl_rewards`), as a loss term (`kl_loss`), or both. One beta for
all: the PPO loss is a token mean of whitened advantages, so a charge of beta per nat in
the return reaches the gradient as beta x (tokens per minibatch)^-1 x (whitening factor);
`kl_loss` uses exactly that normalisation, so beta charges per nat of sequence KL in every
placement. With `ppo.temperature != 1` every log-prob, KL and ratio uses the distribution
sampled from: policy and reference logits divided by the temperature.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_sweep.config.algorithms import PPOConfig
from rlhf_sweep.maths import kl as klmod
from rlhf_sweep.models.lm import PolicyWithValue, response_logits
from rlhf_sweep.models.reward import RewardModel
from rlhf_sweep.simulation.world import PROMPT_LEN, World
from rlhf_sweep.training.core import AlgorithmInputs, entropy_from_logprobs, masked_mean, sample_and_score, sample_stats, surrogate_terms


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    out = (x - mean) * whiten_scale(x, mask)
    return out if shift_mean else out + mean


def whiten_scale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The factor `whiten` multiplies by: 1 / std over the masked entries."""
    mean = masked_mean(x, mask)
    return torch.rsqrt(masked_mean((x - mean) ** 2, mask) + 1e-8)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; the value
    after the last valid token is 0 (the episode ends at EOS). Returns (advantages, returns).
    """
    T = rewards.shape[1]
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip loss max(-A r, -A clip(r, 1-eps, 1+eps)) and the fraction of clipped tokens."""
    loss, clipped = surrogate_terms(logprobs, old_logprobs, advantages, clip_eps)
    return masked_mean(loss, mask), masked_mean(clipped.float(), mask)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2); plain squared error when clip is 0."""
    err = (values - returns) ** 2
    if clip > 0:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err = torch.max(err, (v_clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


def kl_rewards(
    pen: klmod.Penalty, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_exact: torch.Tensor, scores: torch.Tensor,
    mask: torch.Tensor, beta: float, length_bonus: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards and the per-token KL values of the penalty's estimator (kl_t).

    Rewards: `length_bonus` per content token, `-beta * kl_t` where the penalty sits in the return,
    and the RM score on the last token (EOS, or the last one when a response never ended).
    """
    kl_t = kl_exact if pen.estimator == "exact" else klmod.per_token(pen.estimator, logprobs, ref_logprobs)
    last = (mask.sum(1) - 1).long()
    rows = torch.arange(len(last), device=mask.device)
    content = mask.clone()
    content[rows, last] = 0.0  # EOS is not a content token
    rewards = length_bonus * content
    if pen.in_reward:
        rewards = rewards - beta * kl_t * mask
    rewards[rows, last] += scores
    return rewards, kl_t


def advantages_and_returns(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cfg: PPOConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE, then whitening when cfg.whiten_advantages; returns (advantages, returns, adv_scale), where
    adv_scale is the factor whitening multiplied the advantages by (1 without whitening): `kl_loss`
    applies the same factor, so beta means the same in the return and in the loss."""
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if not cfg.whiten_advantages:
        return advantages, returns, torch.ones((), device=rewards.device, dtype=rewards.dtype)
    return whiten(advantages, mask), returns, whiten_scale(advantages, mask)


def kl_loss(
    pen: klmod.Penalty,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    adv_scale: torch.Tensor | float,
) -> torch.Tensor:
    """The penalty as a loss term (0 when it sits only in the return), normalised like the policy loss:
    a token mean (as `clipped_surrogate`'s), times the factor whitening applied to the advantages.
    `mask` weighs the tokens (the response mask, or any weights)."""
    if not pen.in_loss:
        return logprobs.new_zeros(())
    kl_t = klmod.per_token(pen.estimator, logprobs, ref_logprobs, logits, ref_logits)
    return beta * adv_scale * masked_mean(kl_t, mask)


class RunningMoments:
    """Running mean/std of RM scores for reward normalisation (Welford, batch form)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        b_mean, b_var, b_n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = b_mean - self.mean, self.count + b_n
        self.mean += delta * b_n / total
        self.var = (self.var * self.count + b_var * b_n + delta**2 * self.count * b_n / total) / total
        self.count = total


def rollout(
    policy: PolicyWithValue,
    ref: nn.Module,
    rm: RewardModel,
    world: World,
    cfg: PPOConfig,
    beta: float,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    moments: RunningMoments,
) -> dict[str, torch.Tensor]:
    """Sample, score and turn into per-token rewards, advantages and returns."""
    prompts = world.sample_prompts(cfg.batch_size, rng).to(device)
    b = sample_and_score(policy.lm, ref, rm, prompts, world.cfg.max_new_tokens, gen, cfg.temperature)
    responses, seqs, mask, logprobs, ref_logprobs = b["responses"], b["seqs"], b["mask"], b["logprobs"], b["ref_logprobs"]
    ref_logits, kl_exact, scores = b["ref_logits"], b["kl_exact"], b["scores"]
    with torch.no_grad():
        values = policy.v_head(b["hidden"]).squeeze(-1)
    raw_scores = scores.clone()
    if cfg.reward_norm:
        moments.update(scores)
        scores = (scores - moments.mean) / max(moments.var**0.5, 1e-6)
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    pen = klmod.penalty(cfg.kl_estimator, cfg.kl_in)
    rewards, kl_t = kl_rewards(pen, logprobs, ref_logprobs, kl_exact, scores, mask, beta, cfg.length_bonus)
    advantages, returns, adv_scale = advantages_and_returns(rewards, values, mask, cfg)
    return dict(
        prompts=prompts, responses=responses, seqs=seqs, mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
        ref_logits=ref_logits, values=values, advantages=advantages, returns=returns, rewards=rewards,
        scores=raw_scores, scores_used=scores, kl_exact=kl_exact, kl_t=kl_t, adv_scale=adv_scale,
    )


def update(
    policy: PolicyWithValue, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], cfg: PPOConfig, beta: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Epochs of minibatch steps on one rollout; returns the iteration's mean statistics."""
    n = batch["seqs"].shape[0]
    mb = n // cfg.minibatches
    pen = klmod.penalty(cfg.kl_estimator, cfg.kl_in)
    stats: dict[str, list[float]] = {k: [] for k in ("clipfrac", "approx_kl", "entropy", "value_loss", "pg_loss")}
    for _ in range(cfg.epochs):
        perm = torch.from_numpy(rng.permutation(n)).to(batch["seqs"].device)
        for s in range(cfg.minibatches):
            idx = perm[s * mb : (s + 1) * mb]
            m = batch["mask"][idx]
            logits, values = policy(batch["seqs"][idx])
            logits, values = response_logits(logits), values[:, PROMPT_LEN - 1 : -1]
            if cfg.temperature != 1:  # the distribution the rollout sampled from
                logits = logits / cfg.temperature
            logp = torch.log_softmax(logits.float(), -1)  # once, for the log-probs and the entropy
            logprobs = logp.gather(-1, batch["responses"][idx].unsqueeze(-1)).squeeze(-1)
            pg_loss, clipfrac = clipped_surrogate(logprobs, batch["logprobs"][idx], batch["advantages"][idx], m, cfg.clip_eps)
            vf_loss = clipped_value_loss(values, batch["values"][idx], batch["returns"][idx], m, cfg.vf_clip)
            with torch.set_grad_enabled(cfg.ent_coef != 0):  # a logged statistic unless it is in the loss
                entropy = masked_mean(entropy_from_logprobs(logp), m)
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
            if pen.in_loss:
                loss = loss + kl_loss(pen, logprobs, batch["ref_logprobs"][idx], logits, batch["ref_logits"][idx], m, beta,
                                      batch["adv_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                log_ratio = logprobs - batch["logprobs"][idx]
                stats["approx_kl"].append(masked_mean(0.5 * log_ratio**2, m).item())
            stats["clipfrac"].append(clipfrac.item())
            stats["entropy"].append(entropy.item())
            stats["value_loss"].append(vf_loss.item())
            stats["pg_loss"].append(pg_loss.item())
        if cfg.early_stop_kl > 0 and np.mean(stats["approx_kl"][-cfg.minibatches :]) > cfg.early_stop_kl:
            break
    return {f"ppo/{k}": float(np.mean(v)) for k, v in stats.items()}


def train_ppo(
    policy: PolicyWithValue,
    ref: nn.Module,
    rm: RewardModel,
    world: World,
    cfg: PPOConfig,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    progress: bool = True,
    on_iteration: Callable[[int, dict, dict], None] | None = None,
) -> list[dict[str, float]]:
    """Run cfg.iterations of PPO; returns one history entry per iteration.

    `on_iteration(i, entry, batch)` sees every rollout (the diagnosis reads the last).
    """
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5, fused=True)  # one kernel for all tensors
    beta = cfg.beta
    moments = RunningMoments()
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.iterations), desc="PPO", disable=not progress, leave=False)
    for it in bar:
        policy.eval()  # no dropout anywhere; eval() only documents it
        batch = rollout(policy, ref, rm, world, cfg, beta, rng, gen, device, moments)
        stats = update(policy, opt, batch, cfg, beta, rng)
        cpu = {k: v.detach().cpu() for k, v in batch.items()}
        m = cpu["mask"]
        entry = {
            "iteration": it,
            **sample_stats(world, cpu),
            "kl/penalty": klmod.sequence_sum(cpu["kl_t"], m).mean().item(),  # what the penalty's estimator charged
            "ppo/beta": beta,
            "ppo/non_score_reward": (cpu["rewards"].sum(1) - cpu["scores_used"]).mean().item(),
            **stats,
        }
        history.append(entry)
        if on_iteration is not None:
            on_iteration(it, entry, cpu)
        if cfg.adaptive_kl:
            beta = klmod.adaptive_beta(beta, entry["kl/penalty"], cfg.target_kl, cfg.batch_size, cfg.horizon)
        bar.set_postfix(rm=f"{entry['rm']:.2f}", gold=f"{entry['gold']:.2f}", kl=f"{entry['kl/exact']:.2f}")
    return history


def train(x: AlgorithmInputs) -> tuple[nn.Module, list[dict[str, float]]]:
    """`algo=ppo`: the policy with a value head, trained on the policy stream."""
    policy = PolicyWithValue(x.policy_lm, x.cfg.model.n_embd).to(x.device)
    return policy.lm, train_ppo(policy, x.ref, x.rm, x.world, x.knobs, x.rng, x.gen, x.device, x.cfg.progress, x.on_iteration)
