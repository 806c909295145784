"""PPO for language models, top to bottom (Ziegler et al. 2019; Ouyang et al. 2022).

Per iteration: sample one completion per prompt from the policy; score it with
the RM at its EOS; build per-token rewards `-beta * kl_t` (+ `length_bonus` per
content token) with the RM score added at the last token; GAE (gamma 1,
lambda 0.95); whitened advantages; then several epochs of minibatch updates of
the clipped surrogate plus a clipped value loss. The KL penalty sees only the
log-probabilities of the sampled tokens (unless kl_estimator=exact), and its
sequence total grows with length: that is what `kl/exact` and friends measure.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import kl as klmod
from .config import PPOConfig
from .models import PolicyWithValue, lm_logits, response_logits, response_mask, sample, token_logprobs
from .reward import RewardModel
from .world import PROMPT_LEN, World


# ----- the maths: pure functions -------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


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


def surrogate_terms(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element PPO-clip loss max(-A r, -A clip(r, 1-eps, 1+eps_high)) and where the clip binds.

    Elements are tokens (PPO, GRPO) or whole sequences (RLOO: log-probs summed over the response);
    the caller aggregates. eps_high defaults to eps (DAPO's asymmetric clip when it differs).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    loss_unclipped = -advantages * ratio
    high = clip_eps if clip_eps_high is None else clip_eps_high
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    return torch.max(loss_unclipped, loss_clipped), loss_clipped > loss_unclipped


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


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """Per-token entropy from full-vocabulary log-probabilities."""
    return -(logp.exp() * logp).sum(-1)


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


# ----- rollouts ---------------------------------------------------------------------------------
@torch.no_grad()
def sample_and_score(
    lm: nn.Module, ref: nn.Module, rm: RewardModel, prompts: torch.Tensor, max_new_tokens: int, gen: torch.Generator,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Policy samples for `prompts` with what every trainer reads from them: log-probs under the policy
    and the reference, the reference's logits, exact per-token KL and the RM's scores.

    The sampling pass already computed the policy's logits and hidden states for every response
    token: log-probs, exact KL and values come from it, with no second policy forward.
    """
    responses, logits, hidden = sample(lm, prompts, max_new_tokens, gen, temperature, with_states=True)
    seqs = torch.cat([prompts, responses], 1)
    ref_logits = response_logits(lm_logits(ref, seqs))
    return dict(
        prompts=prompts, responses=responses, seqs=seqs, mask=response_mask(responses), logits=logits, hidden=hidden,
        ref_logits=ref_logits, logprobs=token_logprobs(logits, responses), ref_logprobs=token_logprobs(ref_logits, responses),
        kl_exact=klmod.exact(logits, ref_logits), scores=rm(prompts, responses),
    )


def sample_stats(world: World, cpu: dict[str, torch.Tensor]) -> dict[str, float]:
    """The history keys every trainer shares, from one batch of policy samples (on the CPU):
    mean RM score, gold, length, filler, and the sequence KL (exact, k1, k3; nats) and exact KL per token."""
    feats = world.features(cpu["prompts"], cpu["responses"])
    m = cpu["mask"]
    kl_seq = klmod.sequence_sum(cpu["kl_exact"], m)
    return {
        "rm": cpu["scores"].mean().item(),
        "gold": world.gold(cpu["prompts"], cpu["responses"], feats).mean().item(),
        "len": feats["length"].float().mean().item(),
        "filler": feats["filler"].float().mean().item(),
        "kl/exact": kl_seq.mean().item(),
        "kl/k1": klmod.sequence_sum(klmod.k1(cpu["logprobs"], cpu["ref_logprobs"]), m).mean().item(),
        "kl/k3": klmod.sequence_sum(klmod.k3(cpu["logprobs"], cpu["ref_logprobs"]), m).mean().item(),
        "kl/exact_per_token": (kl_seq.sum() / m.sum()).item(),
    }


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
    kl_t = kl_exact if cfg.kl_estimator == "exact" else klmod.per_token(cfg.kl_estimator, logprobs, ref_logprobs)
    last = (mask.sum(1) - 1).long()
    rows = torch.arange(len(last), device=device)
    content = mask.clone()
    content[rows, last] = 0.0  # EOS is not a content token
    rewards = cfg.length_bonus * content
    if cfg.kl_in == "reward":
        rewards = rewards - beta * kl_t * mask
    rewards[rows, last] += scores
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    return dict(
        prompts=prompts, responses=responses, seqs=seqs, mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
        ref_logits=ref_logits, values=values, advantages=advantages, returns=returns, rewards=rewards,
        scores=raw_scores, scores_used=scores, kl_exact=kl_exact, kl_t=kl_t,
    )


def update(
    policy: PolicyWithValue, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], cfg: PPOConfig, beta: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Epochs of minibatch steps on one rollout; returns the iteration's mean statistics."""
    n = batch["seqs"].shape[0]
    mb = n // cfg.minibatches
    stats: dict[str, list[float]] = {k: [] for k in ("clipfrac", "approx_kl", "entropy", "value_loss", "pg_loss")}
    for _ in range(cfg.epochs):
        perm = torch.from_numpy(rng.permutation(n)).to(batch["seqs"].device)
        for s in range(cfg.minibatches):
            idx = perm[s * mb : (s + 1) * mb]
            m = batch["mask"][idx]
            logits, values = policy(batch["seqs"][idx])
            logits, values = response_logits(logits), values[:, PROMPT_LEN - 1 : -1]
            logp = torch.log_softmax(logits.float(), -1)  # once, for the log-probs and the entropy
            logprobs = logp.gather(-1, batch["responses"][idx].unsqueeze(-1)).squeeze(-1)
            pg_loss, clipfrac = clipped_surrogate(logprobs, batch["logprobs"][idx], batch["advantages"][idx], m, cfg.clip_eps)
            vf_loss = clipped_value_loss(values, batch["values"][idx], batch["returns"][idx], m, cfg.vf_clip)
            with torch.set_grad_enabled(cfg.ent_coef != 0):  # a logged statistic unless it is in the loss
                entropy = masked_mean(entropy_from_logprobs(logp), m)
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
            if cfg.kl_in == "loss":
                kl_t = klmod.per_token(cfg.kl_estimator, logprobs, batch["ref_logprobs"][idx], logits, batch["ref_logits"][idx])
                loss = loss + beta * masked_mean(kl_t, m)
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
            "ppo/beta": beta,
            "ppo/non_score_reward": (cpu["rewards"].sum(1) - cpu["scores_used"]).mean().item(),
            **stats,
        }
        history.append(entry)
        if on_iteration is not None:
            on_iteration(it, entry, cpu)
        if cfg.adaptive_kl:
            kl_pen = klmod.sequence_sum(cpu["kl_t"], m).mean().item()
            beta = klmod.adaptive_beta(beta, kl_pen, cfg.target_kl, cfg.batch_size, cfg.horizon)
        bar.set_postfix(rm=f"{entry['rm']:.2f}", gold=f"{entry['gold']:.2f}", kl=f"{entry['kl/exact']:.2f}")
    return history
