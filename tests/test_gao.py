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


def test_peak_height_kl_and_inside_by_hand():
    """d (a - b d) with a = 1, b = 0.25 peaks at d* = 2 with gain 2 (1 - 0.5) = 1 and KL 4; d (a - b ln d) with a = 1,
    b = 0.5 at d* = e with gain e (1 - 0.5) = e / 2."""
    bon = gao.GaoFit("bon", a=1.0, b=0.25, r2=1.0, n=10)
    p = bon.peak(3.0)
    assert (p.d, p.gain, p.kl, p.inside) == (pytest.approx(2.0), pytest.approx(1.0), pytest.approx(4.0), True)
    assert not bon.peak(1.5).inside and bon.peak(1.5).gain == pytest.approx(1.0)  # beyond the reached d, still its height
    rl = gao.GaoFit("rl", a=1.0, b=0.5, r2=1.0, n=10).peak(3.0)
    assert (rl.d, rl.gain, rl.inside) == (pytest.approx(math.e), pytest.approx(math.e / 2), True)
    never = gao.GaoFit("rl", a=1.0, b=-0.1, r2=1.0, n=10).peak(3.0)  # never turns down: no height, never inside
    assert never.d == math.inf and never.kl == math.inf and math.isnan(never.gain) and not never.inside
    none = gao.fit_rl([0.0, 0.1], [0.0, 0.1]).peak(3.0)  # no fit: nothing
    assert math.isnan(none.d) and math.isnan(none.gain) and not none.inside


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
