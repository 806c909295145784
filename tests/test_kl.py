"""KL estimators against torch.distributions and against each other in expectation."""

import math

import pytest
import torch

from rlhf_sweep.maths import kl


def test_exact_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits), torch.distributions.Categorical(logits=ref_logits)
    )
    assert torch.allclose(kl.exact(logits, ref_logits), expected, atol=1e-5)


def test_exact_is_zero_for_identical_policies():
    logits = torch.randn(2, 4, 7)
    assert torch.allclose(kl.exact(logits, logits), torch.zeros(2, 4), atol=1e-6)


def test_exact_is_never_negative_from_rounding():
    """Two forwards of the same weights differ by float rounding; half the raw sums would then be -1e-7."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 24, 44, generator=g)
    nearly = logits + 1e-6 * torch.randn(logits.shape, generator=g)
    assert (kl.exact(logits, nearly) >= 0).all()


def test_k1_and_k3_are_unbiased_for_exact_kl_on_a_fixed_pair():
    """Sequences of 4 independent tokens from pi; sums of k1 and k3 match 4 * KL(pi || ref)."""
    pi_logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0])
    ref_logits = torch.tensor([0.0, 1.0, 0.5, -0.5, 0.2])
    pi, ref = torch.log_softmax(pi_logits, -1), torch.log_softmax(ref_logits, -1)
    true_seq_kl = 4 * float(kl.exact(pi_logits, ref_logits))
    g = torch.Generator().manual_seed(1)
    tokens = torch.multinomial(pi.exp(), 200_000 * 4, replacement=True, generator=g).view(-1, 4)
    lp, rlp = pi[tokens], ref[tokens]
    k1_seq, k3_seq = kl.k1(lp, rlp).sum(1), kl.k3(lp, rlp).sum(1)
    se1 = float(k1_seq.std()) / math.sqrt(len(k1_seq))
    se3 = float(k3_seq.std()) / math.sqrt(len(k3_seq))
    assert abs(float(k1_seq.mean()) - true_seq_kl) < 4 * se1
    assert abs(float(k3_seq.mean()) - true_seq_kl) < 4 * se3
    assert (kl.k3(lp, rlp) >= 0).all()  # k3 is never negative
    assert (kl.k1(lp, rlp) < 0).any()  # k1 is, on some tokens
    assert float(k3_seq.std()) < float(k1_seq.std())  # and k3 has the lower variance here


def test_k_estimators_hand_values():
    lp, rlp = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # r = ref/pi = 0.5
    assert kl.k1(lp, rlp).item() == pytest.approx(math.log(2))
    assert kl.k2(lp, rlp).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl.k3(lp, rlp).item() == pytest.approx((0.5 - 1) + math.log(2))


def test_per_token_dispatch_and_sequence_sum():
    lp, rlp = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert kl.sequence_sum(kl.per_token("k1", lp, rlp), mask).item() == pytest.approx(0.5 - 1.0)
    assert kl.per_token("k2", lp, rlp)[0].tolist() == pytest.approx([0.125, 0.5, 0.0])  # (log r)^2 / 2
    with pytest.raises(ValueError, match="k1 | k2 | k3 | exact"):
        kl.per_token("k9", lp, rlp)


def test_adaptive_beta_hand_values():
    # KL twice the target: error clipped to +0.2; n/horizon = 64/10000
    assert kl.adaptive_beta(0.1, 12.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    # KL at 0.9 x target: error -0.1
    assert kl.adaptive_beta(0.1, 5.4, 6.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
