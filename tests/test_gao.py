"""The maths of rlhf_sweep/maths/gao.py and maths/best_of_n.py against hand-computed values and synthetic curves."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rlhf_sweep.maths import best_of_n, gao


def test_bon_kl_hand_values():
    assert best_of_n.bon_kl(1) == 0.0
    assert best_of_n.bon_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.19315
    assert best_of_n.bon_kl(4) == pytest.approx(1.386294361 - 0.75)  # 0.63629
    assert best_of_n.bon_kl(256) == pytest.approx(5.545177444 - 255 / 256)  # 4.54908
    np.testing.assert_allclose(best_of_n.bon_kl(np.array([1, 2, 4])), [0.0, 0.193147, 0.636294], atol=1e-6)
    with pytest.raises(ValueError):
        best_of_n.bon_kl(0)


def test_bon_weights_hand_values():
    # N = 4, n = 2: C(i-1, 1) / C(4, 2) = (0, 1, 2, 3) / 6
    np.testing.assert_allclose(best_of_n.bon_weights(4, 2), [0, 1 / 6, 2 / 6, 3 / 6])
    np.testing.assert_allclose(best_of_n.bon_weights(5, 1), [0.2] * 5)  # n = 1: the plain mean
    np.testing.assert_allclose(best_of_n.bon_weights(5, 5), [0, 0, 0, 0, 1])  # n = N: the top sample
    assert best_of_n.bon_weights(256, 128).sum() == pytest.approx(1.0)  # C(256, 128) ~ 5.8e75 does not overflow
    with pytest.raises(ValueError):
        best_of_n.bon_weights(3, 4)


def test_bon_estimate_hand_values():
    # three samples, proxy order 1 < 2 < 3 with gold 10, 0, 5 (the proxy's best is not gold's best).
    # pairs: {1,2} -> sample 2 (gold 0), {1,3} -> sample 3 (5), {2,3} -> sample 3 (5): mean 10/3
    proxy, gold = np.array([1.0, 3.0, 2.0]), np.array([10.0, 5.0, 0.0])
    assert best_of_n.bon_estimate(proxy, gold, 2) == pytest.approx(10 / 3)
    assert best_of_n.bon_estimate(proxy, gold, 1) == pytest.approx(5.0)  # the mean
    assert best_of_n.bon_estimate(proxy, gold, 3) == pytest.approx(5.0)  # the proxy's top sample
    # values sorted by proxy 1, 2, 3: 1/3 * 2 + 2/3 * 3 = 8/3
    assert best_of_n.bon_estimate(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]), 2) == pytest.approx(8 / 3)
    # (P, N): one estimate per prompt
    est = best_of_n.bon_estimate(np.stack([proxy, proxy]), np.stack([gold, 2 * gold]), 2)
    np.testing.assert_allclose(est, [10 / 3, 20 / 3])


def test_bon_estimate_equals_the_mean_over_all_subsets():
    rng = np.random.default_rng(0)
    proxy, value = rng.normal(size=8), rng.normal(size=8)
    for n in (1, 2, 3, 5, 8):
        brute = np.mean([value[max(s, key=lambda i: proxy[i])] for s in itertools.combinations(range(8), n)])
        assert best_of_n.bon_estimate(proxy, value, n) == pytest.approx(brute)


@pytest.mark.parametrize("a,b", [(1.3, 0.4), (0.5, 0.05), (2.0, 1.1)])
def test_fits_recover_known_coefficients(a, b):
    d = np.linspace(0.05, 6.0, 60)
    rng = np.random.default_rng(1)
    rl = d * (a - b * np.log(d))
    bon = d * (a - b * d)
    for fit, y in ((gao.fit_rl, rl), (gao.fit_bon, bon)):
        f = fit(d, y)
        assert f.a == pytest.approx(a, rel=0.01) and f.b == pytest.approx(b, rel=0.01)
        assert f.r2 == pytest.approx(1.0)
        # with small noise (0.5% of the curve's range) still within 1%
        noisy = fit(d, y + rng.normal(scale=0.005 * np.ptp(y), size=len(d)))
        assert noisy.a == pytest.approx(a, rel=0.01) and noisy.b == pytest.approx(b, rel=0.01)
        assert 0.99 < noisy.r2 < 1.0


def test_fit_peaks_and_degenerate_input():
    f = gao.fit_bon([0.5, 1.0, 1.5, 2.0], [0.5 * (1 - 0.25 * 0.5), 1 - 0.25, 1.5 * (1 - 0.25 * 1.5), 2 * (1 - 0.5)])
    assert (f.a, f.b) == (pytest.approx(1.0), pytest.approx(0.25)) and f.peak_d == pytest.approx(2.0)  # a / 2b
    g = gao.GaoFit("rl", a=1.0, b=0.5, r2=1.0, n=10)
    assert g.peak_d == pytest.approx(math.e)  # exp(a/b - 1)
    assert g.predict(np.array([0.0]))[0] == 0.0  # d ln d -> 0 at d = 0
    assert gao.GaoFit("rl", a=1.0, b=-0.1, r2=1.0, n=10).peak_d == math.inf
    few = gao.fit_rl([0.0, 0.1, 0.2], [0.0, 0.1, 0.2])  # only two points with d > 0
    assert not few.ok and math.isnan(few.a) and "too few" in few.label()
    assert math.isnan(gao.r_squared(np.ones(4), np.ones(4)))


EXACT = {"se_a": 0.0, "se_b": 0.0, "cov_ab": 0.0}  # a fit written by hand with no uncertainty: its peak is the point


def test_peak_height_kl_and_inside_by_hand():
    """d (a - b d) with a = 1, b = 0.25 peaks at d* = 2 with gain 2 (1 - 0.5) = 1 and KL 4; d (a - b ln d) with a = 1,
    b = 0.5 at d* = e with gain e (1 - 0.5) = e / 2."""
    bon = gao.GaoFit("bon", a=1.0, b=0.25, r2=1.0, n=10, **EXACT)
    p = bon.peak(3.0)
    assert (p.d, p.gain, p.kl, p.inside, p.status) == (pytest.approx(2.0), pytest.approx(1.0), pytest.approx(4.0), True, gao.INSIDE)
    assert p.kl_interval == (pytest.approx(4.0), pytest.approx(4.0))
    far = bon.peak(1.5)  # beyond the reached d: its place, no height (that would be an extrapolation)
    assert far.status == gao.BEYOND and not far.inside and far.d == pytest.approx(2.0) and math.isnan(far.gain)
    assert far.kl_text() == "beyond the reached KL (> 4)"
    rl = gao.GaoFit("rl", a=1.0, b=0.5, r2=1.0, n=10, **EXACT).peak(3.0)
    assert (rl.d, rl.gain, rl.inside) == (pytest.approx(math.e), pytest.approx(math.e / 2), True)
    # b < 0 for sure: a convex curve, no peak to place (peak_d says inf: it never turns down)
    never = gao.GaoFit("rl", a=1.0, b=-0.1, r2=1.0, n=10, **EXACT)
    assert never.peak_d == math.inf and never.peak(3.0).status == gao.NOT_IDENTIFIED and math.isnan(never.peak(3.0).gain)
    none = gao.fit_rl([0.0, 0.1], [0.0, 0.1]).peak(3.0)  # no fit: nothing
    assert math.isnan(none.d) and math.isnan(none.gain) and not none.inside and none.status == gao.NOT_IDENTIFIED
    # no standard errors (the defaults of a hand-written fit): b's interval is unknown, so nothing is identified
    assert gao.GaoFit("bon", a=1.0, b=0.25, r2=1.0, n=10).peak(3.0).status == gao.NOT_IDENTIFIED


@pytest.mark.parametrize("form", ["rl", "bon"])
@pytest.mark.parametrize("a", [0.2, 1.0, 5.0])
@pytest.mark.parametrize("b", [1e-12, 1e-6, 2.5e-4, 0.002, 0.5, 0.0, -0.1])
def test_peak_never_raises_for_finite_coefficients(form, a, b):
    """exp(a/b - 1) overflows a double for a/b > 710 (a = 0.2, b = 0.00025 gives 800): d* is inf then, never an
    OverflowError; the same for the peak's KL, its interval and its text, with and without standard errors."""
    for se in ({}, {"se_a": 0.01, "se_b": 1e-5, "cov_ab": 0.0}, EXACT):
        f = gao.GaoFit(form, a=a, b=b, r2=0.9, n=50, **se)
        assert f.peak_d == math.inf or (math.isfinite(f.peak_d) and f.peak_d >= 0)
        if b <= 0:
            assert f.peak_d == math.inf
        p = f.peak(3.0)
        assert p.status in (gao.INSIDE, gao.BEYOND, gao.NOT_IDENTIFIED) and isinstance(p.kl_text(), str)
        assert p.kl >= 0 or math.isnan(p.kl)
        if p.inside:
            assert p.d_lo <= p.d <= p.d_hi <= 3.0 and math.isfinite(p.gain)
    assert gao.GaoFit("rl", a=0.2, b=0.00025, r2=0.9, n=50).peak_d == math.inf  # the example
    assert gao.GaoFit("rl", a=1.0, b=5e-324, r2=0.9, n=50).peak_d == math.inf  # a subnormal b
    assert gao.Peak(1e200, math.nan, gao.BEYOND).kl == math.inf  # 1e200 ** 2 would raise


def curve(form: str, a: float, b: float, d: np.ndarray) -> np.ndarray:
    return d * (a - b * (np.log(d) if form == "rl" else d))


@pytest.mark.parametrize("form,a,b", [("rl", 1.0, 0.5), ("bon", 1.0, 0.25)])
def test_a_clean_peak_is_identified_and_its_interval_covers_the_truth(form, a, b):
    """200 synthetic curves from known (a, b) with small normal noise: each peak is identified inside the reached d,
    and the peak's interval covers the true d* at about its level (Fieller's interval is exact for normal errors;
    at least 0.9 of 200 for a 0.95 level leaves room for the binomial spread, sd 0.015)."""
    rng = np.random.default_rng(7)
    d = np.linspace(0.05, 5.0, 40)
    true_d = gao.GaoFit(form, a, b, 1.0, 1).peak_d
    covered, inside = 0, 0
    for _ in range(200):
        f = gao._fit(form, d, curve(form, a, b, d) + rng.normal(scale=0.1, size=len(d)))
        p = f.peak(float(d.max()))
        inside += p.inside
        covered += bool(p.d_lo <= true_d <= p.d_hi)
    assert inside == 200
    assert covered / 200 >= 0.9


def test_a_flat_noisy_run_like_trial_13_is_not_identified():
    """A PPO run whose gold barely moves: a small rise under noise, fitted with R² near 0.2 and b near 0.002 (trial 13
    of the beta_clip_frontier study: R² 0.19, b 0.002). Its peak is not identified, though a / b puts one far out."""
    rng = np.random.default_rng(1)
    d = np.linspace(0.1, 1.2, 80)
    f = gao.fit_rl(d, curve("rl", 0.05, 0.002, d) + rng.normal(scale=0.033, size=len(d)))
    assert 0.15 < f.r2 < 0.25 and 0 < f.b < 0.01 and math.isfinite(f.peak_d)
    p = f.peak(float(d.max()))
    assert p.status == gao.NOT_IDENTIFIED and not p.inside and math.isnan(p.d) and p.kl_text() == "not identified"
    # the same coefficients known exactly (b's interval a point above 0): R² 0.19 alone keeps the peak out
    assert gao.GaoFit("rl", f.a, f.b, 0.19, f.n, **EXACT).peak(1.2).status == gao.NOT_IDENTIFIED
    assert gao.R2_FLOOR > 0.19


def test_b_interval_straddling_zero_is_not_identified():
    """A good R² (a strong linear rise) but a curvature indistinguishable from 0: no peak."""
    rng = np.random.default_rng(4)
    d = np.linspace(0.1, 3.0, 30)
    f = gao.fit_bon(d, 1.0 * d + rng.normal(scale=0.05, size=len(d)))
    lo, hi = f.b_interval()
    assert f.r2 > 0.9 and lo < 0 < hi
    assert f.peak(3.0).status == gao.NOT_IDENTIFIED and all(map(math.isnan, f.ratio_interval()))


@pytest.mark.parametrize("form", ["rl", "bon"])
def test_standard_errors_match_statsmodels(form):
    """The peer: statsmodels' OLS on the same regressors [d, -d shape(d)] without a constant."""
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(5)
    d = np.linspace(0.0, 4.0, 25)
    y = curve(form, 0.8, 0.3, np.where(d > 0, d, 1.0)) * (d > 0) + rng.normal(scale=0.08, size=len(d))
    f = gao._fit(form, d, y)
    X = np.column_stack([d, -d * gao._shape(form, d)])
    ols = sm.OLS(y, X).fit()
    np.testing.assert_allclose([f.a, f.b], ols.params, rtol=1e-9)
    np.testing.assert_allclose([f.se_a, f.se_b], ols.bse, rtol=1e-9)
    assert f.cov_ab == pytest.approx(ols.cov_params()[0, 1], rel=1e-9)
    lo, hi = f.b_interval()
    np.testing.assert_allclose([lo, hi], ols.conf_int(alpha=1 - gao.CONFIDENCE)[1], rtol=1e-9)


def test_fit_kl_fits_on_the_square_root_of_kl():
    """fit_kl(form, KL, gain) is fit_<form>(sqrt(KL), gain); a slightly negative KL (estimator noise) counts as 0."""
    d = np.array([0.5, 1.0, 1.5, 2.0])
    gain = d * (1 - 0.25 * d)
    f = gao.fit_kl("bon", d**2, gain)
    assert (f.a, f.b) == (pytest.approx(1.0), pytest.approx(0.25))
    assert gao.fit_kl("rl", np.array([-1e-9, *d**2]), np.array([0.0, *gain])).n == 5
    assert gao.sqrt_kl(np.array([-1e-9, 4.0])).tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="form='x'"):
        gao.fit_kl("x", d**2, gain)
