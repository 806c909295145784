"""Typed configuration: one dataclass per `conf/` group, with documented defaults.

Hydra composes YAML from `conf/`; `load_config` merges the result onto these
dataclasses, so a misspelt key or a value of the wrong type fails at once, and
`validate` checks ranges and choices. `ConfigError` carries a one-line message
that names the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from rlhf_sweep.maths import kl


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key and the fix."""


@dataclass
class GoldConfig:
    """Weights of the careful human's helpfulness h(x, y) (the human-proxy score)."""

    action: float = 1.0  # correct action present, times directness ** position
    directness: float = 0.9  # discount per token before the first correct action
    wrong_action: float = -0.5  # per wrong action token
    detail: float = 0.2  # once, for acknowledging one of the prompt's details
    first_filler: float = 0.1  # one polite filler token is welcome
    extra_filler: float = -0.1  # each further filler token is not
    ideal_len: int = 4  # content tokens before the length penalty starts
    over_len: float = -0.03  # per content token beyond ideal_len
    no_eos: float = -0.3  # the response never ended


@dataclass
class LabelerConfig:
    """Pairwise labelers: P(y1 > y2) = sigmoid(dh/tau + length_bias*dlen + filler_bias*dfill)."""

    tau: float = 0.25
    flip_rate: float = 0.05
    length_bias: float = 0.3  # 0 with filler_bias 0: the unbiased control
    filler_bias: float = 0.6


@dataclass
class DemoConfig:
    """Mix of SFT demonstration templates (complete answers are also the longer ones)."""

    complete: float = 0.75
    partial: float = 0.15
    wrong: float = 0.10


@dataclass
class WorldConfig:
    # world.draw=N: a world sampled from the ranges in world.DRAW_RANGES, a pure function of N (its own
    # random stream, not `seed`); null = the default world below. load_config fills in the drawn fields.
    draw: int | None = None
    n_intents: int = 8
    n_details: int = 8
    n_filler: int = 8
    n_explain: int = 8
    max_new_tokens: int = 24
    second_detail_prob: float = 0.5
    gold: GoldConfig = field(default_factory=GoldConfig)
    labeler: LabelerConfig = field(default_factory=LabelerConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "relu", "silu")
ARCHS = ("gpt2", "llama")


@dataclass
class ModelConfig:
    """A tiny causal LM built from a transformers config (no downloads)."""

    arch: str = "gpt2"  # gpt2 | llama
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    # MLP activation (a transformers ACT2FN name). gelu is the exact (erf) GELU: on CPU it runs 5x faster
    # than GPT-2's tanh approximation (gelu_pytorch_tanh, one fused op; gelu_new, the same in six ops),
    # which took ~10% of a PPO iteration.
    activation: str = "gelu"
    # GPT-2 through the hand-written forward in models.py (same weights, same function, ~1.35x as fast
    # at this size); false = transformers' own forward. Llama always uses transformers'.
    fast_forward: bool = True


@dataclass
class SFTConfig:
    """Supervised fine-tuning of the frozen reference on template demonstrations."""

    n_demos: int = 16384
    epochs: int = 6
    batch_size: int = 256
    lr: float = 3e-3


PAIR_MODES = ("random", "length_matched")
ENSEMBLE_AGGS = ("mean_std", "min", "mean")


@dataclass
class RMConfig:
    """Bradley-Terry reward model on labeled pairs of reference samples."""

    n_pairs: int = 10000
    pairs: str = "random"  # random | length_matched (pick the closest-length pair of 4 samples)
    n_eval_pairs: int = 2000
    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    center_coef: float = 0.0  # coef * mean((r_chosen + r_rejected)^2), 0.01 in the literature; calibrate() re-centres every RM anyway
    length_decorr: float = 0.0  # coef * |corr(r, length)| within the batch (ODIN-style)
    # conservative ensemble (Coste et al. 2023): K RMs from different seeds; 1 = a single RM
    ensemble_size: int = 1
    ensemble_agg: str = "mean_std"  # mean_std (mean - lambda * std across members) | min | mean
    ensemble_lambda: float = 1.0  # lambda of mean_std
    # the RM's own size (RM scaling): null = the policy's model.n_layer / model.n_embd and the policy's SFT
    # reference as its backbone; another size starts from an SFT model of that size trained on the same
    # demonstrations (cached under its own key), as Gao et al. 2022 start RMs from pretrained models of each size
    n_layer: int | None = None
    n_embd: int | None = None


KL_ESTIMATORS = kl.ESTIMATORS
KL_IN = kl.PLACEMENTS


@dataclass
class PPOConfig:
    """PPO with a clipped surrogate and a KL penalty to the frozen reference."""

    iterations: int = 150
    batch_size: int = 64  # prompts (one completion each) per iteration
    epochs: int = 4
    minibatches: int = 2
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    # KL coefficient (initial value when adaptive_kl), in RM-score units per nat of sequence KL in every
    # placement: the loss placement's token mean is the PPO loss's own token mean, and it is scaled by
    # the factor that whitening applied to the advantages, so the same beta charges the same KL
    beta: float = 0.03
    # The penalty: what it uses per token (k1 | k2 | k3 | exact: the full-vocabulary KL) and where it goes
    # (reward: per token inside the return, InstructGPT | loss: a term of the PPO loss, GRPO-style | both:
    # exact only, the per-position gradient in the loss plus the later positions' KL in the return).
    # kl.PENALTIES declares each pair's gradient. Unbiased (the gradient of the sequence KL): reward+k1,
    # both+exact. Partial (per token, blind to a token's effect on later states): loss+k2, loss+exact.
    # Biased: reward+k3, reward+exact, loss+k1 (zero in expectation), loss+k3 (forward KL per token).
    # A run with a non-unbiased pair prints one warning line and tags its summary kl/gradient.
    kl_estimator: str = "k1"
    kl_in: str = "reward"
    adaptive_kl: bool = False  # Ziegler et al. 2019 proportional controller
    target_kl: float = 6.0  # sequence nats, for adaptive_kl
    horizon: int = 10000  # episodes, for adaptive_kl
    clip_eps: float = 0.2
    vf_clip: float = 0.2  # value clipping range; 0 turns it off
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    length_bonus: float = 0.0  # signed reward per content token; 0 = nothing rewards length
    reward_norm: bool = False  # running mean/std normalisation of RM scores
    reward_clip: float = 0.0  # clip normalised scores to [-c, c]; 0 turns it off
    early_stop_kl: float = 0.0  # stop an iteration's epochs once approx_kl exceeds it; 0 = off
    # sampling temperature of the rollouts; log-probs, KL, the PPO ratio and the held-out evaluation use the
    # distribution sampled from (policy and reference logits / temperature, so the policy starts at KL 0)
    temperature: float = 1.0


ALGOS = ("ppo", "rloo", "grpo", "dpo", "ipo", "bon")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
# the config sections that only an `algo=` option composes (conf/algo/), and the algorithms that read each
ALGO_SECTIONS = {"rloo": ("rloo",), "grpo": ("grpo",), "dpo": ("dpo", "ipo"), "bon": ("bon",)}


@dataclass
class RLOOConfig:
    """RLOO (Ahmadian et al. 2024) as TRL 1.16's RLOOTrainer runs it: num_generations samples per prompt,
    each one's baseline the mean reward of the others, the sequence's summed k1 KL in its reward, and a
    clipped sequence-level ratio. Knob names are TRL's; the sample and update budget is PPO's default."""

    iterations: int = 150  # generation batches, as ppo.iterations
    batch_size: int = 64  # completions per iteration (TRL's generation batch), a multiple of num_generations
    num_generations: int = 4  # k samples per prompt (TRL's default is 2; Ahmadian et al. report k = 2 and 4)
    beta: float = 0.05  # KL coefficient: reward - beta * sum_t (log pi - log ref) (TRL's default)
    epsilon: float = 0.2  # clip range of the sequence-level ratio (TRL's default)
    num_iterations: int = 4  # mu, passes over each generation batch (TRL's default 1; PPO's epochs here)
    steps_per_generation: int = 2  # optimizer steps per pass (TRL's default 1; PPO's minibatches here)
    normalize_advantages: bool = False  # scale advantages to unit std over the batch (TRL's default: off)
    lr: float = 1e-4  # as ppo.lr (TRL's 1e-6 is for billion-parameter models)
    max_grad_norm: float = 1.0
    temperature: float = 1.0


@dataclass
class GRPOConfig:
    """GRPO (Shao et al. 2024) as TRL 1.16's GRPOTrainer runs it: num_generations samples per prompt,
    advantages = reward minus the group mean, divided by the group's std (scale_rewards), a per-token
    clipped ratio, and the KL term of the KL-penalty machinery (kl.py): the published k3 in the loss,
    or another estimator and placement. The sample and update budget is PPO's default."""

    iterations: int = 150
    batch_size: int = 64  # completions per iteration, a multiple of num_generations
    num_generations: int = 8  # samples per prompt, the group (TRL's default)
    beta: float = 0.04  # KL coefficient (Shao et al.'s value; TRL's default 0.0 drops the KL term)
    kl_estimator: str = "k3"  # what the KL term uses per token (k3: Shao et al. and TRL)
    kl_in: str = "loss"  # loss (per-token term added to the loss, as published) | reward (summed into the sequence reward)
    # in the loss, a sampled estimator times the ratio pi / pi_old (with its gradient), which makes the term's
    # expected gradient that of KL(pi || ref) (DeepSeek-V3.2; TRL's default); false = Shao et al.'s published k3 term
    use_bias_correction_kl: bool = True
    epsilon: float = 0.2  # lower clip of the per-token ratio
    epsilon_high: float | None = None  # upper clip; null = epsilon (DAPO recommends 0.28)
    loss_type: str = "dapo"  # grpo (per-sequence token mean, Shao et al.) | bnpo | dr_grpo | dapo (TRL's default)
    scale_rewards: str = "group"  # group (divide by the group's std) | batch | none (Dr. GRPO)
    num_iterations: int = 4  # mu (TRL's default 1)
    steps_per_generation: int = 2  # (TRL's default 1)
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    temperature: float = 1.0


@dataclass
class DPOConfig:
    """DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023; `algo=ipo`, TRL's loss_type="ipo") offline
    on the labeled pairs the RM is trained on, with the SFT reference as the reference model."""

    beta: float = 0.1  # KL coefficient of the implicit reward; IPO's tau (TRL's default for both)
    iterations: int = 150  # history entries (policy samples after each)
    steps_per_iteration: int = 3  # optimizer steps per entry: 450 steps of 64 pairs, about TRL's 3 epochs over 10000 pairs
    batch_size: int = 64  # pairs per step
    lr: float = 1e-4  # as ppo.lr (TRL's 1e-6 is for billion-parameter models)
    max_grad_norm: float = 1.0
    monitor_size: int = 64  # policy samples per iteration behind the history (rm, gold, length, KL)
    temperature: float = 1.0  # of those samples


@dataclass
class BoNConfig:
    """Best-of-n: the RM picks the best of n reference samples; nothing is trained."""

    n: int = 16  # candidates per prompt
    # reference samples per held-out prompt behind the empirical distribution that the exact KL and the
    # best-of-n expectations are computed on (>= n; Beirami et al.'s formula for discrete distributions)
    samples_per_prompt: int = 256


@dataclass
class EvalConfig:
    n_prompts: int = 512
    confidence: float = 0.95
    trend_window: float = 0.5  # the later share of iterations tested for a KL trend
    trend_alpha: float = 0.05
    trend_min_growth: float = 0.25  # verdict 3: the KL must rise by this share of its level over the tested iterations


@dataclass
class MLflowConfig:
    enabled: bool = True
    tracking_uri: str = "sqlite:///outputs/mlflow.db"
    experiment: str = "rlhf-sweep"


@dataclass
class Config:
    seed: int = 0
    algo: str = "ppo"  # ppo | rloo | grpo | dpo | ipo | bon: what optimizes against the RM (conf/algo/)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch threads; 0 = all cores
    cache_dir: str = "outputs/cache"
    run_dir: str = ""  # where summary.json goes; set by the CLI or the sweep
    progress: bool = True
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    bon: BoNConfig = field(default_factory=BoNConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)


def known_keys(node: Any) -> str:
    if dataclasses.is_dataclass(node):
        return ", ".join(f.name for f in dataclasses.fields(node))
    return ""


def node_at(path: str) -> Any:
    node: Any = Config()
    for part in [p for p in path.split(".") if p]:
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


# numpy's and torch's generators take any non-negative seed; the stage streams derive seed * 1000 + k
MAX_SEED = 2**32 - 1


def _require(ok: bool, key: str, value: Any, accepts: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {key} accepts {accepts}")


def validate(c: Config) -> None:
    """Range and choice checks; each failure names the key and what it accepts."""
    p, r, w, m = c.ppo, c.rm, c.world, c.model
    _require(c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:"), "device", c.device, "auto, cpu, cuda or cuda:N")
    _require(0 <= c.seed <= MAX_SEED, "seed", c.seed, f"an integer in [0, {MAX_SEED}]")
    _require(c.threads >= 0, "threads", c.threads, "an integer >= 0 (0 = all cores)")
    _require(m.arch in ARCHS, "model.arch", m.arch, " | ".join(ARCHS))
    _require(m.activation in ACTIVATIONS, "model.activation", m.activation, " | ".join(ACTIVATIONS))
    _require(m.n_layer >= 1, "model.n_layer", m.n_layer, "an integer >= 1")
    _require(m.n_head >= 1, "model.n_head", m.n_head, "an integer >= 1")
    _require(m.n_embd >= 1 and m.n_head >= 1 and m.n_embd % m.n_head == 0, "model.n_embd", m.n_embd, "an integer >= 1 that model.n_head divides")
    _require(p.beta >= 0, "ppo.beta", p.beta, "a number >= 0")
    _require(p.clip_eps > 0, "ppo.clip_eps", p.clip_eps, "a number > 0 (0.2 is usual)")
    _require(p.vf_clip >= 0, "ppo.vf_clip", p.vf_clip, "a number >= 0 (0 turns value clipping off)")
    try:  # one line naming the key, the accepted values and which pairs are unbiased
        kl.penalty(p.kl_estimator, p.kl_in)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(p.iterations >= 1, "ppo.iterations", p.iterations, "an integer >= 1")
    _require(p.batch_size >= 2, "ppo.batch_size", p.batch_size, "an integer >= 2")
    _require(p.epochs >= 1, "ppo.epochs", p.epochs, "an integer >= 1")
    _require(1 <= p.minibatches <= p.batch_size, "ppo.minibatches", p.minibatches, f"an integer in [1, ppo.batch_size={p.batch_size}]")
    _require(p.lr > 0, "ppo.lr", p.lr, "a number > 0")
    _require(p.target_kl > 0, "ppo.target_kl", p.target_kl, "a number > 0 (sequence nats)")
    _require(p.horizon > 0, "ppo.horizon", p.horizon, "an integer > 0")
    _require(0 <= p.gamma <= 1, "ppo.gamma", p.gamma, "a number in [0, 1]")
    _require(0 <= p.lam <= 1, "ppo.lam", p.lam, "a number in [0, 1]")
    _require(p.reward_clip >= 0, "ppo.reward_clip", p.reward_clip, "a number >= 0 (0 = off)")
    _require(p.early_stop_kl >= 0, "ppo.early_stop_kl", p.early_stop_kl, "a number >= 0 (0 = off)")
    _require(p.temperature > 0, "ppo.temperature", p.temperature, "a number > 0")
    _require(r.pairs in PAIR_MODES, "rm.pairs", r.pairs, " | ".join(PAIR_MODES))
    _require(r.n_pairs >= 16, "rm.n_pairs", r.n_pairs, "an integer >= 16")
    _require(r.n_eval_pairs >= 16, "rm.n_eval_pairs", r.n_eval_pairs, "an integer >= 16")
    _require(r.center_coef >= 0, "rm.center_coef", r.center_coef, "a number >= 0")
    _require(r.weight_decay >= 0, "rm.weight_decay", r.weight_decay, "a number >= 0")
    _require(r.length_decorr >= 0, "rm.length_decorr", r.length_decorr, "a number >= 0")
    _require(r.lr > 0, "rm.lr", r.lr, "a number > 0")
    _require(r.ensemble_size >= 1, "rm.ensemble_size", r.ensemble_size, "an integer >= 1 (1 = a single reward model)")
    _require(r.ensemble_agg in ENSEMBLE_AGGS, "rm.ensemble_agg", r.ensemble_agg, " | ".join(ENSEMBLE_AGGS))
    _require(r.ensemble_lambda >= 0, "rm.ensemble_lambda", r.ensemble_lambda, "a number >= 0")
    _require(r.n_layer is None or r.n_layer >= 1, "rm.n_layer", r.n_layer, "an integer >= 1, or null (the policy's model.n_layer)")
    _require(r.n_embd is None or (r.n_embd >= 1 and r.n_embd % m.n_head == 0), "rm.n_embd", r.n_embd,
             f"a positive multiple of model.n_head={m.n_head}, or null (the policy's model.n_embd)")
    _require(c.sft.lr > 0, "sft.lr", c.sft.lr, "a number > 0")
    _require(c.sft.n_demos >= 16, "sft.n_demos", c.sft.n_demos, "an integer >= 16")
    _require(c.sft.epochs >= 1, "sft.epochs", c.sft.epochs, "an integer >= 1")
    _require(c.sft.batch_size >= 1, "sft.batch_size", c.sft.batch_size, "an integer >= 1")
    _require(r.epochs >= 1, "rm.epochs", r.epochs, "an integer >= 1")
    _require(r.batch_size >= 1, "rm.batch_size", r.batch_size, "an integer >= 1")
    _require(w.draw is None or w.draw >= 0, "world.draw", w.draw, "an integer >= 0, or null (the default world)")
    _require(w.n_intents >= 2, "world.n_intents", w.n_intents, "an integer >= 2")
    _require(w.n_details >= 2, "world.n_details", w.n_details, "an integer >= 2")
    _require(w.n_filler >= 1, "world.n_filler", w.n_filler, "an integer >= 1")
    _require(w.n_explain >= 1, "world.n_explain", w.n_explain, "an integer >= 1")
    _require(4 <= w.max_new_tokens <= 256, "world.max_new_tokens", w.max_new_tokens, "an integer in [4, 256]")
    _require(0 <= w.second_detail_prob <= 1, "world.second_detail_prob", w.second_detail_prob, "a probability in [0, 1]")
    _require(w.labeler.tau > 0, "world.labeler.tau", w.labeler.tau, "a number > 0")
    _require(0 <= w.labeler.flip_rate <= 0.5, "world.labeler.flip_rate", w.labeler.flip_rate, "a probability in [0, 0.5]")
    _require(0 < w.gold.directness <= 1, "world.gold.directness", w.gold.directness, "a number in (0, 1]")
    _require(w.gold.ideal_len >= 0, "world.gold.ideal_len", w.gold.ideal_len, "an integer >= 0")
    d = w.demo
    _require(min(d.complete, d.partial, d.wrong) >= 0 and d.complete + d.partial + d.wrong > 0, "world.demo", f"{d.complete}/{d.partial}/{d.wrong}", "non-negative weights complete/partial/wrong with a positive sum")
    _require(c.algo in ALGOS, "algo", c.algo, " | ".join(ALGOS))
    validate_algos(c)
    _require(0 < c.eval.confidence < 1, "eval.confidence", c.eval.confidence, "a number in (0, 1)")
    _require(0 < c.eval.trend_window <= 1, "eval.trend_window", c.eval.trend_window, "a share in (0, 1]")
    _require(0 < c.eval.trend_alpha < 1, "eval.trend_alpha", c.eval.trend_alpha, "a level in (0, 1)")
    _require(c.eval.trend_min_growth >= 0, "eval.trend_min_growth", c.eval.trend_min_growth, "a share >= 0 (0.25 is the default)")
    _require(c.eval.n_prompts >= 16, "eval.n_prompts", c.eval.n_prompts, "an integer >= 16")


def rm_model(c: Config) -> ModelConfig:
    """The reward model's architecture: the policy's, with rm.n_layer / rm.n_embd where set."""
    return dataclasses.replace(c.model, n_layer=c.rm.n_layer or c.model.n_layer, n_embd=c.rm.n_embd or c.model.n_embd)


def validate_algos(c: Config) -> None:
    """The knobs of RLOO, GRPO, DPO/IPO and best-of-n (checked whichever algorithm runs: they are all in the config)."""
    for name in ("rloo", "grpo"):
        a = getattr(c, name)
        _require(a.iterations >= 1, f"{name}.iterations", a.iterations, "an integer >= 1")
        _require(a.num_generations >= 2, f"{name}.num_generations", a.num_generations, "an integer >= 2 (a baseline needs another sample)")
        _require(a.batch_size >= a.num_generations and a.batch_size % a.num_generations == 0, f"{name}.batch_size", a.batch_size,
                 f"an integer multiple of {name}.num_generations={a.num_generations}")
        _require(a.beta >= 0, f"{name}.beta", a.beta, "a number >= 0")
        _require(a.epsilon > 0, f"{name}.epsilon", a.epsilon, "a number > 0 (0.2 is usual)")
        _require(a.num_iterations >= 1, f"{name}.num_iterations", a.num_iterations, "an integer >= 1")
        _require(1 <= a.steps_per_generation <= a.batch_size, f"{name}.steps_per_generation", a.steps_per_generation,
                 f"an integer in [1, {name}.batch_size={a.batch_size}]")
        _require(a.lr > 0, f"{name}.lr", a.lr, "a number > 0")
        _require(a.temperature > 0, f"{name}.temperature", a.temperature, "a number > 0")
    g = c.grpo
    _require(g.kl_estimator in KL_ESTIMATORS, "grpo.kl_estimator", g.kl_estimator, " | ".join(KL_ESTIMATORS))
    _require(g.kl_in in ("loss", "reward"), "grpo.kl_in", g.kl_in, "loss | reward")
    _require(g.epsilon_high is None or g.epsilon_high > 0, "grpo.epsilon_high", g.epsilon_high, "a number > 0, or null (= grpo.epsilon)")
    _require(g.loss_type in GRPO_LOSS_TYPES, "grpo.loss_type", g.loss_type, " | ".join(GRPO_LOSS_TYPES))
    _require(g.scale_rewards in SCALE_REWARDS, "grpo.scale_rewards", g.scale_rewards, " | ".join(SCALE_REWARDS))
    d = c.dpo
    _require(d.beta > 0, "dpo.beta", d.beta, "a number > 0 (it scales the implicit reward; IPO's target margin is 1/(2 beta))")
    _require(d.iterations >= 1, "dpo.iterations", d.iterations, "an integer >= 1")
    _require(d.steps_per_iteration >= 1, "dpo.steps_per_iteration", d.steps_per_iteration, "an integer >= 1")
    _require(d.batch_size >= 1, "dpo.batch_size", d.batch_size, "an integer >= 1")
    _require(d.lr > 0, "dpo.lr", d.lr, "a number > 0")
    _require(d.monitor_size >= 2, "dpo.monitor_size", d.monitor_size, "an integer >= 2")
    _require(d.temperature > 0, "dpo.temperature", d.temperature, "a number > 0")
    b = c.bon
    _require(b.n >= 1, "bon.n", b.n, "an integer >= 1")
    _require(b.samples_per_prompt >= b.n, "bon.samples_per_prompt", b.samples_per_prompt, f"an integer >= bon.n={b.n}")


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'ppo': {'beta': 0.1}} -> {'ppo.beta': 0.1}: the MLflow params and CSV columns."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_hash(*parts: Any) -> str:
    """A short stable hash of dataclasses/dicts: the cache key of a stage's artefact."""
    payload = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


