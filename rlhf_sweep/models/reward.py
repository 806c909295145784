"""The reward model: preference pairs from the reference, labeled by the biased labelers, and
a Bradley-Terry ranking loss with optional centering and length decorrelation.

The RM is the SFT backbone with a scalar head read at the EOS position (as in
InstructGPT). Its scores are standardised by their mean and spread on reference
samples, so `rm/ref` is about 0 and PPO sees rewards of unit scale.

`EnsembleRM` puts K such models behind the same scoring interface and combines
them conservatively (Coste et al. 2023): mean - lambda * std across members, or
the worst case min; the combined score is standardised again on reference
samples, so it stays in the same std units as a single RM.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rlhf_sweep.config.schema import RMConfig
from rlhf_sweep.models.lm import hidden_states, last_index, response_mask, sample
from rlhf_sweep.simulation.world import World, label_pairs


class RewardModel(nn.Module):
    def __init__(self, lm: nn.Module, n_embd: int):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(n_embd, 1)
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def raw(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        h = hidden_states(self.lm, torch.cat([prompts, responses], 1))
        idx = prompts.shape[1] + last_index(responses)
        return self.head(h[torch.arange(len(h), device=h.device), idx]).squeeze(-1)

    def forward(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Standardised score: (raw - mean on reference samples) / std on reference samples."""
        return (self.raw(prompts, responses) - self.shift) / self.scale


def ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def centering_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Reward centering: mean((r_c + r_r)^2) keeps scores near zero (coef 0.01 in the literature)."""
    return ((r_chosen + r_rejected) ** 2).mean()


def length_corr(rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of rewards with lengths in a batch (0 when lengths are constant)."""
    r = rewards - rewards.mean()
    n = lengths.float() - lengths.float().mean()
    denom = torch.sqrt((r**2).sum() * (n**2).sum())
    return (r * n).sum() / denom.clamp(min=1e-8)


@dataclass
class Pairs:
    prompts: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    prefer_first: torch.Tensor  # the labeler's choice
    gold_first: torch.Tensor  # h(y1) - h(y2) > 0 (ties are excluded from gold accuracy)
    gold_diff: torch.Tensor
    len_first: torch.Tensor
    len_second: torch.Tensor

    def subset(self, idx: torch.Tensor) -> Pairs:
        return Pairs(*(getattr(self, f.name)[idx] for f in fields(self)))

    def chosen_rejected(self) -> tuple[torch.Tensor, torch.Tensor]:
        pf = self.prefer_first.bool()[:, None]
        return torch.where(pf, self.first, self.second), torch.where(pf, self.second, self.first)


def collect_pairs(
    ref: nn.Module,
    world: World,
    n: int,
    mode: str,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    batch: int = 1024,
) -> Pairs:
    """Two reference samples per prompt, labeled by the labelers.

    mode="length_matched" draws 4 samples per prompt and keeps the pair with the
    closest lengths, so that length carries less of the labelers' signal.
    """
    T = world.cfg.max_new_tokens
    prompts = world.sample_prompts(n, rng)
    k = 4 if mode == "length_matched" else 2
    draws = []
    for s in range(0, n, batch):
        p = prompts[s : s + batch].to(device).repeat_interleave(k, 0)
        draws.append(sample(ref, p, T, gen).cpu().view(-1, k, T))
    cand = torch.cat(draws)
    if k == 2:
        first, second = cand[:, 0], cand[:, 1]
    else:
        lens = torch.stack([world.features(prompts, cand[:, j])["length"] for j in range(k)], 1)
        ii, jj = torch.triu_indices(k, k, 1)
        gaps = (lens[:, ii] - lens[:, jj]).abs().float() + torch.from_numpy(rng.random((n, len(ii)))).float() * 0.1
        best = gaps.argmin(1)
        rows = torch.arange(n)
        first, second = cand[rows, ii[best]], cand[rows, jj[best]]
    f1, f2 = world.features(prompts, first), world.features(prompts, second)
    h1, h2 = world.gold(prompts, first, f1), world.gold(prompts, second, f2)
    y = label_pairs(h1, h2, f1, f2, world.cfg.labeler, rng)
    return Pairs(prompts, first, second, y, (h1 > h2).long(), h1 - h2, f1["length"], f2["length"])


@torch.no_grad()
def score(rm: RewardModel, prompts: torch.Tensor, responses: torch.Tensor, device: torch.device, batch: int = 2048) -> torch.Tensor:
    out = [rm(prompts[s : s + batch].to(device), responses[s : s + batch].to(device)).cpu() for s in range(0, len(prompts), batch)]
    return torch.cat(out)


@torch.no_grad()
def pair_accuracy(rm: RewardModel, pairs: Pairs, device: torch.device) -> dict[str, float]:
    """Held-out accuracy on the labelers' labels and on the gold order (gold ties excluded)."""
    d = score(rm, pairs.prompts, pairs.first, device) - score(rm, pairs.prompts, pairs.second, device)
    pred_first = (d > 0).long()
    acc_labels = (pred_first == pairs.prefer_first).float().mean().item()
    decided = pairs.gold_diff.abs() > 1e-6
    acc_gold = (pred_first[decided] == pairs.gold_first[decided]).float().mean().item()
    return {"rm/acc_labels": acc_labels, "rm/acc_gold": acc_gold}


def train_rm(
    rm: RewardModel,
    pairs: Pairs,
    cfg: RMConfig,
    rng: np.random.Generator,
    device: torch.device,
    progress: bool = True,
) -> dict[str, float]:
    chosen, rejected = pairs.chosen_rejected()
    pf = pairs.prefer_first.bool()
    len_c = torch.where(pf, pairs.len_first, pairs.len_second)
    len_r = torch.where(pf, pairs.len_second, pairs.len_first)
    width = int(max(response_mask(chosen).sum(1).max(), response_mask(rejected).sum(1).max()))
    chosen, rejected = chosen[:, :width], rejected[:, :width]  # PAD columns cost time, add nothing
    prompts, chosen, rejected = pairs.prompts.to(device), chosen.to(device), rejected.to(device)
    len_c, len_r = len_c.to(device), len_r.to(device)
    n = len(prompts)
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    rm.train()
    losses = []
    bar = tqdm(total=total, desc="reward model", disable=not progress, leave=False)
    for _ in range(cfg.epochs):
        perm = torch.from_numpy(rng.permutation(n)).to(device)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            # one forward for chosen and rejected together
            r = rm.raw(torch.cat([prompts[idx], prompts[idx]]), torch.cat([chosen[idx], rejected[idx]]))
            r_c, r_r = r.chunk(2)
            loss = ranking_loss(r_c, r_r)
            if cfg.center_coef > 0:
                loss = loss + cfg.center_coef * centering_loss(r_c, r_r)
            if cfg.length_decorr > 0:
                loss = loss + cfg.length_decorr * length_corr(r, torch.cat([len_c[idx], len_r[idx]])).abs()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
    bar.close()
    rm.eval()
    return {"rm/train_loss": float(np.mean(losses[-steps_per_epoch:]))}


@torch.no_grad()
def calibrate(rm: RewardModel, prompts: torch.Tensor, responses: torch.Tensor, device: torch.device) -> None:
    """Standardise scores on reference samples (PPO's value loss drops ~10x with it)."""
    rm.shift.zero_()
    rm.scale.fill_(1.0)
    s = score(rm, prompts, responses, device)
    rm.shift.fill_(s.mean().item())
    rm.scale.fill_(max(s.std().item(), 1e-6))


# ----- conservative ensembles -------------------------------------------------------------------
def aggregate(scores: torch.Tensor, agg: str, lam: float) -> torch.Tensor:
    """Combine member scores of shape (K, B): mean - lam * std (population std over members), min, or mean.

    Where members disagree (off the data they were trained on) the combined score drops,
    so PPO gains less from behaviour that only some members like.
    """
    if agg == "mean_std":
        return scores.mean(0) - lam * scores.std(0, unbiased=False)
    if agg == "min":
        return scores.min(0).values
    if agg == "mean":
        return scores.mean(0)
    raise ValueError(f"rm.ensemble_agg={agg!r} is invalid: rm.ensemble_agg accepts mean_std | min | mean")


class Standardiser(nn.Module):
    """Shift and scale of a combined score (its own module, so it caches apart from the members)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))


class EnsembleRM(nn.Module):
    """K reward models with RewardModel's interface: `rm(prompts, responses)` -> standardised score."""

    def __init__(self, members: list[RewardModel], agg: str, lam: float):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.agg, self.lam = agg, lam
        self.norm = Standardiser()

    @property
    def shift(self) -> torch.Tensor:
        return self.norm.shift

    @property
    def scale(self) -> torch.Tensor:
        return self.norm.scale

    def member_scores(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(prompts, responses) for m in self.members])

    def raw(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        return aggregate(self.member_scores(prompts, responses), self.agg, self.lam)

    def forward(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        return (self.raw(prompts, responses) - self.norm.shift) / self.norm.scale
