"""Over-optimization curves of Gao, Schulman & Hilton (2022): the two functional forms of gold reward
against d = sqrt(KL), their fit and their peak: every Gao et al. fit and peak the reports show is made here.

Pure numpy, no models: the study reports (rlhf_sweep.reporting) feed it per-iteration histories and
held-out end points; tests check it against hand-computed values. Best-of-n's own maths (its KL, the
unbiased estimator) is maths/best_of_n.py.

    best-of-n   R(d) = d (a - b d)      peak at d* = a / (2 b)
    RL (PPO)    R(d) = d (a - b ln d)   peak at d* = exp(a / b - 1)

R is the gold gain over the initial policy (R(0) = 0), d = sqrt(KL(pi || pi_init)) in nats^0.5.
Both forms are linear in (a, b), so a least-squares fit without intercept is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
