"""Over-optimization maths of Gao, Schulman & Hilton (2022): best-of-n KL, the unbiased
best-of-n estimator, the two functional forms of gold reward against d = sqrt(KL), their fit
and their peak: every Gao et al. fit and peak the reports show is made here.

Pure numpy/scipy, no models: the best-of-n runs feed it reference samples, the study reports
(rlhf_sweep.reporting) per-iteration histories and held-out end points; tests check it against
hand-computed values.

    best-of-n   R(d) = d (a - b d)      peak at d* = a / (2 b)
    RL (PPO)    R(d) = d (a - b ln d)   peak at d* = exp(a / b - 1)

R is the gold gain over the initial policy (R(0) = 0), d = sqrt(KL(pi || pi_init)) in nats^0.5.
Both forms are linear in (a, b), so a least-squares fit without intercept is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Peak:
    """Where a fitted form peaks: d* (inf when it never turns down, NaN without a fit), the fitted gold gain
    there (NaN unless d* is finite), and whether d* lies within the d the fitted curve reached."""

    d: float
    gain: float
    inside: bool

    @property
    def kl(self) -> float:
        """The peak's KL, d*^2 (nats)."""
        return self.d**2


@dataclass
class GaoFit:
    """A fitted Gao et al. form: R(d) = d (a - b d) ("bon") or d (a - b ln d) ("rl").

    r2 is the coefficient of determination on the fitted points (NaN when it cannot be
    computed); n the number of points used.
    """

    form: str
    a: float
    b: float
    r2: float
    n: int

    def predict(self, d: np.ndarray) -> np.ndarray:
        """The fitted gold gain R(d) at the given d = sqrt(KL)."""
        d = np.asarray(d, dtype=float)
        return d * (self.a - self.b * _shape(self.form, d))

    @property
    def peak_d(self) -> float:
        """d at which the fitted gold gain peaks (inf when the form never turns down, b <= 0)."""
        if not (math.isfinite(self.a) and math.isfinite(self.b)) or self.b <= 0:
            return math.inf
        return self.a / (2 * self.b) if self.form == "bon" else math.exp(self.a / self.b - 1)

    def peak(self, d_max: float) -> Peak:
        """The fitted peak against the largest d a curve reached: d*, the fitted gain there, whether d* <= d_max."""
        d = self.peak_d if self.ok else math.nan
        if not math.isfinite(d):
            return Peak(d, math.nan, False)
        return Peak(d, float(self.predict(np.array([d]))[0]), bool(d <= d_max))

    @property
    def ok(self) -> bool:
        """Whether the fit produced coefficients (it needs three points with d > 0)."""
        return math.isfinite(self.a) and math.isfinite(self.b)

    def label(self) -> str:
        """A short legend entry: the coefficients and R²."""
        return f"a={self.a:.3g}, b={self.b:.3g}, R²={self.r2:.2f}" if self.ok else "fit: too few points"


def _shape(form: str, d: np.ndarray) -> np.ndarray:
    """What b multiplies, divided by d: d for best-of-n, ln d for RL."""
    if form == "bon":
        return d
    # d ln d -> 0 as d -> 0; np.log(0) would give 0 * -inf = nan
    return np.log(np.where(d > 0, d, 1.0))


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    """1 - SS_res / SS_tot (around the mean of y); NaN when y is constant."""
    y, y_hat = np.asarray(y, dtype=float), np.asarray(y_hat, dtype=float)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot <= 0:
        return math.nan
    return 1.0 - float(((y - y_hat) ** 2).sum()) / ss_tot


def _fit(form: str, d: np.ndarray, r: np.ndarray) -> GaoFit:
    """Linear least squares of r on [d, -d * shape(d)] (no intercept: R(0) = 0), with R²."""
    d, r = np.asarray(d, dtype=float).ravel(), np.asarray(r, dtype=float).ravel()
    if d.shape != r.shape:
        raise ValueError(f"d and R must have the same length, got {d.shape} and {r.shape}")
    keep = np.isfinite(d) & np.isfinite(r) & (d >= 0)
    d, r = d[keep], r[keep]
    # two coefficients need at least three points away from d = 0 (where every form is 0)
    if int((d > 0).sum()) < 3:
        return GaoFit(form, math.nan, math.nan, math.nan, int(len(d)))
    X = np.column_stack([d, -d * _shape(form, d)])
    (a, b), *_ = np.linalg.lstsq(X, r, rcond=None)
    fit = GaoFit(form, float(a), float(b), math.nan, int(len(d)))
    fit.r2 = r_squared(r, fit.predict(d))
    return fit


def fit_rl(d: np.ndarray, r: np.ndarray) -> GaoFit:
    """Least-squares fit of the RL form R(d) = d (a - b ln d) to gold gains r at d = sqrt(KL)."""
    return _fit("rl", d, r)


def fit_bon(d: np.ndarray, r: np.ndarray) -> GaoFit:
    """Least-squares fit of the best-of-n form R(d) = d (a - b d) to gold gains r at d = sqrt(KL)."""
    return _fit("bon", d, r)


def sqrt_kl(kl: np.ndarray) -> np.ndarray:
    """d = sqrt(KL), negative KL (estimator noise) read as 0."""
    return np.sqrt(np.clip(np.asarray(kl, dtype=float), 0, None))


def fit_kl(form: str, kl: np.ndarray, gain: np.ndarray) -> GaoFit:
    """Gao et al.'s `form` ("rl" or "bon") fitted to gold gains at the given KL (nats): the fit on d = sqrt(KL)."""
    if form not in ("rl", "bon"):
        raise ValueError(f"fit_kl: form={form!r}; it accepts rl | bon")
    return _fit(form, sqrt_kl(kl), np.asarray(gain, dtype=float))
