"""Best-of-n as an algorithm: the RM picks the best of n reference samples; nothing is trained.

`evaluate_bon` (run by `evaluate`, this algorithm's entry point) is the held-out evaluation of the
best-of-n policy on the same prompts and with the same metric keys as `evaluation.metrics.evaluate`
(RM score, gold, win rates, length, filler, KL):
- each held-out prompt gets `samples_per_prompt` (M >= n) reference samples;
- the policy's metrics are the unbiased best-of-n estimates over them (best_of_n.bon_estimate: the RM's
  choice among n samples, averaged over every n-subset of the M), the reference's their plain means,
  and the win rates the best-of-n choice's chance of beating another reference sample of its prompt;
- `kl/exact` is the exact KL of best-of-n from the empirical distribution of the M samples (identical
  responses merged, RM ties handled: best_of_n.bon_exact_kl, Beirami et al. 2024), averaged over prompts; the
  upper bound log n - (n-1)/n is `kl/bon_bound`. Here responses repeat (short, templated answers), so the
  exact KL saturates at -log p(the RM's favourite) where the bound keeps growing;
- the sampled estimators `kl/k1`, `kl/k3` do not apply (best-of-n has no per-token log-probabilities): NaN.
The history walks n' = 1, 2, 4, ..., n on the same samples: best-of-n' is the path along which selection
pressure grows, as PPO's iterations are (one entry per n', `bon/n` its n').
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_sweep.config.algorithms import BoNConfig
from rlhf_sweep.config.schema import config_hash
from rlhf_sweep.maths import best_of_n
from rlhf_sweep.maths.stats import mean_ci
from rlhf_sweep.models.lm import response_mask, sample
from rlhf_sweep.models.reward import RewardModel, score
from rlhf_sweep.simulation.world import World
from rlhf_sweep.training.core import AlgorithmInputs

SAMPLE_CHUNK = 4096  # sequences per sampling call


def path(n: int) -> list[int]:
    """The n' of the history: powers of two below n, then n."""
    return sorted({2**k for k in range(int(math.log2(n)) + 1) if 2**k <= n} | {n})


def win_probability(x: np.ndarray) -> np.ndarray:
    """For each entry of each row: the share of the row's other entries it beats (ties count half)."""
    x = np.asarray(x, dtype=float)
    out = np.empty_like(x)
    M = x.shape[1]
    for i, row in enumerate(x):
        s = np.sort(row)
        below = np.searchsorted(s, row, side="left")
        equal = np.searchsorted(s, row, side="right") - below - 1  # itself excluded
        out[i] = (below + 0.5 * equal) / (M - 1)
    return out


def exact_kls(ids: np.ndarray, rm: np.ndarray, n: int) -> np.ndarray:
    """Per row (prompt): KL(best-of-n || the row's empirical distribution), identical responses (same id) merged."""
    out = np.empty(len(ids))
    for i, (row_ids, row_rm) in enumerate(zip(ids, rm, strict=True)):
        uniq, first, counts = np.unique(row_ids, return_index=True, return_counts=True)
        out[i] = best_of_n.bon_exact_kl(counts / counts.sum(), row_rm[first], n)
    return out


@torch.no_grad()
def evaluate_bon(
    ref: nn.Module,
    rm: RewardModel,
    world: World,
    cfg: BoNConfig,
    n_prompts: int,
    confidence: float,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    progress: bool = True,
    cache: Callable[[Callable[[], dict]], dict] | None = None,
) -> tuple[dict[str, float], dict, list[dict[str, float]]]:
    """Metrics (evaluate's keys, plus kl/bon_bound, bon/*), samples for the diagnosis, and the history over n'.

    cache(make) returns the reference samples and their RM scores, calling make() only when they are not
    stored yet (pipeline passes one keyed by the reference, the RM, the seed, the prompts and M)."""
    T, M, n = world.cfg.max_new_tokens, cfg.samples_per_prompt, cfg.n
    prompts = world.sample_prompts(n_prompts, rng)  # the held-out prompts of evaluation.metrics.evaluate (same stream, first draw)
    rep = prompts.repeat_interleave(M, 0)

    def make() -> dict[str, torch.Tensor]:
        chunks = range(0, len(rep), SAMPLE_CHUNK)
        responses = torch.cat([sample(ref, rep[s : s + SAMPLE_CHUNK].to(device), T, gen).cpu()
                               for s in tqdm(chunks, desc="best-of-n samples", disable=not progress, leave=False)])
        # identical responses of a prompt are one outcome of its distribution: one id, one RM score
        prompt_id = torch.arange(n_prompts).repeat_interleave(M)
        uniq, ids = torch.unique(torch.cat([prompt_id[:, None], responses], 1), dim=0, return_inverse=True)
        return {"responses": responses.to(torch.int16), "ids": ids, "rm": score(rm, prompts[uniq[:, 0]], uniq[:, 1:], device)[ids]}

    # they depend on the reference, the RM, the prompts and M, not on n: runs with several n share them (int16: 1/4 the disk)
    drawn = cache(make) if cache is not None else make()
    responses, ids, rm_all = drawn["responses"].long(), drawn["ids"], drawn["rm"]
    f = world.features(rep, responses)
    side = {"rm": rm_all.numpy(), "gold": world.gold(rep, responses, f).numpy(), "length": f["length"].numpy(),
            "filler": f["filler"].numpy(), "tokens": response_mask(responses).sum(1).numpy(),
            "has_correct": f["has_correct"].numpy(), "first_correct": f["first_correct"].numpy(),
            "n_wrong": f["n_wrong"].numpy(), "ended": f["ended"].numpy()}
    A = {k: np.asarray(v, dtype=float).reshape(n_prompts, M) for k, v in side.items()}
    A["directed"] = A["first_correct"] * A["has_correct"]
    A["wrong"] = (A["n_wrong"] > 0).astype(float)
    ids = ids.numpy().reshape(n_prompts, M)

    def bon(key: str, k: int = n) -> np.ndarray:
        """Per-prompt unbiased best-of-k estimate of A[key] (RM-chosen)."""
        return best_of_n.bon_estimate(A["rm"], A[key], k)

    m: dict[str, float] = {}
    for key in ("rm", "gold"):
        m[f"{key}/policy"], m[f"{key}/policy_lo"], m[f"{key}/policy_hi"] = mean_ci(bon(key), confidence)
        m[f"{key}/ref"], m[f"{key}/ref_lo"], m[f"{key}/ref_hi"] = mean_ci(A[key].mean(1), confidence)
        wins = best_of_n.bon_estimate(A["rm"], win_probability(A[key]), n)
        m[f"{key}/win_rate"], m[f"{key}/win_rate_lo"], m[f"{key}/win_rate_hi"] = mean_ci(wins, confidence)
    for name, mean_of in (("policy", bon), ("ref", lambda key: A[key].mean(1))):
        m[f"len/{name}"] = float(mean_of("length").mean())
        m[f"filler/{name}"] = float(mean_of("filler").mean())
        has = float(mean_of("has_correct").sum())
        m[f"directness/{name}"] = float(mean_of("directed").sum()) / has if has > 0 else float("nan")
        m[f"correct/{name}"] = float(mean_of("has_correct").mean())
        m[f"wrong/{name}"] = float(mean_of("wrong").mean())
        m[f"ended/{name}"] = float(mean_of("ended").mean())
    kls = exact_kls(ids, A["rm"], n)
    m["kl/exact"] = float(kls.mean())
    m["kl/k1"] = m["kl/k3"] = float("nan")
    m["kl/exact_per_token"] = m["kl/exact"] / float(bon("tokens").mean())
    m["kl/bon_bound"] = float(best_of_n.bon_kl(n))
    m["bon/n"] = float(n)
    m["bon/samples_per_prompt"] = float(M)
    m["bon/distinct_per_prompt"] = float(np.mean([len(np.unique(r)) for r in ids]))

    history = []
    for i, k in enumerate(path(n)):
        kl_k = exact_kls(ids, A["rm"], k).mean()
        history.append({"iteration": i, "rm": float(bon("rm", k).mean()), "gold": float(bon("gold", k).mean()),
                        "len": float(bon("length", k).mean()), "filler": float(bon("filler", k).mean()),
                        "kl/exact": float(kl_k), "kl/exact_per_token": float(kl_k / bon("tokens", k).mean()),
                        "kl/bon_bound": float(best_of_n.bon_kl(k)), "bon/n": float(k)})

    # one concrete realisation for the examples and the diagnosis: the RM's choice among the first n samples
    # of each prompt, and the first sample as the reference's answer
    first = np.arange(n_prompts) * M
    pick = first + A["rm"][:, :n].argmax(1)
    one = {k: v for k, v in side.items() if k in ("rm", "gold", "length", "filler")}
    samples = {"prompts": prompts, "policy": responses[pick], "ref": responses[first],
               "P": {k: v[pick] for k, v in one.items()}, "R": {k: v[first] for k, v in one.items()}, "kl": None}
    return m, samples, history


def samples_key(x: AlgorithmInputs) -> str:
    """The cache name of best-of-n's reference samples and RM scores: the reference and RM (the RM's key),
    the held-out prompts (seed, eval.n_prompts) and samples per prompt; not n."""
    return "bonsamples-" + config_hash(x.rm_key, x.cfg.seed, x.cfg.eval.n_prompts, x.knobs.samples_per_prompt)


def evaluate(x: AlgorithmInputs) -> tuple[dict[str, float], dict, list[dict[str, float]]]:
    """`algo=bon`: the held-out evaluation of best-of-n on the evaluation stream (nothing to train)."""
    key = samples_key(x)
    return evaluate_bon(x.ref, x.rm, x.world, x.knobs, x.cfg.eval.n_prompts, x.cfg.eval.confidence, x.rng, x.gen, x.device,
                        x.cfg.progress, lambda make: x.cached_tensors(key, make))
