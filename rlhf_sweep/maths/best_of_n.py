"""Best-of-n maths: the KL bound log n - (n-1)/n (Gao et al. 2022), the unbiased best-of-n estimator over N
samples of which n are drawn (Nakano et al. 2021), and the exact KL and distribution of best-of-n over a
discrete distribution with RM ties (Beirami et al. 2024).

Pure numpy/scipy: training/bon.py feeds it the reference samples of each held-out prompt; tests check it
against hand values and enumeration.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln


def bon_kl(n: int | np.ndarray) -> float | np.ndarray:
    """KL(best-of-n || base) = log n - (n - 1) / n, in nats.

    Exact for continuous outcomes; an upper bound otherwise (with K distinct outcomes
    the true KL saturates at log K).
    """
    n_arr = np.asarray(n, dtype=float)
    if np.any(n_arr < 1):
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    out = np.log(n_arr) - (n_arr - 1.0) / n_arr
    return float(out) if out.ndim == 0 else out


def bon_weights(N: int, n: int) -> np.ndarray:
    """Weights w_i (i = 1..N, samples sorted ascending by proxy) of the unbiased best-of-n estimator.

    w_i = C(i-1, n-1) / C(N, n): the probability that the i-th smallest of N samples is the
    maximum of n samples drawn from them without replacement (Nakano et al. 2021). They sum to 1.
    """
    if not 1 <= n <= N:
        raise ValueError(f"best-of-{n} needs 1 <= n <= N samples, got N={N}")
    i = np.arange(1, N + 1, dtype=float)
    w = np.zeros(N)
    ok = i >= n
    # log-gamma keeps C(256, 128) ~ 1e75 and its ratios exact enough in float64
    log_c_i = gammaln(i[ok]) - gammaln(n) - gammaln(i[ok] - n + 1)  # log C(i-1, n-1)
    log_c_N = gammaln(N + 1) - gammaln(n + 1) - gammaln(N - n + 1)  # log C(N, n)
    w[ok] = np.exp(log_c_i - log_c_N)
    return w


def bon_estimate(proxy: np.ndarray, value: np.ndarray, n: int) -> float | np.ndarray:
    """Unbiased estimate of E[value of the best-of-n sample], best by `proxy`, from N >= n samples.

    proxy, value: shape (N,) for one prompt, or (P, N) for P prompts with N samples each.
    Returns a float for (N,), an array of P per-prompt estimates for (P, N). Uses every
    subset of size n at once: sum_{i=n..N} C(i-1, n-1) / C(N, n) * value_(i), with the
    samples sorted ascending by proxy. Much less noisy than drawing N/n disjoint groups.
    Samples whose proxies tie are chosen among at random: each counts with its tie group's
    mean value (by symmetry they share the group's weight equally).
    """
    proxy, value = np.asarray(proxy, dtype=float), np.asarray(value, dtype=float)
    if proxy.shape != value.shape or proxy.ndim not in (1, 2):
        raise ValueError(f"proxy and value must have the same shape (N,) or (P, N), got {proxy.shape} and {value.shape}")
    value = tie_means(proxy, value)
    order = np.argsort(proxy, axis=-1, kind="stable")
    sorted_values = np.take_along_axis(value, order, axis=-1)
    est = sorted_values @ bon_weights(proxy.shape[-1], n)
    return float(est) if proxy.ndim == 1 else est


def tie_means(proxy: np.ndarray, value: np.ndarray) -> np.ndarray:
    """`value` with each entry replaced by the mean over the entries of its row whose proxy is equal."""
    proxy, value = np.asarray(proxy, dtype=float), np.asarray(value, dtype=float)
    rows_p, rows_v = np.atleast_2d(proxy), np.atleast_2d(value).copy()
    for p, v in zip(rows_p, rows_v, strict=True):
        uniq, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
        if len(uniq) < len(p):
            v[:] = (np.bincount(inv, weights=v, minlength=len(uniq)) / counts)[inv]
    return rows_v.reshape(value.shape)


def bon_distribution(p: np.ndarray, reward: np.ndarray, n: int) -> np.ndarray:
    """The best-of-n policy of a discrete distribution: pi(y) for outcomes y with probabilities p and rewards.

    Best-of-n draws n outcomes from p and keeps one of highest reward (uniformly among tied draws).
    With T the set of outcomes whose reward equals y's, F(T) = P(reward <= r(y)) and F(T-) = P(reward < r(y)):
    the best reward lies in T with probability F(T)^n - F(T-)^n, shared within T in proportion to p
    (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy", with ties).
    """
    p, reward = np.asarray(p, dtype=float), np.asarray(reward, dtype=float)
    if p.shape != reward.shape or p.ndim != 1 or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise ValueError("bon_distribution needs a 1-D probability vector p and a reward per outcome")
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    levels, inv = np.unique(reward, return_inverse=True)  # ascending reward levels (tie classes)
    p_level = np.bincount(inv, weights=p, minlength=len(levels))
    F = np.cumsum(p_level)
    F = F / F[-1]  # exactly 1 at the top, whatever the rounding of p
    F_below = np.concatenate([[0.0], F[:-1]])
    pi_level = F**n - F_below**n
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(p_level[inv] > 0, p / p_level[inv], 0.0)
    return pi_level[inv] * share


def bon_exact_kl(p: np.ndarray, reward: np.ndarray, n: int) -> float:
    """KL(best-of-n || p) in nats for a discrete distribution p (outcomes with rewards; ties handled).

    pi / p is constant within a tie class, so KL = sum over classes of pi_T log(pi_T / p_T). It is at most
    log n - (n-1)/n (`bon_kl`, reached for continuous outcomes) and at most -log p(top class).
    """
    pi = bon_distribution(p, reward, n)
    p = np.asarray(p, dtype=float)
    keep = pi > 0
    return float(max((pi[keep] * np.log(pi[keep] / p[keep])).sum(), 0.0))
