"""One trial, end to end: world -> SFT reference -> labeled pairs -> RM -> PPO -> evaluation.

`run(cfg)` is what `rlhf-sweep run` and every sweep trial call. The reference
and the RM are cached under `cache_dir` by a hash of exactly the config that
determines each, so a run that changes only PPO knobs reuses both.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .config import Config, config_hash, to_dict
from .evaluate import advantage_stats, diagnose, evaluate, observations
from .models import PolicyWithValue, build_lm, train_sft
from .ppo import train_ppo
from .reward import RewardModel, calibrate, collect_pairs, pair_accuracy, train_rm
from .world import PROMPT_LEN, World

# bump when the code of the world, SFT or RM changes what a cached artefact would hold
CACHE_VERSION = 2

# independent random streams per stage, so that PPO knobs never change the SFT or RM data
STREAMS = {"sft": 1, "pairs": 2, "rm": 3, "ppo": 4, "eval": 5}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available here; use device=auto or device=cpu")
    return torch.device(name)


def streams(seed: int, stage: str, device: torch.device) -> tuple[np.random.Generator, torch.Generator]:
    rng = np.random.default_rng([seed, STREAMS[stage]])
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1000 + STREAMS[stage])
    return rng, gen


def sft_key(cfg: Config, device: torch.device) -> str:
    w = to_dict(cfg.world)
    w.pop("gold"), w.pop("labeler")  # the reference never sees gold or labels
    return "sft-" + config_hash(CACHE_VERSION, w, cfg.model, cfg.sft, cfg.seed, device.type)


def rm_key(cfg: Config, device: torch.device) -> str:
    return "rm-" + config_hash(sft_key(cfg, device), cfg.world, cfg.rm, cfg.seed)


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 3)


def load_or_train(path: Path, module: torch.nn.Module, train, device: torch.device) -> dict:
    """Load `module` from `path` if cached, else `train()` it and save; returns its info dict.

    Saved via a temporary file and an atomic rename, so sweep workers that train the
    same artefact at once never read a half-written file.
    """
    if path.exists():
        blob = torch.load(path, map_location=device, weights_only=True)
        module.load_state_dict(blob["state"])
        return {"cached": True, "path": str(path), **blob["info"]}
    info = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"state": module.state_dict(), "info": info}, tmp)
    os.replace(tmp, path)
    return {"cached": False, "path": str(path), **info}


def freeze(module: torch.nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def get_reference(cfg: Config, world: World, device: torch.device, say) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    lm = build_lm(cfg.model, world.vocab.size, PROMPT_LEN + cfg.world.max_new_tokens).to(device)

    def train() -> dict:
        rng, _ = streams(cfg.seed, "sft", device)
        return train_sft(lm, world, cfg.sft, rng, device, cfg.progress)

    info = load_or_train(Path(cfg.cache_dir) / f"{sft_key(cfg, device)}.pt", lm, train, device)
    say(f"SFT reference: {'cached' if info['cached'] else 'trained'}, loss {info['sft/loss']:.3f} ({info['path']})")
    freeze(lm)
    return lm, info


def get_reward_model(cfg: Config, world: World, ref: torch.nn.Module, device: torch.device, say) -> tuple[RewardModel, dict]:
    lm = build_lm(cfg.model, world.vocab.size, PROMPT_LEN + cfg.world.max_new_tokens).to(device)
    lm.load_state_dict(ref.state_dict())  # the RM starts from the SFT backbone, as in InstructGPT
    rm = RewardModel(lm, cfg.model.n_embd).to(device)

    def train() -> dict:
        rng, gen = streams(cfg.seed, "pairs", device)
        pairs = collect_pairs(ref, world, cfg.rm.n_pairs, cfg.rm.pairs, rng, gen, device)
        held_out = collect_pairs(ref, world, cfg.rm.n_eval_pairs, "random", rng, gen, device)
        rng_rm, _ = streams(cfg.seed, "rm", device)
        torch.manual_seed(cfg.seed + 1)
        torch.nn.init.normal_(rm.head.weight, std=1.0 / (cfg.model.n_embd + 1) ** 0.5)
        torch.nn.init.zeros_(rm.head.bias)
        info = train_rm(rm, pairs, cfg.rm, rng_rm, device, cfg.progress)
        calibrate(rm, torch.cat([pairs.prompts, pairs.prompts]), torch.cat([pairs.first, pairs.second]), device)
        info.update(pair_accuracy(rm, held_out, device))
        decided = held_out.gold_diff.abs() > 1e-6
        info["rm/label_agreement_with_gold"] = float((held_out.prefer_first == held_out.gold_first)[decided].float().mean())
        return info

    info = load_or_train(Path(cfg.cache_dir) / f"{rm_key(cfg, device)}.pt", rm, train, device)
    say(f"reward model: {'cached' if info['cached'] else f'trained on {cfg.rm.n_pairs} {cfg.rm.pairs} pairs'}, "
        f"acc on labels {info['rm/acc_labels']:.3f}, on gold {info['rm/acc_gold']:.3f} ({info['path']})")
    freeze(rm)
    return rm, info


def run(cfg: Config, say=print) -> dict:
    """Run one trial and return its summary (also written to cfg.run_dir/summary.json)."""
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = pick_device(cfg.device)
    world = World(cfg.world)
    timer = Timer()

    with timer.stage("sft"):
        ref, sft_info = get_reference(cfg, world, device, say)
    with timer.stage("rm"):
        rm, rm_info = get_reward_model(cfg, world, ref, device, say)
    with timer.stage("ppo"):
        max_len = PROMPT_LEN + cfg.world.max_new_tokens
        policy_lm = build_lm(cfg.model, world.vocab.size, max_len).to(device)
        policy_lm.load_state_dict(ref.state_dict())
        policy = PolicyWithValue(policy_lm, cfg.model.n_embd).to(device)
        rng, gen = streams(cfg.seed, "ppo", device)

        def on_iteration(_i: int, entry: dict, batch: dict) -> None:
            entry.update(advantage_stats(world, batch))

        history = train_ppo(policy, ref, rm, world, cfg.ppo, rng, gen, device, cfg.progress, on_iteration)
    with timer.stage("eval"):
        rng, gen = streams(cfg.seed, "eval", device)
        metrics, samples = evaluate(policy.lm, ref, rm, world, cfg.eval.n_prompts, cfg.eval.confidence, rng, gen, device)
        metrics["rm/acc_labels"] = rm_info["rm/acc_labels"]
        metrics["rm/acc_gold"] = rm_info["rm/acc_gold"]
        for k in ("ppo/beta", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/value_loss"):
            metrics[k] = history[-1][k]
        final_beta = history[-1]["ppo/beta"]
        obs = observations(metrics, history, final_beta, cfg.eval.trend_window, cfg.eval.trend_alpha)
        diag = diagnose(metrics, samples, history, final_beta)
    timer.seconds["total"] = round(sum(timer.seconds.values()), 3)

    examples = [
        {"prompt": world.vocab.decode(samples["prompts"][i]), "policy": world.vocab.decode(samples["policy"][i]), "ref": world.vocab.decode(samples["ref"][i])}
        for i in range(5)
    ]
    summary = {
        "version": __version__,
        "config": to_dict(cfg),
        "device": str(device),
        "metrics": metrics,
        "history": history,
        "observations": obs,
        "diagnosis": diag,
        "timing": timer.seconds,
        "cache": {"sft": sft_info, "rm": rm_info},
        "examples": examples,
    }
    if cfg.run_dir:
        out = Path(cfg.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary

