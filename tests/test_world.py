"""Gold h, features and the labelers on hand-written sequences."""

import math

import numpy as np
import pytest
import torch

from rlhf_sweep.config import GoldConfig, LabelerConfig, WorldConfig
from rlhf_sweep.world import BOS, EOS, PAD, PROMPT_LEN, SEP, World, label_pairs, labeler_logit

W = World(WorldConfig())
V = W.vocab
T = W.cfg.max_new_tokens


def prompt(intent: int, *details: int) -> list[int]:
    body = [BOS, V.intent0 + intent] + [V.detail0 + d for d in details] + [SEP]
    return [PAD] * (PROMPT_LEN - len(body)) + body


def resp(tokens: list[int]) -> list[int]:
    return tokens + [PAD] * (T - len(tokens))


A, D, F, E = V.action0, V.detail0, V.filler0, V.explain0


def test_gold_hand_written():
    p = torch.tensor([prompt(2, 3)] * 4)
    r = torch.tensor([
        resp([F, A + 2, D + 3, E, EOS]),  # 0.9 + 0.2 + 0.1 = 1.2
        resp([F, F + 1, F + 2, A + 2, E, E + 1, E + 2, E + 3, EOS]),  # 0.9^3 + 0.1 - 0.2 - 0.03*4
        resp([A + 2, A + 5, D + 1, EOS]),  # 1.0 - 0.5 (wrong), D1 is not the prompt's detail
        [A + 5] * T,  # never ends: 24 wrong actions, 20 tokens too long, no EOS
    ])
    h = W.gold(p, r).tolist()
    assert h[0] == pytest.approx(1.2)
    assert h[1] == pytest.approx(0.9**3 + 0.1 - 0.2 - 0.12)
    assert h[2] == pytest.approx(0.5)
    assert h[3] == pytest.approx(-0.5 * 24 - 0.03 * 20 - 0.3)


def test_features_hand_written():
    p = torch.tensor([prompt(1, 4, 6)] * 2)
    r = torch.tensor([resp([F, F, A + 1, D + 6, EOS, F, F]), resp([E, A + 3, EOS])])
    f = W.features(p, r)
    assert f["length"].tolist() == [4, 2]  # EOS and what follows it do not count
    assert f["filler"].tolist() == [2, 0]
    assert f["first_correct"].tolist() == [2, -1]
    assert f["n_wrong"].tolist() == [0, 1]
    assert f["ack"].tolist() == [True, False]
    assert f["ended"].tolist() == [True, True]


def test_gold_weights_are_config():
    w = World(WorldConfig(gold=GoldConfig(directness=0.5, detail=1.0)))
    p = torch.tensor([prompt(0, 0)])
    r = torch.tensor([resp([F, A, D, EOS])])
    assert w.gold(p, r).item() == pytest.approx(0.5 + 1.0 + 0.1)


def test_prompts_have_the_documented_shape():
    p = W.sample_prompts(200, np.random.default_rng(0))
    assert p.shape == (200, PROMPT_LEN)
    assert (p[:, -1] == SEP).all()
    assert (V.is_intent(p).sum(1) == 1).all()
    assert set(V.is_detail(p).sum(1).tolist()) == {1, 2}


def test_demonstrations_correlate_length_with_quality():
    rng = np.random.default_rng(0)
    p = W.sample_prompts(4000, rng)
    d = W.demonstrations(p, rng)
    f = W.features(p, d)
    h = W.gold(p, d, f)
    assert f["ended"].all()
    assert abs(f["has_correct"].float().mean().item() - 0.75) < 0.03
    assert np.corrcoef(f["length"].numpy(), h.numpy())[0, 1] > 0.3
    assert 0.5 < f["filler"].float().mean().item() < 1.0


def test_labeler_logit_hand_value():
    cfg = LabelerConfig(tau=0.25, length_bias=0.3, filler_bias=0.6)
    logit = labeler_logit(torch.tensor(0.25), torch.tensor(2.0), torch.tensor(1.0), cfg)
    assert logit.item() == pytest.approx(1.0 + 0.6 + 0.6)


def test_labelers_follow_their_probability_and_flip_rate():
    n = 40_000
    cfg = LabelerConfig(tau=0.25, flip_rate=0.1, length_bias=0.3, filler_bias=0.0)
    h1, h2 = torch.zeros(n), torch.zeros(n)
    f1 = {"length": torch.full((n,), 5), "filler": torch.zeros(n, dtype=torch.long)}
    f2 = {"length": torch.full((n,), 3), "filler": torch.zeros(n, dtype=torch.long)}
    y = label_pairs(h1, h2, f1, f2, cfg, np.random.default_rng(0)).float().mean().item()
    p = 1 / (1 + math.exp(-0.6))
    assert y == pytest.approx(p * 0.9 + (1 - p) * 0.1, abs=0.01)  # longer wins more often
    unbiased = LabelerConfig(tau=0.25, flip_rate=0.0, length_bias=0.0, filler_bias=0.0)
    y0 = label_pairs(h1, h2, f1, f2, unbiased, np.random.default_rng(0)).float().mean().item()
    assert y0 == pytest.approx(0.5, abs=0.01)  # equal gold: a coin flip, length ignored
