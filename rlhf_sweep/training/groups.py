"""What RLOO and GRPO share: several completions per prompt, no critic, and the TRL update schedule.

Per iteration: `batch_size / num_generations` prompts, each sampled `num_generations` times
(rows of one prompt are adjacent: row i belongs to group i // num_generations); the RM's score
per completion; a per-sequence advantage from the group (the trainer's own rule: rloo.py,
grpo.py); then `num_iterations` passes (TRL's mu) over the batch, each shuffled once per
generation and split into `steps_per_generation` optimizer steps, as TRL's trainers do.
The per-step loss is the trainer's; its statistics are averaged into the history entry, which
also carries the keys every trainer shares (core.sample_stats).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_sweep.models.lm import lm_logits, response_logits
from rlhf_sweep.models.reward import RewardModel
from rlhf_sweep.simulation.world import World
from rlhf_sweep.training.core import entropy_from_logprobs, masked_mean, sample_and_score, sample_stats

# loss(batch, idx, logp) -> (loss, {statistic: value}); logp: full-vocabulary log-probs of the
# minibatch's response positions under the current policy (with gradients)
LossFn = Callable[[dict, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def group_rollout(
    lm: nn.Module, ref: nn.Module, rm: RewardModel, world: World, batch_size: int, num_generations: int,
    temperature: float, rng: np.random.Generator, gen: torch.Generator, device: torch.device,
) -> dict[str, torch.Tensor]:
    """`batch_size` completions: `num_generations` per prompt, the rows of a prompt adjacent."""
    prompts = world.sample_prompts(batch_size // num_generations, rng).repeat_interleave(num_generations, 0).to(device)
    return sample_and_score(lm, ref, rm, prompts, world.cfg.max_new_tokens, gen, temperature)


def updates(
    lm: nn.Module, opt: torch.optim.Optimizer, batch: dict, loss_fn: LossFn, num_iterations: int, steps: int,
    max_grad_norm: float, rng: np.random.Generator,
) -> dict[str, float]:
    """mu passes over one generation batch, `steps` minibatch steps each; returns the mean statistics
    (those of `loss_fn`, plus entropy and approx_kl = mean 0.5 (log pi - log pi_old)^2 per token)."""
    n = batch["seqs"].shape[0]
    mb = n // steps
    order = torch.from_numpy(rng.permutation(n)).to(batch["seqs"].device)  # once per generation, as TRL shuffles
    stats: dict[str, list[float]] = {}
    for _ in range(num_iterations):
        for s in range(steps):
            idx = order[s * mb : (s + 1) * mb]
            m = batch["mask"][idx]
            logp = torch.log_softmax(response_logits(lm_logits(lm, batch["seqs"][idx])).float(), -1)
            loss, st = loss_fn(batch, idx, logp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(lm.parameters(), max_grad_norm)
            opt.step()
            with torch.no_grad():
                logprobs = logp.gather(-1, batch["responses"][idx].unsqueeze(-1)).squeeze(-1)
                st["approx_kl"] = masked_mean(0.5 * (logprobs - batch["logprobs"][idx]) ** 2, m).item()
                st["entropy"] = masked_mean(entropy_from_logprobs(logp), m).item()
                st["loss"] = loss.item()
            for k, v in st.items():
                stats.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in stats.items()}


def train_groups(
    name: str,
    lm: nn.Module,
    ref: nn.Module,
    rm: RewardModel,
    world: World,
    cfg,
    advantages: Callable[[dict], tuple[torch.Tensor, dict[str, float]]],
    loss_fn: LossFn,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    progress: bool = True,
    on_iteration: Callable[[int, dict, dict], None] | None = None,
) -> list[dict[str, float]]:
    """The loop of a critic-free group trainer (`name`: rloo | grpo, the prefix of its statistics).

    `advantages(batch)` -> (per-sequence advantages, statistics); it may add tensors to the batch
    (e.g. per-token KL) that `loss_fn` reads. Returns one history entry per iteration.
    """
    opt = torch.optim.Adam(lm.parameters(), lr=cfg.lr, eps=1e-5, fused=True)
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.iterations), desc=name.upper(), disable=not progress, leave=False)
    for it in bar:
        lm.eval()  # no dropout anywhere; eval() only documents it
        batch = group_rollout(lm, ref, rm, world, cfg.batch_size, cfg.num_generations, cfg.temperature, rng, gen, device)
        adv, adv_stats = advantages(batch)
        batch["seq_advantages"] = adv
        # per-token advantages for the diagnosis (evaluate.advantage_record): the sequence's, on each of its tokens
        batch["advantages"] = adv[:, None] * batch["mask"]
        stats = updates(lm, opt, batch, loss_fn, cfg.num_iterations, cfg.steps_per_generation, cfg.max_grad_norm, rng)
        cpu = {k: v.detach().cpu() for k, v in batch.items() if k not in ("logits", "hidden", "ref_logits")}
        entry = {"iteration": it, **sample_stats(world, cpu), f"{name}/beta": cfg.beta,
                 **{f"{name}/{k}": v for k, v in {**adv_stats, **stats}.items()}}
        history.append(entry)
        if on_iteration is not None:
            on_iteration(it, entry, cpu)
        bar.set_postfix(rm=f"{entry['rm']:.2f}", gold=f"{entry['gold']:.2f}", kl=f"{entry['kl/exact']:.2f}")
    return history
