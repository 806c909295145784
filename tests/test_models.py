"""Models built from config: sampling with the KV cache, masks, and the policy's first-step ratio."""

import numpy as np
import pytest
import torch

from rlhf_sweep.config.schema import ModelConfig, WorldConfig
from rlhf_sweep.models.lm import (
    PolicyWithValue,
    build_lm,
    draw,
    is_fast,
    last_index,
    lm_logits,
    response_logits,
    response_mask,
    sample,
    token_logprobs,
)
from rlhf_sweep.simulation.world import EOS, PAD, PROMPT_LEN, World

W = World(WorldConfig())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampling_ends_rows_at_eos_and_pads_after(arch):
    torch.manual_seed(0)
    lm = build_lm(ModelConfig(arch=arch), W.vocab.size, PROMPT_LEN + 24).eval()
    prompts = W.sample_prompts(32, np.random.default_rng(0))
    r = sample(lm, prompts, 24, torch.Generator().manual_seed(0))
    assert r.shape == (32, 24)
    for row in r.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1 :])


@pytest.mark.parametrize("fast", [True, False])
def test_cached_sampling_logprobs_equal_a_full_forward(fast):
    """The KV-cache loop samples from the same distribution transformers' full forward scores."""
    torch.manual_seed(0)
    lm = build_lm(ModelConfig(fast_forward=fast), W.vocab.size, PROMPT_LEN + 24).eval()
    prompts = W.sample_prompts(8, np.random.default_rng(1))
    g = torch.Generator().manual_seed(3)
    r = sample(lm, prompts, 6, g)
    # replay the sampler's draws with a full forward at each step
    g2 = torch.Generator().manual_seed(3)
    seq = prompts.clone()
    done = torch.zeros(8, dtype=torch.bool)
    for t in range(r.shape[1]):
        logits = lm(input_ids=seq, use_cache=False).logits[:, -1]
        tok = draw(torch.softmax(logits.float(), -1), g2)
        tok = torch.where(done, torch.full_like(tok, PAD), tok)
        assert torch.equal(tok, r[:, t])
        done |= tok == EOS
        seq = torch.cat([seq, tok[:, None]], 1)
        if done.all():
            break


def test_gpt2_has_no_dropout_and_world_token_ids():
    lm = build_lm(ModelConfig(), W.vocab.size, 29)
    c = lm.config
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.0, 0.0, 0.0)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.vocab_size) == (1, EOS, PAD, W.vocab.size)


def test_policy_ratio_is_one_before_the_first_update():
    torch.manual_seed(0)
    policy = PolicyWithValue(build_lm(ModelConfig(), W.vocab.size, 29), 64).train()
    prompts = W.sample_prompts(16, np.random.default_rng(0))
    r = sample(policy.lm, prompts, 24, torch.Generator().manual_seed(0))
    seq = torch.cat([prompts, r], 1)
    a, _ = policy(seq)
    b, _ = policy(seq)  # train mode: any dropout would make these differ
    lp_a, lp_b = token_logprobs(response_logits(a), r), token_logprobs(response_logits(b), r)
    assert torch.equal(lp_a, lp_b)


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh", "gelu_new", "relu"])
def test_fast_forward_equals_transformers_forward_and_gradients(activation):
    """The hand-written GPT-2 forward is transformers' function on the same weights: logits and the
    gradient of a loss through them agree to float rounding."""
    torch.manual_seed(0)
    lm = build_lm(ModelConfig(activation=activation), W.vocab.size, PROMPT_LEN + 24)
    for p in lm.parameters():  # away from the init's symmetries, so every weight matters
        torch.nn.init.normal_(p, std=0.3)
    seqs = torch.cat([W.sample_prompts(8, np.random.default_rng(0)), torch.randint(2, W.vocab.size, (8, 24))], 1)
    grads = []
    assert is_fast(lm)  # the default config takes the hand-written path
    for fast in (True, False):
        lm.config.fast_forward = fast
        assert is_fast(lm) == fast
        logits = lm_logits(lm, seqs) if fast else lm(input_ids=seqs, use_cache=False).logits
        lm.zero_grad()
        logits.log_softmax(-1)[..., 3].sum().backward()
        grads.append((logits.detach(), [p.grad.clone() for p in lm.parameters()]))
    (fast_logits, fast_grads), (hf_logits, hf_grads) = grads
    torch.testing.assert_close(fast_logits, hf_logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(fast_grads, hf_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_draw_samples_the_given_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3], [0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    toks = torch.stack([draw(probs, g) for _ in range(20_000)])
    freq = torch.stack([(toks[:, 0] == k).float().mean() for k in range(4)])
    assert (freq - probs[0]).abs().max() < 0.015  # ~4 standard errors at 20k draws
    assert (toks[:, 0] != 1).all() and (toks[:, 1] == 3).all()  # never a zero-probability token


@pytest.mark.parametrize("arch", ["gpt2", "gpt2-transformers", "llama"])
def test_sampling_states_equal_a_second_forward_pass(arch):
    """The rollout takes log-probs, exact KL and values from the sampling pass: they must be what a
    full forward over prompt+response gives (up to float rounding), and the tokens the same."""
    torch.manual_seed(0)
    mc = ModelConfig(arch=arch.split("-")[0], activation="silu" if arch == "llama" else "gelu",
                     fast_forward=not arch.endswith("transformers"))
    policy = PolicyWithValue(build_lm(mc, W.vocab.size, 29), 64)
    assert is_fast(policy.lm) == (arch == "gpt2")
    torch.nn.init.normal_(policy.v_head.weight, std=0.5)
    prompts = W.sample_prompts(16, np.random.default_rng(0))
    plain = sample(policy.lm, prompts, 24, torch.Generator().manual_seed(3))
    r, logits, hidden = sample(policy.lm, prompts, 24, torch.Generator().manual_seed(3), with_states=True)
    assert torch.equal(r, plain[:, : r.shape[1]]) and (plain[:, r.shape[1]:] == PAD).all()
    assert logits.shape[:2] == r.shape == hidden.shape[:2]
    with torch.no_grad():
        full_logits, full_values = policy(torch.cat([prompts, r], 1))
    torch.testing.assert_close(logits, response_logits(full_logits), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(policy.v_head(hidden).squeeze(-1), full_values[:, PROMPT_LEN - 1 : -1], atol=1e-4, rtol=1e-4)


def test_masks_and_last_index():
    r = torch.tensor([[5, 6, EOS, PAD], [5, 6, 7, 8]])
    assert response_mask(r).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert last_index(r).tolist() == [2, 3]
