"""The maths of RLOO, GRPO, DPO/IPO and best-of-n against values computed by hand or by enumeration,
and the `algo` knob's config and dispatch on tiny configs."""

import itertools
import math

import numpy as np
import pytest
import torch

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import ConfigError
from rlhf_sweep.maths import best_of_n
from rlhf_sweep.maths import kl as klmod
from rlhf_sweep.training import bon, dpo, grpo, rloo


# ----- RLOO ----------------------------------------------------------------------------------------
def test_leave_one_out_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 0.0])  # two groups of k = 4
    # group 1: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3; group 2: 4/3, 4/3, 0, 4/3
    want = [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, -4 / 3, -4 / 3, 4, -4 / 3]
    assert rloo.leave_one_out_advantages(r, 4).tolist() == pytest.approx(want)
    # k = 2: each completion's baseline is the other's reward
    assert rloo.leave_one_out_advantages(torch.tensor([1.0, 3.0]), 2).tolist() == [-2.0, 2.0]


def test_kl_in_the_reward_is_beta_times_summed_k1_over_the_response():
    scores = torch.tensor([1.0, 0.5])
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -9.0]])
    ref_lp = torch.tensor([[-1.5, -1.0, -0.7], [-0.3, -0.2, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second ended after two tokens
    # k1 sums: 0.5 - 1.0 + 0.2 = -0.3 and 0.2 + 0.0 = 0.2
    got = rloo.kl_penalised_rewards(scores, lp, ref_lp, mask, beta=0.1)
    assert got.tolist() == pytest.approx([1.0 + 0.03, 0.5 - 0.02])


def test_rloo_sequence_ratio_is_clipped_per_sequence():
    # sequence log-ratios 0.5 and -0.5 (tokens summed), advantages +1 and -1, eps 0.2
    lp = torch.tensor([[0.3, 0.2], [-0.25, -0.25]])
    old = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    loss, clipfrac = rloo.sequence_loss(lp, old, torch.tensor([1.0, -1.0]), mask, 0.2)
    # seq 1: max(-e^0.5, -1.2) = -1.2 (clipped); seq 2: max(e^-0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == 1.0
    loss, clipfrac = rloo.sequence_loss(lp * 0.1, old, torch.tensor([1.0, -1.0]), mask, 0.2)
    assert loss.item() == pytest.approx((-math.exp(0.05) + math.exp(-0.05)) / 2) and clipfrac.item() == 0.0


def test_rloo_normalised_advantages():
    a = torch.tensor([1.0, -1.0, 3.0, -3.0])
    std = math.sqrt((1 + 1 + 9 + 9) / 3)  # Bessel, as TRL's nanstd
    assert rloo.normalise(a).tolist() == pytest.approx((a / (std + 1e-4)).tolist())


# ----- GRPO ----------------------------------------------------------------------------------------
def test_group_normalised_advantages_and_the_std_zero_case():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # group 2 has one reward three times: std 0
    adv, zero = grpo.group_advantages(r, 3, "group")
    d = 1 + 1e-4  # group 1: mean 2, Bessel std 1
    assert adv.tolist() == pytest.approx([-1 / d, 0.0, 1 / d, 0.0, 0.0, 0.0])
    assert zero.tolist() == [False, False, False, True, True, True]
    adv, _ = grpo.group_advantages(r, 3, "none")
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    adv, _ = grpo.group_advantages(r, 3, "batch")
    batch_std = float(np.std([1, 2, 3, 5, 5, 5], ddof=1))
    assert adv.tolist() == pytest.approx([-1 / (batch_std + 1e-4), 0.0, 1 / (batch_std + 1e-4), 0.0, 0.0, 0.0])


def test_grpo_loss_types_aggregate_token_losses_as_named():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert grpo.aggregate(per_token, mask, "grpo", 3, 0).item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert grpo.aggregate(per_token, mask, "bnpo", 3, 0).item() == pytest.approx(10 / 4)
    assert grpo.aggregate(per_token, mask, "dr_grpo", 8, 0).item() == pytest.approx(10 / (2 * 8))
    assert grpo.aggregate(per_token, mask, "dapo", 3, 5.0).item() == pytest.approx(10 / 5)


def test_grpo_loss_adds_beta_times_the_token_kl_before_aggregating():
    lp = torch.tensor([[0.1, -0.1]])
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    kl_t = torch.tensor([[0.5, 1.5]])
    loss, clipfrac = grpo.grpo_loss(lp, old, torch.tensor([2.0]), mask, 0.2, None, kl_t, 0.1, "bnpo", 2, 0)
    want = (-2 * math.exp(0.1) + 0.05 - 2 * math.exp(-0.1) + 0.15) / 2
    assert loss.item() == pytest.approx(want) and clipfrac.item() == 0.0
    # epsilon_high: only the upper clip moves (ratio e^0.3 with A > 0 is clipped at 1.1, not 1.2)
    loss, clipfrac = grpo.grpo_loss(torch.tensor([[0.3]]), torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), 0.2, 0.1,
                                    None, 0.0, "bnpo", 1, 0)
    assert loss.item() == pytest.approx(-1.1) and clipfrac.item() == 1.0


@pytest.mark.parametrize("corrected", [False, True])
def test_k3_in_the_loss_and_its_bias_correction_by_enumeration(corrected):
    """Expected gradient of the per-token k3 term over a token drawn from pi (= pi_old): as published it is the
    gradient of KL(ref || pi); times pi/pi_old (TRL's use_bias_correction_kl) it is the gradient of KL(pi || ref)."""
    theta = torch.tensor([0.3, -1.0, 0.5, 0.0], requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor([0.0, 0.2, -0.4, 1.0]), 0)
    logp = torch.log_softmax(theta, 0)
    old = logp.detach()
    kl_t = klmod.k3(logp, ref_logp)
    if corrected:
        kl_t = grpo.bias_corrected(kl_t, logp, old)
    (expected,) = torch.autograd.grad((old.exp() * kl_t).sum(), theta, retain_graph=True)  # sum_y pi_old(y) grad term(y)
    p, r = logp.exp(), ref_logp.exp()
    target = (p * (logp - ref_logp)).sum() if corrected else (r * (ref_logp - logp)).sum()
    (want,) = torch.autograd.grad(target, theta)
    assert torch.allclose(expected, want, atol=1e-6)


# ----- DPO and IPO ---------------------------------------------------------------------------------
def test_dpo_loss_on_known_logprobs():
    # s_w = (-3) - (-4) = 1, s_l = (-5) - (-4) = -1: margin 2, beta 0.5 -> -log sigmoid(1) = log(1 + e^-1)
    s_w, s_l = torch.tensor([-3.0 + 4.0]), torch.tensor([-5.0 + 4.0])
    assert dpo.dpo_loss(s_w, s_l, 0.5).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert dpo.dpo_loss(torch.tensor([0.0]), torch.tensor([0.0]), 0.5).item() == pytest.approx(math.log(2))


def test_ipo_loss_on_known_logprobs():
    # h = 2/2 - (-1)/1 = 2; tau 0.25: target 1/(2 tau) = 2 -> loss 0; tau 0.5: target 1 -> (2 - 1)^2 = 1
    s_w, s_l, n_w, n_l = torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([2.0]), torch.tensor([1.0])
    assert dpo.ipo_loss(s_w, s_l, n_w, n_l, 0.25).item() == pytest.approx(0.0)
    assert dpo.ipo_loss(s_w, s_l, n_w, n_l, 0.5).item() == pytest.approx(1.0)
    assert dpo.pair_loss("ipo", s_w, s_l, n_w, n_l, 0.5).item() == pytest.approx(1.0)
    assert dpo.pair_loss("sigmoid", s_w, s_l, n_w, n_l, 0.5).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))


# ----- best-of-n -----------------------------------------------------------------------------------
def brute_force_bon(p: np.ndarray, r: np.ndarray, n: int) -> np.ndarray:
    """pi(y) by enumerating every n-tuple of draws; the winner is uniform among the draws of top reward."""
    pi = np.zeros(len(p))
    for draw in itertools.product(range(len(p)), repeat=n):
        w = float(np.prod(p[list(draw)]))
        best = max(r[i] for i in draw)
        winners = [i for i in draw if r[i] == best]
        for i in winners:
            pi[i] += w / len(winners)
    return pi


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_exact_bon_kl_matches_enumeration_with_ties(n):
    p = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    r = np.array([1.0, 2.0, 2.0, 0.5, 3.0])  # outcomes 1 and 2 tie
    pi = brute_force_bon(p, r, n)
    assert best_of_n.bon_distribution(p, r, n) == pytest.approx(pi, abs=1e-12)
    kl = float((pi[pi > 0] * np.log(pi[pi > 0] / p[pi > 0])).sum())
    assert best_of_n.bon_exact_kl(p, r, n) == pytest.approx(kl, abs=1e-12)
    assert best_of_n.bon_exact_kl(p, r, n) <= best_of_n.bon_kl(n) + 1e-12


def test_exact_bon_kl_with_a_tie_at_the_top_and_its_limits():
    p = np.array([0.5, 0.25, 0.25])
    r = np.array([0.0, 1.0, 1.0])  # the top class {1, 2} has mass 0.5
    pi = brute_force_bon(p, r, 3)
    assert pi.tolist() == pytest.approx([0.125, 0.4375, 0.4375])
    assert best_of_n.bon_exact_kl(p, r, 3) == pytest.approx(0.125 * math.log(0.25) + 0.875 * math.log(1.75))
    # saturation: at most -log p(top class), however large n
    assert best_of_n.bon_exact_kl(p, r, 200) == pytest.approx(math.log(2), rel=1e-6)
    # many equally likely distinct outcomes: the continuous formula log n - (n-1)/n
    M = 20000
    assert best_of_n.bon_exact_kl(np.full(M, 1 / M), np.arange(M, dtype=float), 16) == pytest.approx(best_of_n.bon_kl(16), abs=1e-3)


def test_bon_estimate_breaks_proxy_ties_at_random():
    proxy = np.array([1.0, 3.0, 3.0, 2.0, 0.0])
    value = np.array([10.0, 1.0, 5.0, 7.0, 2.0])
    for n in (1, 2, 3):
        # every n-subset equally likely; the winner uniform among the subset's samples of top proxy
        total, subsets = 0.0, list(itertools.combinations(range(5), n))
        for s in subsets:
            top = max(proxy[list(s)])
            total += np.mean([value[i] for i in s if proxy[i] == top])
        assert best_of_n.bon_estimate(proxy, value, n) == pytest.approx(total / len(subsets))


def test_win_probability_counts_ties_half_and_excludes_itself():
    got = bon.win_probability(np.array([[1.0, 2.0, 2.0, 3.0]]))
    assert got.tolist() == [[0.0, 1.5 / 3, 1.5 / 3, 1.0]]
    assert bon.path(16) == [1, 2, 4, 8, 16] and bon.path(12) == [1, 2, 4, 8, 12]


def test_exact_kls_merge_identical_responses():
    # one prompt, 4 samples: response ids 7, 7, 9, 3 -> outcomes 7 (p 1/2), 9, 3 (1/4 each); RM: 3 best, 7 worst
    ids, rm = np.array([[7, 7, 9, 3]]), np.array([[0.0, 0.0, 1.0, 2.0]])
    want = best_of_n.bon_exact_kl(np.array([0.25, 0.5, 0.25]), np.array([2.0, 0.0, 1.0]), 4)
    assert bon.exact_kls(ids, rm, 4)[0] == pytest.approx(want)


# ----- the knob --------------------------------------------------------------------------------------
def test_algo_group_composes_each_algorithm():
    assert compose([]).algo == "ppo"
    for a in ("rloo", "grpo", "dpo", "ipo", "bon"):
        assert compose([f"algo={a}"]).algo == a
    c = compose(["algo=ipo", "dpo.beta=0.5"])
    assert (c.algo, c.dpo.beta) == ("ipo", 0.5)
    assert compose(["experiment=algo_rloo"]).algo == "rloo"


@pytest.mark.parametrize("override,needle", [
    (["rloo.beta=0.1"], "add algo=rloo"),
    (["dpo.beta=0.1"], "algo=dpo and algo=ipo"),
    (["algo=rloo", "rloo.batch_size=30"], "an integer multiple of rloo.num_generations=4"),
    # a batch that the update steps do not split evenly would leave samples out of every update
    (["ppo.batch_size=3", "ppo.minibatches=2"], "ppo.minibatches accepts an integer in [1, ppo.batch_size=3] that divides it"),
    (["algo=rloo", "rloo.batch_size=12", "rloo.num_generations=4", "rloo.steps_per_generation=5"],
     "rloo.steps_per_generation accepts an integer in [1, rloo.batch_size=12] that divides it"),
    (["algo=grpo", "grpo.batch_size=24", "grpo.steps_per_generation=5"], "grpo.steps_per_generation"),
    (["algo=grpo", "grpo.loss_type=sum"], "grpo | bnpo | dr_grpo | dapo"),
    (["algo=bon", "bon.n=512"], "bon.samples_per_prompt"),
    (["algo=reinforce"], "options: bon, dpo, grpo, ipo, ppo, rloo"),
])
def test_bad_algo_knobs_fail_in_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        compose(override)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.e2e
def test_best_of_n_runs_share_their_cached_samples(tmp_path):
    """Runs with another n reuse the reference samples and RM scores (keyed by reference, RM, prompts and
    samples per prompt) and give what an uncached run gives; the exact KL stays under the bound."""
    import math

    from rlhf_sweep.run import pipeline

    from .conftest import TINY

    def run(n: int) -> dict:
        cfg = compose([*TINY, "mlflow.enabled=false", "algo=bon", f"bon.n={n}", "bon.samples_per_prompt=32"])
        cfg.cache_dir = str(tmp_path)
        return pipeline.run(cfg, say=lambda *_: None)

    run(16)
    (cached,) = list(tmp_path.glob("bonsamples-*.pt"))
    shared = run(4)
    assert list(tmp_path.glob("bonsamples-*.pt")) == [cached]  # n is not part of the key
    cached.unlink()
    fresh = run(4)
    same = lambda a, b: a == b or (math.isnan(a) and math.isnan(b))  # noqa: E731
    assert all(same(shared["metrics"][k], fresh["metrics"][k]) for k in fresh["metrics"])
    assert shared["history"] == fresh["history"] and [h["bon/n"] for h in fresh["history"]] == [1, 2, 4]
    m = fresh["metrics"]
    assert 0 < m["kl/exact"] <= m["kl/bon_bound"] + 1e-9 and m["rm/win_rate"] > 0.5
    assert fresh["observations"]["kl_increasing"]["applies"] is False
