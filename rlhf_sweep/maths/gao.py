"""Over-optimization curves of Gao, Schulman & Hilton (2022): the two functional forms of gold reward
against d = sqrt(KL), their fit with standard errors, their peak, and whether the data identify that peak:
every Gao et al. fit and peak the reports show is made here.

Pure numpy/scipy, no models: the study reports (rlhf_sweep.reporting) feed it per-iteration histories and
held-out end points; tests check it against hand-computed values, synthetic curves and statsmodels' OLS.
Best-of-n's own maths (its KL, the unbiased estimator) is maths/best_of_n.py.

    best-of-n   R(d) = d (a - b d)      peak at d* = a / (2 b)
    RL (PPO)    R(d) = d (a - b ln d)   peak at d* = exp(a / b - 1)

R is the gold gain over the initial policy (R(0) = 0), d = sqrt(KL(pi || pi_init)) in nats^0.5.
Both forms are linear in (a, b), so a least-squares fit without intercept is exact, and so are the usual
OLS standard errors (residual variance times (X'X)^-1, n - 2 degrees of freedom).

A fitted peak is only a number the data support when the curve turns down for sure and fits well: see
`GaoFit.peak` for the three outcomes ("inside", "beyond the reached KL", "not identified") and
`GaoFit.ratio_interval` for the peak's interval (Fieller's, mapped through d*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95  # the level of b's interval and of the peak's interval
# The floor on R² below which no peak is reported. A fit whose curve explains less than half of the gain's variance
# around its mean is mostly scatter: its curvature b, and the peak a / b implies, then follow the noise of a few
# points rather than a shape in the data (a flat, noisy PPO run fits with a low R² and b near 0, and a / b then puts
# its "peak" at an arbitrary, often astronomical KL). Half is the point where the shape outweighs the scatter; a
# clean rise-and-fall clears it easily.
R2_FLOOR = 0.5
# the largest x with exp(x) finite in float64 (ln of the largest double): beyond it d* = exp(a/b - 1) is inf
_LOG_MAX = math.log(np.finfo(float).max)

INSIDE, BEYOND, NOT_IDENTIFIED = "inside", "beyond the reached KL", "not identified"


@dataclass(frozen=True)
class Peak:
    """Where a fitted form peaks, and whether the data identify it (`GaoFit.peak`).

    status: INSIDE (the peak's whole interval lies within the d the curve reached), BEYOND (the peak's
    whole interval lies past it) or NOT_IDENTIFIED (R² below R2_FLOOR, b's interval not wholly above 0, or
    the peak's interval straddling the reached d). d, d_lo, d_hi are NaN when not identified, so no caller
    can print a peak the data do not support; d and d_hi are inf where exp(a/b - 1) exceeds a double. gain
    is the fitted gold gain at d*, given only when the peak is inside (beyond the data it is an extrapolation).
    """

    d: float
    gain: float
    status: str
    d_lo: float = math.nan
    d_hi: float = math.nan

    @property
    def inside(self) -> bool:
        """Whether the data identify a peak within the reached KL."""
        return self.status == INSIDE

    @property
    def identified(self) -> bool:
        """Whether the data place the peak, inside or beyond the reached KL."""
        return self.status != NOT_IDENTIFIED

    @property
    def kl(self) -> float:
        """The peak's KL, d*^2 (nats): d * d, since float ** 2 raises OverflowError past 1.3e154."""
        return self.d * self.d

    @property
    def kl_interval(self) -> tuple[float, float]:
        return self.d_lo * self.d_lo, self.d_hi * self.d_hi

    def kl_text(self) -> str:
        """The report's cell for the peak KL: the KL with its interval when inside, else the status words (with
        the lower end of the interval when beyond, the one number the data support there)."""
        if self.status == INSIDE:
            lo, hi = self.kl_interval
            return f"{self.kl:.3g} [{lo:.3g}, {hi:.3g}]"
        if self.status == BEYOND:
            lo = self.kl_interval[0]
            # an infinite lower end: a/b past what exp can hold
            return BEYOND + (f" (> {lo:.3g})" if math.isfinite(lo) else " (past any reachable KL)")
        return NOT_IDENTIFIED


@dataclass
class GaoFit:
    """A fitted Gao et al. form: R(d) = d (a - b d) ("bon") or d (a - b ln d) ("rl").

    r2 is the coefficient of determination on the fitted points (NaN when it cannot be
    computed); n the number of points used. se_a, se_b, cov_ab: the OLS standard errors of a and
    b and their covariance (NaN when unknown, e.g. a fit written by hand, whose peak is then never
    identified).
    """

    form: str
    a: float
    b: float
    r2: float
    n: int
    se_a: float = math.nan
    se_b: float = math.nan
    cov_ab: float = math.nan

    def predict(self, d: np.ndarray) -> np.ndarray:
        """The fitted gold gain R(d) at the given d = sqrt(KL)."""
        d = np.asarray(d, dtype=float)
        with np.errstate(over="ignore", invalid="ignore"):  # d far past the data: inf is the honest answer
            return d * (self.a - self.b * _shape(self.form, d))

    @property
    def peak_d(self) -> float:
        """d at which the fitted gold gain peaks (the point estimate, whether or not the data identify it): inf
        when the form never turns down (b <= 0) or when exp(a/b - 1) exceeds the largest double, 0 for a
        best-of-n curve with a <= 0 (it only falls); never raises for finite a and b."""
        if not (math.isfinite(self.a) and math.isfinite(self.b)) or self.b <= 0:
            return math.inf
        return _d_of_ratio(self.form, _ratio(self.a, self.b))

    @property
    def t(self) -> float:
        """Student's t quantile for a two-sided CONFIDENCE interval on n - 2 degrees of freedom."""
        from scipy.stats import t as student_t

        return float(student_t.ppf(0.5 + CONFIDENCE / 2, self.n - 2)) if self.n > 2 else math.nan

    def b_interval(self) -> tuple[float, float]:
        """b's CONFIDENCE interval, b -+ t se_b (NaN without a standard error)."""
        half = self.t * self.se_b
        return self.b - half, self.b + half

    def ratio_interval(self) -> tuple[float, float]:
        """Fieller's CONFIDENCE interval for a / b: the rho with (a - rho b)^2 <= t^2 Var(a - rho b).

        Both peaks are increasing functions of a / b (d* = a/(2b), d* = exp(a/b - 1)), so the peak's
        interval is this one mapped through d*. Fieller's rather than the delta method: a / b is a ratio
        whose denominator may be near 0, where the delta method's symmetric interval around a/b covers
        far less than its level; Fieller's covers at its level whenever the errors are normal, and it is
        bounded exactly when b's own interval excludes 0, the same condition that identifies the peak.
        (It assumes independent residuals: per-iteration points of one PPO run are autocorrelated, so there
        the interval is narrower than the truth, one reason for the R² floor.) NaN bounds when unbounded.
        """
        t2 = self.t**2
        va, vb, vab = self.se_a**2, self.se_b**2, self.cov_ab
        lead = self.b**2 - t2 * vb  # > 0 iff |b| > t se_b
        if not (math.isfinite(lead) and lead > 0 and math.isfinite(va) and math.isfinite(vab)):
            return math.nan, math.nan
        mid = self.a * self.b - t2 * vab
        disc = max(mid**2 - lead * (self.a**2 - t2 * va), 0.0)  # >= 0 when lead > 0: a/b itself is inside
        root = math.sqrt(disc)
        return (mid - root) / lead, (mid + root) / lead

    def peak(self, d_max: float) -> Peak:
        """The fitted peak against the largest d the curve reached, d_max, and whether the data identify it.

        Identified: the fit has R² >= R2_FLOOR and b's CONFIDENCE interval lies above 0. Then INSIDE when the
        peak's whole interval lies at or below d_max, BEYOND when it lies above, and NOT_IDENTIFIED when it
        straddles d_max, as for every fit that fails the first test. A b surely below 0 is not identified
        either: both forms are then convex in d, with a minimum or none, so there is no peak to place and
        "beyond" would claim a rise the data may not show (gold can fall over the whole reached range).
        """
        blo, _ = self.b_interval()
        if not (self.ok and self.r2 >= R2_FLOOR and blo > 0):
            return Peak(math.nan, math.nan, NOT_IDENTIFIED)
        rlo, rhi = self.ratio_interval()
        d, lo, hi = self.peak_d, _d_of_ratio(self.form, rlo), _d_of_ratio(self.form, rhi)
        if hi <= d_max:
            return Peak(d, float(self.predict(np.array([d]))[0]), INSIDE, lo, hi)
        if lo > d_max:
            return Peak(d, math.nan, BEYOND, lo, hi)
        return Peak(math.nan, math.nan, NOT_IDENTIFIED)

    @property
    def ok(self) -> bool:
        """Whether the fit produced coefficients (it needs three points with d > 0)."""
        return math.isfinite(self.a) and math.isfinite(self.b)

    def label(self) -> str:
        """A short legend entry: the coefficients and R²."""
        return f"a={self.a:.3g}, b={self.b:.3g}, R²={self.r2:.2f}" if self.ok else "fit: too few points"


def _ratio(a: float, b: float) -> float:
    """a / b without an exception: b = 0 gives ±inf (NaN for 0 / 0), and a quotient past the largest double inf."""
    if b == 0:
        return math.copysign(math.inf, a) if a else math.nan
    with np.errstate(over="ignore"):
        return float(np.float64(a) / np.float64(b))


def _d_of_ratio(form: str, rho: float) -> float:
    """d* as a function of rho = a / b (b > 0): a/(2b), never below 0 (a <= 0: the best-of-n curve only falls,
    its peak is at d = 0), or exp(rho - 1), inf past what a double holds."""
    if math.isnan(rho):
        return math.nan
    if form == "bon":
        return max(0.0, rho / 2)
    return math.inf if rho - 1 > _LOG_MAX else math.exp(rho - 1)


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
    """Linear least squares of r on [d, -d * shape(d)] (no intercept: R(0) = 0), with R² and the OLS standard
    errors: s^2 (X'X)^-1, s^2 the residual sum of squares over n - 2."""
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
    xtx = X.T @ X
    # the columns can be collinear (every d equal; every d = 1 for RL, where ln d = 0): no standard errors then
    if np.linalg.matrix_rank(xtx) == 2:
        s2 = float(((r - X @ np.array([a, b])) ** 2).sum()) / (len(d) - 2)
        cov = s2 * np.linalg.inv(xtx)
        fit.se_a, fit.se_b, fit.cov_ab = float(math.sqrt(cov[0, 0])), float(math.sqrt(cov[1, 1])), float(cov[0, 1])
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
