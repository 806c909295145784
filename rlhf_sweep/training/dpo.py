"""DPO and IPO: direct alignment on the labeled pairs, no RM in the loop (offline).

The data are the very pairs the RM is trained on (run.pipeline.labeled_pairs: the same labelers, the same
length and filler bias), chosen/rejected by the labelers' choice; the frozen SFT reference is the
reference. With s(y) = sum_t log pi(y_t) - log ref(y_t) over the response (EOS included):
  DPO (Rafailov et al. 2023, eq. 7; TRL loss_type="sigmoid"):
      loss = -log sigmoid(beta (s(y_w) - s(y_l)))
  IPO (Azar et al. 2023, eq. 17; TRL loss_type="ipo", beta is the paper's tau):
      h = s(y_w) / |y_w| - s(y_l) / |y_l|        (TRL normalises by the completion's tokens, as the authors did)
      loss = (h - 1 / (2 beta))^2
Both keep the policy near the reference only through beta: the implicit reward beta s(y) is what grows,
and Rafailov et al. (2024) find gold rising then falling with KL here too.

One iteration is `steps_per_iteration` optimizer steps on `batch_size` pairs each (epochs over the
shuffled pairs as needed); after it, `monitor_size` policy samples on fresh prompts give the history's
shared keys (RM score, gold, length, KL), so a DPO run has the same trajectory, verdicts and figures as
an RL run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rlhf_sweep.config.algorithms import DPOConfig
from rlhf_sweep.models.lm import lm_logits, response_logits, response_mask, token_logprobs
from rlhf_sweep.models.reward import Pairs, RewardModel
from rlhf_sweep.simulation.world import World
from rlhf_sweep.training.core import AlgorithmInputs, sample_and_score, sample_stats

LOSS_TYPES = {"dpo": "sigmoid", "ipo": "ipo"}  # algo -> TRL's loss_type


# ----- the maths: pure functions -------------------------------------------------------------
def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss -log sigmoid(beta (s_w - s_l)), s = summed log pi - log ref of a response."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_tokens: torch.Tensor,
             rejected_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss (s_w/|y_w| - s_l/|y_l| - 1/(2 beta))^2 (beta = IPO's tau)."""
    h = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    return (h - 1.0 / (2.0 * beta)) ** 2


def pair_loss(loss_type: str, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    if loss_type == "sigmoid":
        return dpo_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "ipo":
        return ipo_loss(chosen_logratios, rejected_logratios, chosen_tokens, rejected_tokens, beta)
    raise ValueError(f"DPO loss_type {loss_type!r}: accepts sigmoid (algo=dpo) | ipo (algo=ipo)")


def sequence_logprobs(lm: nn.Module, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) over each response's tokens up to and including EOS."""
    logits = response_logits(lm_logits(lm, torch.cat([prompts, responses], 1)))
    return (token_logprobs(logits, responses) * response_mask(responses)).sum(-1)


# ----- the trainer ---------------------------------------------------------------------------
def train_dpo(
    lm: nn.Module,
    ref: nn.Module,
    rm: RewardModel,
    world: World,
    pairs: Pairs,
    cfg: DPOConfig,
    loss_type: str,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    progress: bool = True,
    on_iteration: Callable[[int, dict, dict], None] | None = None,
) -> list[dict[str, float]]:
    """cfg.iterations DPO/IPO steps on `lm` from the labeled `pairs`; `rm` only scores the monitoring
    samples. One history entry per iteration: the shared keys and dpo/* (beta; the iteration's step means of
    loss, rewards_chosen, rewards_rejected, reward_margin, reward_accuracy (implicit rewards, TRL's names) and
    gold_accuracy (how often the labelers' choice is also gold's))."""
    chosen, rejected = pairs.chosen_rejected()
    width = int(max(response_mask(chosen).sum(1).max(), response_mask(rejected).sum(1).max()))
    prompts = pairs.prompts.to(device)
    chosen, rejected = chosen[:, :width].to(device), rejected[:, :width].to(device)  # PAD columns cost time, add nothing
    tok_c, tok_r = response_mask(chosen).sum(1), response_mask(rejected).sum(1)
    # does the labelers' choice agree with gold? (gold ties excluded; the pairs' label noise DPO learns from)
    chose_gold_better = torch.where(pairs.prefer_first.bool(), pairs.gold_diff, -pairs.gold_diff).to(device)
    n = len(prompts)
    with torch.no_grad():  # the reference is frozen: its log-probs once
        ref_c = torch.cat([sequence_logprobs(ref, prompts[s : s + 2048], chosen[s : s + 2048]) for s in range(0, n, 2048)])
        ref_r = torch.cat([sequence_logprobs(ref, prompts[s : s + 2048], rejected[s : s + 2048]) for s in range(0, n, 2048)])
    opt = torch.optim.Adam(lm.parameters(), lr=cfg.lr, eps=1e-5, fused=True)
    order, pos = torch.from_numpy(rng.permutation(n)).to(device), 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.iterations), desc=loss_type.upper() if loss_type == "ipo" else "DPO", disable=not progress, leave=False)
    for it in bar:
        lm.eval()  # no dropout anywhere; eval() only documents it
        steps: dict[str, list[float]] = {}
        for _ in range(cfg.steps_per_iteration):
            if pos + cfg.batch_size > n:  # next epoch
                order, pos = torch.from_numpy(rng.permutation(n)).to(device), 0
            idx = order[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            # chosen and rejected in one forward
            logps = sequence_logprobs(lm, torch.cat([prompts[idx], prompts[idx]]), torch.cat([chosen[idx], rejected[idx]]))
            pol_c, pol_r = logps.chunk(2)
            s_c, s_r = pol_c - ref_c[idx], pol_r - ref_r[idx]
            loss = pair_loss(loss_type, s_c, s_r, tok_c[idx], tok_r[idx], cfg.beta).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(lm.parameters(), cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                margin = cfg.beta * (s_c - s_r)
                decided = chose_gold_better[idx].abs() > 1e-6
                for k, v in {"loss": loss.item(), "rewards_chosen": (cfg.beta * s_c).mean().item(),
                             "rewards_rejected": (cfg.beta * s_r).mean().item(), "reward_margin": margin.mean().item(),
                             "reward_accuracy": (margin > 0).float().mean().item(),
                             "gold_accuracy": (chose_gold_better[idx][decided] > 0).float().mean().item()
                             if bool(decided.any()) else float("nan")}.items():
                    steps.setdefault(k, []).append(v)
        stats = {"dpo/beta": cfg.beta, **{f"dpo/{k}": float(np.nanmean(v)) if not all(map(np.isnan, v)) else float("nan")
                                         for k, v in steps.items()}}
        monitor = sample_and_score(lm, ref, rm, world.sample_prompts(cfg.monitor_size, rng).to(device), world.cfg.max_new_tokens,
                                   gen, cfg.temperature)
        cpu = {k: v.detach().cpu() for k, v in monitor.items() if k not in ("logits", "hidden", "ref_logits")}
        entry = {"iteration": it, **sample_stats(world, cpu), **stats}
        history.append(entry)
        if on_iteration is not None:
            on_iteration(it, entry, cpu)
        bar.set_postfix(rm=f"{entry['rm']:.2f}", gold=f"{entry['gold']:.2f}", kl=f"{entry['kl/exact']:.2f}")
    return history


def train(x: AlgorithmInputs) -> tuple[nn.Module, list[dict[str, float]]]:
    """`algo=dpo` and `algo=ipo`: offline on the RM's own labeled pairs, with the loss the algorithm names."""
    pairs = x.labeled_pairs()
    return x.policy_lm, train_dpo(x.policy_lm, x.ref, x.rm, x.world, pairs, x.knobs, LOSS_TYPES[x.cfg.algo], x.rng, x.gen, x.device,
                                  x.cfg.progress, x.on_iteration)
