"""The verdict functions and their statistics on synthetic numbers."""

import numpy as np
import pytest

from rlhf_sweep.evaluation.metrics import rm_slopes
from rlhf_sweep.evaluation.verdicts import (
    kl_growth_share,
    verdict_humans_prefer_reference,
    verdict_kl_increasing,
    verdict_rm_prefers_policy,
)
from rlhf_sweep.maths.stats import ar1_noise, ar1_trend_test, mann_kendall, mean_ci, mk_s, win_rate


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


# ----- verdict 3 on autocorrelated series -------------------------------------------------------------
def test_ar1_noise_follows_its_recursion_and_is_stationary():
    e = np.random.default_rng(3).standard_normal(3)
    x = ar1_noise(np.random.default_rng(3), 0.6, 3)
    assert x.tolist() == pytest.approx([e[0], 0.6 * e[0] + 0.8 * e[1], 0.6 * (0.6 * e[0] + 0.8 * e[1]) + 0.8 * e[2]])
    many = ar1_noise(np.random.default_rng(4), 0.9, (2000, 200))  # the vectorized shape scipy asks for
    assert many[:, -1].var() == pytest.approx(1.0, abs=0.1)
    assert np.corrcoef(many[:, -1], many[:, -2])[0, 1] == pytest.approx(0.9, abs=0.02)


def test_mk_s_is_pymannkendalls_s():
    import pymannkendall

    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(3, 40)), 1)  # with ties
    assert mk_s(x).tolist() == [pymannkendall.original_test(row).s for row in x]
    assert mk_s(x.T, axis=0).tolist() == mk_s(x).tolist()


def test_the_trend_rule_holds_its_level_on_autocorrelated_series_without_a_trend():
    """Must show 2: 1000 AR(1) series of the run's tested length (75 = the last half of 150 iterations), phi from 0.5 to
    0.95, no trend: the rule's trend test says 'increasing' at most 7% of the time at alpha 0.05, where the plain
    Mann-Kendall test (independent points) says so far more often on the same series. 199 Monte Carlo series per
    test instead of the run's 999 keep this fast; the p-value then moves in steps of 0.005, fine for a 5% level."""
    rng = np.random.default_rng(7)
    phis = np.linspace(0.5, 0.95, 10)
    test_hits, plain_hits, rule_hits, n = 0, 0, 0, 0
    for phi in phis:
        for _ in range(100):
            x = 10.0 + 0.5 * ar1_noise(rng, phi, 75)  # noise 5% of the level
            mk = mann_kendall(x)
            hit = ar1_trend_test(x, 199)["p"] < 0.05 and mk["S"] > 0
            test_hits += hit
            plain_hits += mk["p_increasing"] < 0.05
            rule_hits += hit and kl_growth_share(mk["sen_slope"], x) >= 0.25
            n += 1
    assert n == 1000
    assert test_hits / n <= 0.07, test_hits / n
    assert plain_hits / n >= 0.15  # what the old rule did on the same series
    assert rule_hits <= test_hits


def test_a_strong_penalty_creep_is_not_the_puzzles_growing_kl():
    """ppo.beta=1: KL creeps from ~0.25 to ~0.28 nats over the second half; significant as a trend, too small a rise."""
    rng = np.random.default_rng(3)
    creep = np.concatenate([np.linspace(0.0, 0.25, 75), np.linspace(0.25, 0.28, 75)]) + 0.003 * rng.standard_normal(150)
    v = verdict_kl_increasing(creep.tolist(), beta=1.0)
    assert v["p_value"] < 0.05 and 0.05 < v["growth"] < 0.25 and not v["value"]
    assert verdict_kl_increasing(creep.tolist(), beta=1.0, min_growth=0.05)["value"]  # the threshold is what says no
