"""KL between the policy and the frozen reference: sampled estimators, exact KL, the penalties, the controller.

With r = ref(y_t) / pi(y_t) on a sampled token (Schulman's notation):
  k1 = -log r            unbiased, but negative on many tokens near the reference
  k2 = (log r)^2 / 2     biased, >= 0
  k3 = (r - 1) - log r   unbiased, >= 0
Exact per-token KL needs the full distribution: sum_v pi(v) (log pi(v) - log ref(v)).
The sequence KL is the sum over response tokens, so it grows with length.

An unbiased *value* is not an unbiased *gradient* (Tang & Munos 2025; "A Comedy of
Estimators" 2025). `PENALTIES` declares, for every (ppo.kl_estimator, ppo.kl_in) pair that
runs, what its expected update is the gradient of; tests/test_kl_gradients.py checks each
declaration by exact enumeration on a tabular world. Notation: s_t = (x, y_<t),
KL_t(s) = KL(pi(.|s) || ref(.|s)), and the sequence KL is E_pi[sum_t KL_t(s_t)]. Its gradient
has two parts: the direct one, sum_t E[grad KL_t(s_t)] with the states held fixed (what a
per-token loss gives), and the future one, sum_t E[grad log pi(y_t|s_t) sum_{t'>t} KL_t'(s_t')]
(how y_t changes the later states; what a penalty inside the return gives).

The maths below uses tensor methods only, so that rlhf_sweep.config.schema can import the declarations
without loading torch (a bad config then fails in a fraction of a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ESTIMATORS = ("k1", "k2", "k3", "exact")
PLACEMENTS = ("reward", "loss", "both")
GRADIENTS = ("unbiased", "partial", "biased")

# what a declaration's `target` is made of (each a gradient, at the sampling policy)
PARTS = {
    "seq": "grad of the sequence KL(pi || ref)",
    "rev_tok": "sum over positions of grad KL(pi(.|s_t) || ref(.|s_t)) with the states held fixed",
    "fwd_tok": "sum over positions of grad KL(ref(.|s_t) || pi(.|s_t)) with the states held fixed",
}


@dataclass(frozen=True)
class Penalty:
    """One (ppo.kl_estimator, ppo.kl_in) combination and what its expected update descends.

    gradient: unbiased (the gradient of the sequence KL(pi || ref)), partial (per token, blind to
    how a token changes the later states) or biased (the gradient of something else: `minimizes`).
    target: the same statement as signed PARTS, for the enumeration test.
    """

    estimator: str
    placement: str
    gradient: str
    minimizes: str
    target: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        return f"{self.placement}_{self.estimator}"

    @property
    def in_reward(self) -> bool:
        """Charged per token inside the return (the RM score's currency)."""
        return self.placement in ("reward", "both")

    @property
    def in_loss(self) -> bool:
        """Differentiated directly, as a term of the PPO loss."""
        return self.placement in ("loss", "both")


_FUTURE = "each token's effect on the later positions' KL"
PENALTIES: dict[tuple[str, str], Penalty] = {
    (p.estimator, p.placement): p
    for p in (
        Penalty("k1", "reward", "unbiased", "the sequence KL(pi || ref) (InstructGPT's per-token penalty in the return)",
                (("seq", 1),)),
        Penalty("exact", "both", "unbiased", "the sequence KL(pi || ref): the exact per-position gradient in the loss "
                "plus the later positions' exact KL in the return", (("seq", 1),)),
        Penalty("k2", "loss", "partial", f"the reverse KL(pi || ref) per token, blind to {_FUTURE}", (("rev_tok", 1),)),
        Penalty("exact", "loss", "partial", f"the reverse KL(pi || ref) per position, blind to {_FUTURE}", (("rev_tok", 1),)),
        Penalty("k3", "reward", "biased", "the sequence KL(pi || ref) minus the forward KL(ref || pi) per token",
                (("seq", 1), ("fwd_tok", -1))),
        Penalty("exact", "reward", "biased", f"only {_FUTURE}: the per-token charge does not depend on the sampled token, "
                "so nothing pulls pi(.|s_t) itself toward ref(.|s_t)", (("seq", 1), ("rev_tok", -1))),
        Penalty("k1", "loss", "biased", "nothing: its expected gradient E_pi[grad log pi] is 0, so it adds only noise", ()),
        Penalty("k3", "loss", "biased", "the forward KL(ref || pi) per token (GRPO's penalty; no importance ratio after "
                "the first minibatch)", (("fwd_tok", 1),)),
    )
}

# pairs that do not run, and why (config.validate says so in one line)
REFUSED = {
    ("k2", "reward"): "k2 in the reward is biased both as a value of KL and as a gradient; k2 belongs in the loss (kl_in=loss)",
    **{(e, "both"): "kl_in=both completes the exact penalty only (kl_estimator=exact); with sampled tokens reward+k1 "
       "already has the full gradient" for e in ("k1", "k2", "k3")},
}


def accepted() -> str:
    """Every combination that runs, with its declared gradient: the tail of every KL config error."""
    order = sorted(PENALTIES.values(), key=lambda p: GRADIENTS.index(p.gradient))
    return "combinations (kl_in+kl_estimator): " + ", ".join(f"{p.placement}+{p.estimator} {p.gradient}" for p in order)


def penalty(estimator: str, placement: str) -> Penalty:
    """The declaration of a combination; ValueError (one line) for one that does not run."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"ppo.kl_estimator={estimator!r} is invalid: ppo.kl_estimator accepts {' | '.join(ESTIMATORS)}; {accepted()}")
    if placement not in PLACEMENTS:
        raise ValueError(f"ppo.kl_in={placement!r} is invalid: ppo.kl_in accepts {' | '.join(PLACEMENTS)}; {accepted()}")
    if (estimator, placement) in REFUSED:
        raise ValueError(f"ppo.kl_in={placement} with ppo.kl_estimator={estimator} does not run: "
                         f"{REFUSED[estimator, placement]}; {accepted()}")
    return PENALTIES[estimator, placement]


def warning(p: Penalty) -> str | None:
    """The one line a run prints when its penalty does not follow the gradient of the sequence KL."""
    if p.gradient == "unbiased":
        return None
    return (f"warning: ppo.kl_in={p.placement} with ppo.kl_estimator={p.estimator} has a {p.gradient} KL gradient: it "
            f"minimizes {p.minimizes}, not the sequence KL(pi || ref) (unbiased: kl_in=reward with k1, kl_in=both with exact)")


# ----- the maths ---------------------------------------------------------------------------------
def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_logprobs - logprobs) ** 2


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_r = ref_logprobs - logprobs
    return log_r.expm1() - log_r


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    # half-precision logits (a GPU's bf16) are summed in float32; float64 (the exactness tests) stays
    return x if x.dtype.itemsize >= 4 else x.float()


def exact(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(pi || ref) at every position, from logits already computed."""
    logp = _at_least_float32(logits).log_softmax(-1)
    ref_logp = _at_least_float32(ref_logits).log_softmax(-1)
    # KL >= 0; where the policy still equals the reference, two forwards' rounding can give -1e-8
    return (logp.exp() * (logp - ref_logp)).sum(-1).clamp(min=0.0)


def per_token(
    estimator: str,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-token KL term that a penalty uses, by name (k1 | k2 | k3 | exact)."""
    if estimator == "k1":
        return k1(logprobs, ref_logprobs)
    if estimator == "k2":
        return k2(logprobs, ref_logprobs)
    if estimator == "k3":
        return k3(logprobs, ref_logprobs)
    if estimator == "exact":
        assert logits is not None and ref_logits is not None, "exact KL needs both logits"
        return exact(logits, ref_logits)
    raise ValueError(f"ppo.kl_estimator={estimator!r}: accepts {' | '.join(ESTIMATORS)}")


def sequence_sum(kl_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL in nats: the sum over the response's tokens."""
    return (kl_t * mask).sum(-1)


def adaptive_beta(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Ziegler et al. (2019): beta <- beta (1 + clip(KL/target - 1, -0.2, 0.2) n / horizon).

    `kl` and `target` are in the same unit: sequence nats here.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)
