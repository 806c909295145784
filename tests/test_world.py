"""Gold h, features and the labelers on hand-written sequences."""

import math

import numpy as np
import pytest
import torch

from rlhf_sweep.config import schema
from rlhf_sweep.config.schema import GoldConfig, LabelerConfig, WorldConfig
from rlhf_sweep.simulation.world import BOS, EOS, PAD, PROMPT_LEN, SEP, World, label_pairs, labeler_logit

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


# ----- random worlds (world.draw) -------------------------------------------------------------
def test_draw_is_reproducible_and_draws_differ():
    from rlhf_sweep.config.draws import draw_world

    assert draw_world(3) == draw_world(3)
    worlds = [draw_world(n) for n in range(40)]
    assert len({repr(w) for w in worlds}) == 40
    # every range is used: no knob stays at one value across 40 draws
    from rlhf_sweep.config.draws import DRAW_RANGES, _flat_world

    flat = [_flat_world(w) for w in worlds]
    for key in DRAW_RANGES:
        if key != "demo.wrong_share":
            assert len({f[key] for f in flat}) > 1, key
            lo, hi, _ = DRAW_RANGES[key]
            assert all(lo <= f[key] <= hi for f in flat), key


def test_draw_does_not_depend_on_the_seed_or_the_global_random_state():
    from rlhf_sweep.config.compose import compose

    a = compose(["world.draw=5", "seed=0"]).world
    np.random.seed(123)
    torch.manual_seed(9)
    b = compose(["world.draw=5", "seed=7"]).world
    assert a == b and a.draw == 5


def test_every_drawn_world_passes_the_world_checks():
    from rlhf_sweep.config.draws import draw_world
    from rlhf_sweep.simulation.world import check_world

    for n in range(60):
        w = draw_world(n)
        assert check_world(w) == [], (n, check_world(w))
        assert abs(w.demo.complete + w.demo.partial + w.demo.wrong - 1) < 1e-3


def test_world_checks_catch_broken_worlds(monkeypatch):
    """The checks can fail: each kind of broken world is caught."""
    from rlhf_sweep.simulation.world import check_world

    assert check_world(WorldConfig()) == []
    bad_gold = WorldConfig(gold=GoldConfig(wrong_action=0.5))
    assert any("gold is not ordered" in p for p in check_world(bad_gold))
    saturated = WorldConfig(labeler=LabelerConfig(tau=0.001, flip_rate=0.0))
    assert any("0 or 1" in p for p in check_world(saturated))
    contrary = WorldConfig(labeler=LabelerConfig(tau=100.0, length_bias=-2.0, filler_bias=0.0))
    assert any("agree with gold" in p for p in check_world(contrary))
    off_mix = WorldConfig(demo=schema.DemoConfig(complete=0.75, partial=0.15, wrong=0.10))
    real = World.demonstrations

    def no_eos(self, prompts, rng):  # a template writer that forgets EOS and repeats the action
        d = real(self, prompts, rng)
        d[d == EOS] = self.vocab.action0
        return d

    monkeypatch.setattr(World, "demonstrations", no_eos)
    problems = check_world(off_mix)
    assert any("does not end with EOS" in p for p in problems) and any("more than one action" in p for p in problems)


def test_default_world_is_untouched_without_a_draw():
    from rlhf_sweep.config.compose import compose
    from rlhf_sweep.config.schema import Config
    from rlhf_sweep.run import pipeline

    c = compose([])
    assert c.world == WorldConfig() and c.world.draw is None
    assert compose(["world.draw=null"]).world == WorldConfig()
    cpu = torch.device("cpu")
    # the cache keys of the default world are those it had before draws existed (the world without 'draw')
    import dataclasses

    from rlhf_sweep.config.schema import config_hash

    w = dataclasses.asdict(Config().world)
    w.pop("draw")
    assert pipeline.world_key(c) == w
    drawn = compose(["world.draw=0"])
    assert pipeline.sft_key(drawn, cpu) != pipeline.sft_key(c, cpu)
    assert pipeline.rm_key(drawn, cpu) != pipeline.rm_key(c, cpu)
    assert config_hash(pipeline.world_key(c)) != config_hash(pipeline.world_key(drawn))


def test_draw_keeps_fields_set_by_hand():
    from rlhf_sweep.config.compose import compose
    from rlhf_sweep.config.draws import draw_world
    from rlhf_sweep.config.schema import ConfigError

    c = compose(["world.draw=2", "experiment=unbiased_labelers"])
    d = draw_world(2)
    assert (c.world.labeler.length_bias, c.world.labeler.filler_bias) == (0.0, 0.0)
    assert (c.world.n_intents, c.world.labeler.tau, c.world.gold.directness) == (d.n_intents, d.labeler.tau, d.gold.directness)
    with pytest.raises(ConfigError, match="world.draw"):
        compose(["world.draw=-1"])
