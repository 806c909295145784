"""What every algorithm shares: `AlgorithmInputs` (what the pipeline hands an algorithm module's `train` or
`evaluate`), masked means, the clipped-ratio surrogate terms, token entropies, sampling a batch and scoring
it with the RM and the gold score, and the per-batch statistics every history entry carries. The algorithm
modules of this package import from here, never from each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rlhf_sweep.config.schema import Config
from rlhf_sweep.maths import kl as klmod
from rlhf_sweep.models.lm import lm_logits, response_logits, response_mask, sample, token_logprobs
from rlhf_sweep.models.reward import Pairs, RewardModel
from rlhf_sweep.simulation.world import World


@dataclass
class AlgorithmInputs:
    """What the pipeline hands an algorithm module: `train(inputs) -> (policy LM, history)`, or, for one that
    trains nothing, `evaluate(inputs) -> (metrics, samples, history)` (config/algorithms.py)."""

    cfg: Config
    knobs: object  # the algorithm's knobs section of cfg (its Algorithm card's `section`)
    world: World
    ref: nn.Module  # the frozen SFT reference
    rm: nn.Module  # the frozen reward model (or ensemble) that the algorithm optimizes against
    device: torch.device
    rng: np.random.Generator  # train: the run's policy stream; evaluate: its evaluation stream
    gen: torch.Generator
    policy_lm: nn.Module | None  # train: a trainable copy of the reference, to return trained; evaluate: None
    on_iteration: Callable[[int, dict, dict], None]  # (iteration, history entry, batch) after each entry
    labeled_pairs: Callable[[], Pairs]  # the RM's labeled training pairs, drawn when called (offline algorithms)
    cached_tensors: Callable[[str, Callable[[], dict]], dict]  # (name, make): make()'s tensors, kept under cache_dir by name
    rm_key: str  # the RM's cache key, to key what is derived from the RM


# ----- the maths: pure functions -------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


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


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """Per-token entropy from full-vocabulary log-probabilities."""
    return -(logp.exp() * logp).sum(-1)


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
    if temperature != 1:  # the distributions sampled from (the reference's at the same temperature)
        logits, ref_logits = logits / temperature, ref_logits / temperature
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
