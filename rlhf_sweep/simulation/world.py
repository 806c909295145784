"""The simulated support desk: vocabulary, prompts, SFT demonstrations, gold h and the labelers.

Everything here is exact and cheap. Prompts are `BOS I_k D_m [D_m'] SEP`,
left-padded with PAD to a fixed width of 5 (PAD is an ordinary token the models
see, so prompts need no attention mask). Responses are up to `max_new_tokens`
tokens ending with EOS, PAD after it. Nothing in this module rewards length for
its own sake except the labelers' `length_bias` and `filler_bias`.

It also owns random worlds (`world.draw=N`): `draw_world(N)` samples every world knob
from `DRAW_RANGES`, a pure function of N, and `World.check` is what every world, drawn or
not, must satisfy (gold well-defined, labeler probabilities strictly inside (0, 1),
valid demonstrations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rlhf_sweep.config.draws import DRAW_STREAM
from rlhf_sweep.config.schema import LabelerConfig, WorldConfig

PAD, BOS, SEP, EOS = 0, 1, 2, 3
PROMPT_LEN = 5


@dataclass(frozen=True)
class Vocab:
    """Token id layout: 4 specials, then intents, details, actions, filler, explanation."""

    n_intents: int
    n_details: int
    n_filler: int
    n_explain: int

    @property
    def intent0(self) -> int:
        return 4

    @property
    def detail0(self) -> int:
        return self.intent0 + self.n_intents

    @property
    def action0(self) -> int:
        return self.detail0 + self.n_details

    @property
    def filler0(self) -> int:
        return self.action0 + self.n_intents

    @property
    def explain0(self) -> int:
        return self.filler0 + self.n_filler

    @property
    def size(self) -> int:
        return self.explain0 + self.n_explain

    def is_intent(self, t: torch.Tensor) -> torch.Tensor:
        return (t >= self.intent0) & (t < self.detail0)

    def is_detail(self, t: torch.Tensor) -> torch.Tensor:
        return (t >= self.detail0) & (t < self.action0)

    def is_action(self, t: torch.Tensor) -> torch.Tensor:
        return (t >= self.action0) & (t < self.filler0)

    def is_filler(self, t: torch.Tensor) -> torch.Tensor:
        return (t >= self.filler0) & (t < self.explain0)

    def is_explain(self, t: torch.Tensor) -> torch.Tensor:
        return (t >= self.explain0) & (t < self.size)

    def names(self) -> list[str]:
        out = ["PAD", "BOS", "SEP", "EOS"]
        out += [f"I{k}" for k in range(self.n_intents)] + [f"D{m}" for m in range(self.n_details)]
        out += [f"A{k}" for k in range(self.n_intents)] + [f"F{i}" for i in range(self.n_filler)]
        return out + [f"E{i}" for i in range(self.n_explain)]

    def decode(self, tokens: list[int] | torch.Tensor) -> str:
        names = self.names()
        return " ".join(names[int(t)] for t in tokens if int(t) != PAD)


class World:
    """Prompts, demonstrations, gold helpfulness and labelers for one WorldConfig."""

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        self.vocab = Vocab(cfg.n_intents, cfg.n_details, cfg.n_filler, cfg.n_explain)

    def check(self) -> list[str]:
        """The problems `check_world` finds in this world (empty: sound)."""
        return check_world(self.cfg)

    # ----- prompts -------------------------------------------------------------------------
    def sample_prompts(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        v, c = self.vocab, self.cfg
        intents = rng.integers(0, c.n_intents, n)
        d1 = rng.integers(0, c.n_details, n)
        # a distinct second detail with probability second_detail_prob
        d2 = (d1 + rng.integers(1, c.n_details, n)) % c.n_details
        two = rng.random(n) < c.second_detail_prob
        out = np.full((n, PROMPT_LEN), PAD, dtype=np.int64)
        out[:, 0] = np.where(two, BOS, PAD)
        out[:, 1] = np.where(two, v.intent0 + intents, BOS)
        out[:, 2] = np.where(two, v.detail0 + d1, v.intent0 + intents)
        out[:, 3] = np.where(two, v.detail0 + d2, v.detail0 + d1)
        out[:, 4] = SEP
        return torch.from_numpy(out)

    def prompt_intent(self, prompts: torch.Tensor) -> torch.Tensor:
        v = self.vocab
        is_int = v.is_intent(prompts)
        return ((prompts - v.intent0) * is_int).sum(1)

    # ----- SFT demonstrations --------------------------------------------------------------
    def demonstrations(self, prompts: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Responses from a stochastic template writer; complete answers carry explanations.

        complete: [F..] A_k [D_m] E.. [F]; partial: [F..] [D_m] E.. [F] (no action);
        wrong: [F..] A_j [D_m] E.. [F] with j != k; the last F is a sign-off. Length and quality are correlated
        in the data, as in real preference sets.
        """
        v, c = self.vocab, self.cfg
        mix = np.array([c.demo.complete, c.demo.partial, c.demo.wrong], dtype=float)
        kinds = rng.choice(3, size=len(prompts), p=mix / mix.sum())
        intents = self.prompt_intent(prompts).numpy()
        rows = []
        for i, kind in enumerate(kinds):
            details = [int(t) for t in prompts[i] if v.detail0 <= int(t) < v.action0]
            toks = [v.filler0 + int(f) for f in rng.integers(0, c.n_filler, rng.choice(3, p=[0.5, 0.4, 0.1]))]
            if kind == 0:
                toks.append(v.action0 + int(intents[i]))
                n_expl = rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])
            elif kind == 2:
                wrong = (int(intents[i]) + int(rng.integers(1, c.n_intents))) % c.n_intents
                toks.append(v.action0 + wrong)
                n_expl = rng.choice([0, 1, 2], p=[0.4, 0.4, 0.2])
            else:
                n_expl = rng.choice([0, 1, 2], p=[0.4, 0.4, 0.2])
            if rng.random() < (0.8 if kind == 1 else 0.6):
                toks.append(int(rng.choice(details)))
            toks += [v.explain0 + int(e) for e in rng.integers(0, c.n_explain, n_expl)]
            if rng.random() < 0.15:  # a polite sign-off ("hope this helps")
                toks.append(v.filler0 + int(rng.integers(0, c.n_filler)))
            rows.append(toks[: c.max_new_tokens - 1] + [EOS])
        out = torch.full((len(rows), c.max_new_tokens), PAD, dtype=torch.long)
        for i, toks in enumerate(rows):
            out[i, : len(toks)] = torch.tensor(toks)
        return out

    # ----- features and gold ---------------------------------------------------------------
    def features(self, prompts: torch.Tensor, responses: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-response counts that gold, the labelers and the evaluation read.

        `length` counts content tokens before the first EOS (EOS itself excluded).
        """
        v = self.vocab
        responses = responses.to(torch.long)
        B, T = responses.shape
        is_eos = responses == EOS
        ended = is_eos.any(1)
        pos = torch.arange(T).expand(B, T)
        length = torch.where(ended, is_eos.float().argmax(1), torch.full((B,), T)).long()
        content = pos < length[:, None]
        intent = self.prompt_intent(prompts)
        correct_tok = v.action0 + intent
        is_correct = (responses == correct_tok[:, None]) & content
        has_correct = is_correct.any(1)
        first_correct = torch.where(has_correct, is_correct.float().argmax(1), torch.full((B,), -1)).long()
        n_wrong = (v.is_action(responses) & ~is_correct & content).sum(1)
        n_filler = (v.is_filler(responses) & content).sum(1)
        prompt_details = torch.where(v.is_detail(prompts), prompts, torch.full_like(prompts, -1))
        ack = ((responses[:, :, None] == prompt_details[:, None, :]).any(2) & content).any(1)
        return {
            "length": length,
            "filler": n_filler,
            "has_correct": has_correct,
            "first_correct": first_correct,
            "n_correct": is_correct.sum(1),
            "n_wrong": n_wrong,
            "ack": ack,
            "ended": ended,
        }

    def gold(self, prompts: torch.Tensor, responses: torch.Tensor, feats: dict | None = None) -> torch.Tensor:
        """Gold helpfulness h(x, y): what a careful human spot-checker thinks."""
        g = self.cfg.gold
        f = feats if feats is not None else self.features(prompts, responses)
        pos = f["first_correct"].clamp(min=0).double()
        h = g.action * f["has_correct"].double() * (g.directness**pos)
        h = h + g.wrong_action * f["n_wrong"].double()
        h = h + g.detail * f["ack"].double()
        nf = f["filler"].double()
        h = h + g.first_filler * (nf > 0).double() + g.extra_filler * (nf - 1).clamp(min=0)
        h = h + g.over_len * (f["length"].double() - g.ideal_len).clamp(min=0)
        h = h + g.no_eos * (~f["ended"]).double()
        return h.float()


def labeler_logit(dh: torch.Tensor, dlen: torch.Tensor, dfill: torch.Tensor, cfg: LabelerConfig) -> torch.Tensor:
    """Log-odds that a labeler prefers y1 over y2, before label noise."""
    return dh / cfg.tau + cfg.length_bias * dlen + cfg.filler_bias * dfill


def label_pairs(
    h1: torch.Tensor,
    h2: torch.Tensor,
    f1: dict[str, torch.Tensor],
    f2: dict[str, torch.Tensor],
    cfg: LabelerConfig,
    rng: np.random.Generator,
) -> torch.Tensor:
    """1 where the labeler prefers y1, 0 where y2; drawn, then flipped with prob flip_rate."""
    logit = labeler_logit(h1 - h2, (f1["length"] - f2["length"]).float(), (f1["filler"] - f2["filler"]).float(), cfg)
    p = torch.sigmoid(logit).numpy()
    y = rng.random(len(p)) < p
    flip = rng.random(len(p)) < cfg.flip_rate
    return torch.from_numpy(y ^ flip).long()


# ----- random worlds (world.draw=N) ------------------------------------------------------------
class WorldCheckError(ValueError):
    """A world that fails `check_world`: the message lists what is wrong."""


def describe_world(w: WorldConfig) -> str:
    """One line for a run header: which world this is and its main knobs."""
    g, lab, d = w.gold, w.labeler, w.demo
    name = "default world" if w.draw is None else f"world draw {w.draw}"
    return (f"{name}: {w.n_intents} intents/actions, {w.n_details} details, {w.n_filler} filler, {w.n_explain} explanation "
            f"tokens, responses <= {w.max_new_tokens}; gold directness {g.directness:g}, wrong action {g.wrong_action:g}, "
            f"ideal length {g.ideal_len}; labelers tau {lab.tau:g}, length_bias {lab.length_bias:g}, filler_bias "
            f"{lab.filler_bias:g}, flip {lab.flip_rate:g}; demos complete/partial/wrong {d.complete:g}/{d.partial:g}/{d.wrong:g}")


def check_world(cfg: WorldConfig, n: int = 2000, seed: int = 0) -> list[str]:
    """What every world must satisfy; returns the problems (empty: the world is sound).

    gold well-defined: finite on demonstrations and on random token strings, and ordered as its
    definition says (the correct action first >= the same action later > no action > a wrong action;
    ending beats never ending). Labelers: the probability of each label, noise included, strictly
    inside (0, 1) as `label_pairs` computes it, and labels that agree with gold more often than not.
    Demonstrations: every one ends with EOS within max_new_tokens, PAD after it, only action, detail,
    filler and explanation tokens before it, at most one action, only the prompt's own details, and
    the complete / wrong shares within 0.05 of the configured mix.
    """
    world, problems = World(cfg), []
    v, rng = world.vocab, np.random.default_rng([DRAW_STREAM, 1_000_000 + seed])
    T = cfg.max_new_tokens
    prompts = world.sample_prompts(n, rng)
    demos = world.demonstrations(prompts, rng)
    f = world.features(prompts, demos)
    h = world.gold(prompts, demos, f)

    # gold
    noise = torch.from_numpy(rng.integers(0, v.size, (n, T)))
    if not (torch.isfinite(h).all() and torch.isfinite(world.gold(prompts, noise)).all()):
        problems.append("gold is not finite on every response")
    k = world.prompt_intent(prompts[:1])
    a_ok, a_bad, e = v.action0 + int(k), v.action0 + (int(k) + 1) % cfg.n_intents, v.explain0

    def h_of(*tokens: int) -> float:
        r = torch.full((1, T), PAD, dtype=torch.long)
        r[0, : len(tokens)] = torch.tensor(tokens[:T])
        return float(world.gold(prompts[:1], r))

    first, later, none, wrong = h_of(a_ok, EOS), h_of(e, e, a_ok, EOS), h_of(e, EOS), h_of(a_bad, e, EOS)
    if not first >= later > none > wrong:
        problems.append(f"gold is not ordered: correct action first {first:.3g}, later {later:.3g}, none {none:.3g}, "
                        f"wrong {wrong:.3g}")
    if not h_of(*([e] * T)) < h_of(*([e] * (T - 1)), EOS):
        problems.append("gold does not prefer a response that ends")

    # labelers, on pairs of demonstrations
    half = n // 2
    f1 = {key: val[:half] for key, val in f.items()}
    f2 = {key: val[half : 2 * half] for key, val in f.items()}
    dh = h[:half] - h[half : 2 * half]
    logit = labeler_logit(dh, (f1["length"] - f2["length"]).float(), (f1["filler"] - f2["filler"]).float(), cfg.labeler)
    p = torch.sigmoid(logit).double()
    q = p * (1 - cfg.labeler.flip_rate) + (1 - p) * cfg.labeler.flip_rate  # P(label = y1) after the flip
    if not bool(((q > 0) & (q < 1)).all()):
        problems.append("a labeler probability is 0 or 1 (raise world.labeler.flip_rate or world.labeler.tau)")
    decided = dh.abs() > 1e-6
    agree = float(torch.where(dh[decided] > 0, q[decided], 1 - q[decided]).mean()) if bool(decided.any()) else math.nan
    if not agree > 0.5:
        problems.append(f"labels agree with gold on {agree:.2f} of decided pairs, not more than half")

    # demonstrations
    pos = torch.arange(T).expand(n, T)
    after = pos > f["length"][:, None]
    content = pos < f["length"][:, None]
    allowed = v.is_action(demos) | v.is_detail(demos) | v.is_filler(demos) | v.is_explain(demos)
    if not bool(f["ended"].all()):
        problems.append("a demonstration does not end with EOS within max_new_tokens")
    if bool((demos[after] != PAD).any()):
        problems.append("a demonstration has tokens other than PAD after its EOS")
    if bool((content & ~allowed).any()):
        problems.append("a demonstration holds a special or intent token")
    if bool(((v.is_action(demos) & content).sum(1) > 1).any()):
        problems.append("a demonstration holds more than one action")
    details = v.is_detail(demos) & content
    own = (demos[:, :, None] == prompts[:, None, :]).any(2)
    if bool((details & ~own).any()):
        problems.append("a demonstration acknowledges a detail that is not in its prompt")
    mix = np.array([cfg.demo.complete, cfg.demo.partial, cfg.demo.wrong], dtype=float)
    mix = mix / mix.sum()
    got_complete, got_wrong = float(f["has_correct"].float().mean()), float((f["n_wrong"] > 0).float().mean())
    if abs(got_complete - mix[0]) > 0.05 or abs(got_wrong - mix[2]) > 0.05:
        problems.append(f"demonstrations are {got_complete:.2f} complete / {got_wrong:.2f} wrong, the mix asks for "
                        f"{mix[0]:.2f} / {mix[2]:.2f}")
    return problems
