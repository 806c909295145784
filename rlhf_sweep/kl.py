"""KL between the policy and the frozen reference: sampled estimators, exact KL, the controller.

With r = ref(y_t) / pi(y_t) on a sampled token (Schulman's notation):
  k1 = -log r            unbiased, but negative on many tokens near the reference
  k2 = (log r)^2 / 2     biased, >= 0
  k3 = (r - 1) - log r   unbiased, >= 0
Exact per-token KL needs the full distribution: sum_v pi(v) (log pi(v) - log ref(v)).
The sequence KL is the sum over response tokens, so it grows with length.
"""

from __future__ import annotations

import torch


def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_logprobs - logprobs) ** 2


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def exact(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(pi || ref) at every position, from logits already computed."""
    logp = torch.log_softmax(logits.float(), -1)
    ref_logp = torch.log_softmax(ref_logits.float(), -1)
    # KL >= 0; where the policy still equals the reference, two forwards' rounding can give -1e-8
    return (logp.exp() * (logp - ref_logp)).sum(-1).clamp(min=0.0)


def per_token(
    estimator: str,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-token KL term that a penalty uses, by name (k1 | k3 | exact)."""
    if estimator == "k1":
        return k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return k3(logprobs, ref_logprobs)
    if estimator == "exact":
        assert logits is not None and ref_logits is not None, "exact KL needs both logits"
        return exact(logits, ref_logits)
    raise ValueError(f"ppo.kl_estimator={estimator!r}: accepts k1 | k3 | exact")


def sequence_sum(kl_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL in nats: the sum over the response's tokens."""
    return (kl_t * mask).sum(-1)


def adaptive_beta(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Ziegler et al. (2019): beta <- beta (1 + clip(KL/target - 1, -0.2, 0.2) n / horizon).

    `kl` and `target` are in the same unit: sequence nats here.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)
