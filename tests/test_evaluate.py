"""The verdict functions and their statistics on synthetic numbers."""

import numpy as np
import pytest

from rlhf_sweep.evaluate import (
    mann_kendall,
    mean_ci,
    rm_slopes,
    verdict_humans_prefer_reference,
    verdict_kl_increasing,
    verdict_rm_prefers_policy,
    win_rate,
)


def test_mann_kendall_hand_value():
    mk = mann_kendall(np.array([1.0, 3.0, 2.0, 4.0]))
    # pairs: +,+,+,-,+,+ -> S = 4; var = 4*3*13/18 = 8.667; z = (4-1)/sqrt(8.667)
    assert mk["S"] == 4
    assert mk["z"] == pytest.approx(3 / np.sqrt(4 * 3 * 13 / 18))


def test_flat_kl_is_not_increasing():
    rng = np.random.default_rng(0)
    flat = 5.0 + rng.normal(0, 0.5, 150)
    assert not verdict_kl_increasing(flat.tolist(), beta=0.03)["value"]
    constant = [3.0] * 150
    assert not verdict_kl_increasing(constant, beta=0.03)["value"]


def test_rising_kl_is_increasing_but_not_without_a_penalty():
    rng = np.random.default_rng(0)
    rising = np.linspace(0, 10, 150) + rng.normal(0, 1.0, 150)
    assert verdict_kl_increasing(rising.tolist(), beta=0.03)["value"]
    assert not verdict_kl_increasing(rising.tolist(), beta=0.0)["value"]


def test_early_rise_then_plateau_is_not_increasing():
    """The test reads the later half only: a rise that stopped is not 'keeps increasing'."""
    rng = np.random.default_rng(1)
    x = np.concatenate([np.linspace(0, 8, 75), np.full(75, 8.0)]) + rng.normal(0, 0.3, 150)
    assert not verdict_kl_increasing(x.tolist(), beta=0.03)["value"]


def test_win_rate_counts_ties_as_half():
    wr, lo, hi = win_rate(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 5.0, 1.0]))
    assert wr == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert lo < wr < hi


def test_mean_ci_narrows_with_n():
    rng = np.random.default_rng(0)
    _, lo1, hi1 = mean_ci(rng.normal(size=100))
    _, lo2, hi2 = mean_ci(rng.normal(size=10000))
    assert (hi2 - lo2) < (hi1 - lo1) / 5


def _metrics(**kw):
    m = {"rm/win_rate": 0.9, "rm/win_rate_lo": 0.85, "rm/win_rate_hi": 0.95, "rm/policy": 1.0, "rm/ref": 0.0,
         "gold/win_rate": 0.3, "gold/win_rate_lo": 0.25, "gold/win_rate_hi": 0.35, "gold/policy": 0.5, "gold/ref": 0.8,
         "len/policy": 7.0, "len/ref": 4.0}
    m.update(kw)
    return m


def test_verdicts_need_their_interval_on_the_right_side():
    assert verdict_rm_prefers_policy(_metrics())["value"]
    assert not verdict_rm_prefers_policy(_metrics(**{"rm/win_rate_lo": 0.49}))["value"]
    assert verdict_humans_prefer_reference(_metrics())["value"]
    assert not verdict_humans_prefer_reference(_metrics(**{"gold/win_rate_hi": 0.51}))["value"]
    # humans prefer the reference but the policy is not longer: not the verbosity story
    assert not verdict_humans_prefer_reference(_metrics(**{"len/policy": 3.9}))["value"]


def test_rm_slopes_recover_a_known_linear_reward():
    rng = np.random.default_rng(0)
    gold, length, filler = rng.normal(size=500), rng.integers(1, 10, 500), rng.integers(0, 4, 500)
    rm = 2.0 * gold + 0.3 * length - 0.1 * filler + 0.5
    s = rm_slopes(rm, gold, length.astype(float), filler.astype(float))
    assert (s["gold"], s["length"], s["filler"]) == pytest.approx((2.0, 0.3, -0.1), abs=1e-6)
    assert s["r2"] == pytest.approx(1.0)
