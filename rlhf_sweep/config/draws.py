"""Drawn worlds: `world.draw=N` names the world whose knobs are sampled from `DRAW_RANGES` on numpy's stream
[DRAW_STREAM, N], a pure function of N; `apply_draw` keeps every field set away from the default world.

It lives with the config because a draw is a config transform (WorldConfig -> WorldConfig) that
`load_config` applies; `simulation.world.World.check` is what every world, drawn or not, must pass.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from rlhf_sweep.config.schema import DemoConfig, GoldConfig, LabelerConfig, WorldConfig

# What a drawn world samples, uniformly in [low, high] ("log": uniformly in log space; "int": each integer
# alike). Every range holds the default world. gold.action stays 1 (the unit of gold). The demo mix draws
# the complete share, then the wrong answers' share of the rest (the remainder is partial answers).
# The order is part of the contract: draw N of a new range appended at the end keeps every earlier value.
DRAW_RANGES: dict[str, tuple[float, float, str]] = {
    "n_intents": (4, 12, "int"),  # also the number of actions (one per intent)
    "n_details": (4, 12, "int"),
    "n_filler": (3, 12, "int"),
    "n_explain": (3, 12, "int"),
    "max_new_tokens": (16, 32, "int"),  # the response length limit
    "second_detail_prob": (0.2, 0.8, "float"),
    "gold.directness": (0.8, 0.97, "float"),
    "gold.wrong_action": (-0.8, -0.2, "float"),
    "gold.detail": (0.1, 0.3, "float"),
    "gold.first_filler": (0.0, 0.2, "float"),
    "gold.extra_filler": (-0.2, -0.05, "float"),
    "gold.ideal_len": (3, 6, "int"),
    "gold.over_len": (-0.06, -0.01, "float"),
    "gold.no_eos": (-0.5, -0.1, "float"),
    "labeler.tau": (0.15, 0.5, "log"),
    "labeler.flip_rate": (0.01, 0.15, "float"),
    "labeler.length_bias": (0.0, 0.6, "float"),
    "labeler.filler_bias": (0.0, 1.2, "float"),
    "demo.complete": (0.55, 0.9, "float"),
    "demo.wrong_share": (0.2, 0.6, "float"),  # wrong = (1 - complete) * wrong_share; partial = the rest
}


DRAW_STREAM = 17  # draw N uses numpy's stream [DRAW_STREAM, N]: independent of `seed` and of every run stream


DRAW_DECIMALS = 4  # drawn numbers are rounded, so they print, log and hash the same everywhere


def _flat_world(w: WorldConfig) -> dict:
    out = {}
    for k, v in dataclasses.asdict(w).items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _world_from_flat(flat: dict) -> WorldConfig:
    nested: dict = {"gold": {}, "labeler": {}, "demo": {}}
    for k, v in flat.items():
        if "." in k:
            group, name = k.split(".", 1)
            nested[group][name] = v
        else:
            nested[k] = v
    return WorldConfig(**{**nested, "gold": GoldConfig(**nested["gold"]), "labeler": LabelerConfig(**nested["labeler"]),
                          "demo": DemoConfig(**nested["demo"])})


def draw_world(n: int) -> WorldConfig:
    """World number n: every knob of DRAW_RANGES sampled from its own numpy stream; a pure function of n."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"world.draw must be an integer >= 0, got {n!r}")
    rng = np.random.default_rng([DRAW_STREAM, int(n)])
    vals: dict = {}
    for key, (lo, hi, kind) in DRAW_RANGES.items():
        if kind == "int":
            vals[key] = int(rng.integers(int(lo), int(hi) + 1))
        elif kind == "log":
            vals[key] = round(math.exp(rng.uniform(math.log(lo), math.log(hi))), DRAW_DECIMALS)
        else:
            vals[key] = round(float(rng.uniform(lo, hi)), DRAW_DECIMALS)
    complete, share = vals.pop("demo.complete"), vals.pop("demo.wrong_share")
    wrong = round((1 - complete) * share, DRAW_DECIMALS)
    vals.update({"demo.complete": complete, "demo.wrong": wrong, "demo.partial": round(1 - complete - wrong, DRAW_DECIMALS)})
    flat = _flat_world(WorldConfig())
    flat.update(vals, draw=int(n))
    return _world_from_flat(flat)


def apply_draw(w: WorldConfig) -> WorldConfig:
    """The world `w.draw` names, keeping every field of `w` set away from the default world.

    So `world.draw=3 experiment=unbiased_labelers` is draw 3 with unbiased labelers. A field set by hand to
    exactly its default value cannot be told from an unset one: the draw's value wins there. Cheap (no
    sampling): `pipeline.run` checks the world it runs (`check_world`), not every compose.
    """
    drawn = draw_world(w.draw)
    default, mine, theirs = _flat_world(WorldConfig()), _flat_world(w), _flat_world(drawn)
    return _world_from_flat({k: (mine[k] if mine[k] != default[k] else theirs[k]) for k in default} | {"draw": w.draw})
