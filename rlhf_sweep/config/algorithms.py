"""The algorithm registry: what the config, the reports and the command line know about each algorithm
(its knobs, the metric its frontier is plotted against, its history prefix, colour and figure title),
without torch, and where its code lives.

An algorithm is one module and one conf file:
- its module defines `train(inputs) -> (policy LM, history)`, or, for one that trains nothing (best-of-n),
  `evaluate(inputs) -> (metrics, samples, history)`; `inputs` is a training.core.AlgorithmInputs. The
  pipeline imports the module by its dotted path when it runs the algorithm (as Hydra's `_target_`);
- `algo/NAME.yaml` sets `algo: NAME` and its knobs section's defaults.
Its card, an `Algorithm`, holds the rest. SHIPPED lists the package's algorithms (training/*.py,
conf/algo/*.yaml). A user's algorithm lives outside the package: a module on PYTHONPATH that defines
`ALGORITHM = Algorithm(...)` beside its `train`, and `algo/NAME.yaml` in a user config directory
(--config-dir) that also sets `_algorithm_: MODULE`; load_config imports that module and registers its
card, and its knobs section joins the config's schema.

Each knobs dataclass may define `check(self, section)`, raising ConfigError: validate calls it for every
section in the config, whichever algorithm runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rlhf_sweep.config.errors import ConfigError, require
from rlhf_sweep.maths import kl

# the top-level key of a user's algo/NAME.yaml that names the module defining its ALGORITHM card
MODULE_KEY = "_algorithm_"


@dataclass(frozen=True)
class Algorithm:
    """One algorithm's card. `cfg` below is a loaded Config."""

    name: str  # the value of `algo=`
    module: str  # dotted path of the module with train(inputs), or evaluate(inputs) when `trains` is false
    section: str | None  # its knobs' config section; algorithms may share one (ipo reads dpo's)
    knobs: type | None  # that section's dataclass
    knob: str  # the metric that reports plot its trials against: its KL knob as its runs record it
    prefix: str  # the prefix of its own statistics in the history and the metrics
    title: Callable[[Any], str]  # the trajectory figure's title, from cfg
    color: str = "0.3"  # matplotlib colour of its frontier in the algorithms figure
    trains: bool = True  # false: nothing is trained, the algorithm evaluates itself (best-of-n)
    final_metrics: tuple[str, ...] = ()  # statistics of the last history entry the metrics keep; () = every PREFIX/ key
    eval_at_temperature: bool = False  # evaluated at its section's temperature (the distribution it sampled from), not 1
    penalty: Callable[[Any], kl.Penalty] | None = None  # its KL penalty from cfg: a warning and a tag unless unbiased
    judge: str = ""  # verdict 1's note on what judged the policy, when the RM is not what it optimized
    kl_trend_note: Callable[[dict], str] | None = None  # why verdict 3 does not apply, from the metrics (trains false)


# ----- the knobs ------------------------------------------------------------------------------------
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

    def check(self, section: str) -> None:
        p = self
        require(p.beta >= 0, f"{section}.beta", p.beta, "a number >= 0")
        require(p.clip_eps > 0, f"{section}.clip_eps", p.clip_eps, "a number > 0 (0.2 is usual)")
        require(p.vf_clip >= 0, f"{section}.vf_clip", p.vf_clip, "a number >= 0 (0 turns value clipping off)")
        try:  # one line naming the key, the accepted values and which pairs are unbiased
            kl.penalty(p.kl_estimator, p.kl_in)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        require(p.iterations >= 1, f"{section}.iterations", p.iterations, "an integer >= 1")
        require(p.batch_size >= 2, f"{section}.batch_size", p.batch_size, "an integer >= 2")
        require(p.epochs >= 1, f"{section}.epochs", p.epochs, "an integer >= 1")
        # an epoch's minibatches split the batch evenly: a remainder would be left out of every update unseen
        require(1 <= p.minibatches <= p.batch_size and p.batch_size % p.minibatches == 0, f"{section}.minibatches", p.minibatches,
                f"an integer in [1, {section}.batch_size={p.batch_size}] that divides it")
        require(p.lr > 0, f"{section}.lr", p.lr, "a number > 0")
        require(p.target_kl > 0, f"{section}.target_kl", p.target_kl, "a number > 0 (sequence nats)")
        require(p.horizon > 0, f"{section}.horizon", p.horizon, "an integer > 0")
        require(0 <= p.gamma <= 1, f"{section}.gamma", p.gamma, "a number in [0, 1]")
        require(0 <= p.lam <= 1, f"{section}.lam", p.lam, "a number in [0, 1]")
        require(p.reward_clip >= 0, f"{section}.reward_clip", p.reward_clip, "a number >= 0 (0 = off)")
        require(p.early_stop_kl >= 0, f"{section}.early_stop_kl", p.early_stop_kl, "a number >= 0 (0 = off)")
        require(p.temperature > 0, f"{section}.temperature", p.temperature, "a number > 0")


def check_group_knobs(section: str, a: Any) -> None:
    """The knobs RLOO and GRPO share: groups of num_generations samples and TRL's update schedule."""
    require(a.iterations >= 1, f"{section}.iterations", a.iterations, "an integer >= 1")
    require(a.num_generations >= 2, f"{section}.num_generations", a.num_generations, "an integer >= 2 (a baseline needs another sample)")
    require(a.batch_size >= a.num_generations and a.batch_size % a.num_generations == 0, f"{section}.batch_size", a.batch_size,
            f"an integer multiple of {section}.num_generations={a.num_generations}")
    require(a.beta >= 0, f"{section}.beta", a.beta, "a number >= 0")
    require(a.epsilon > 0, f"{section}.epsilon", a.epsilon, "a number > 0 (0.2 is usual)")
    require(a.num_iterations >= 1, f"{section}.num_iterations", a.num_iterations, "an integer >= 1")
    # each pass's optimizer steps split the generation batch evenly: a remainder would never be trained on
    require(1 <= a.steps_per_generation <= a.batch_size and a.batch_size % a.steps_per_generation == 0, f"{section}.steps_per_generation",
            a.steps_per_generation, f"an integer in [1, {section}.batch_size={a.batch_size}] that divides it")
    require(a.lr > 0, f"{section}.lr", a.lr, "a number > 0")
    require(a.temperature > 0, f"{section}.temperature", a.temperature, "a number > 0")


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

    def check(self, section: str) -> None:
        check_group_knobs(section, self)


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOConfig:
    """GRPO (Shao et al. 2024) as TRL 1.16's GRPOTrainer runs it: num_generations samples per prompt,
    advantages = reward minus the group mean, divided by the group's std (scale_rewards), a per-token
    clipped ratio, and the KL term of the KL-penalty machinery (maths/kl.py): the published k3 in the loss,
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

    def check(self, section: str) -> None:
        g = self
        check_group_knobs(section, g)
        require(g.kl_estimator in kl.ESTIMATORS, f"{section}.kl_estimator", g.kl_estimator, " | ".join(kl.ESTIMATORS))
        require(g.kl_in in ("loss", "reward"), f"{section}.kl_in", g.kl_in, "loss | reward")
        require(g.epsilon_high is None or g.epsilon_high > 0, f"{section}.epsilon_high", g.epsilon_high,
                f"a number > 0, or null (= {section}.epsilon)")
        require(g.loss_type in GRPO_LOSS_TYPES, f"{section}.loss_type", g.loss_type, " | ".join(GRPO_LOSS_TYPES))
        require(g.scale_rewards in SCALE_REWARDS, f"{section}.scale_rewards", g.scale_rewards, " | ".join(SCALE_REWARDS))


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

    def check(self, section: str) -> None:
        d = self
        require(d.beta > 0, f"{section}.beta", d.beta, "a number > 0 (it scales the implicit reward; IPO's target margin is 1/(2 beta))")
        require(d.iterations >= 1, f"{section}.iterations", d.iterations, "an integer >= 1")
        require(d.steps_per_iteration >= 1, f"{section}.steps_per_iteration", d.steps_per_iteration, "an integer >= 1")
        require(d.batch_size >= 1, f"{section}.batch_size", d.batch_size, "an integer >= 1")
        require(d.lr > 0, f"{section}.lr", d.lr, "a number > 0")
        require(d.monitor_size >= 2, f"{section}.monitor_size", d.monitor_size, "an integer >= 2")
        require(d.temperature > 0, f"{section}.temperature", d.temperature, "a number > 0")


@dataclass
class BoNConfig:
    """Best-of-n: the RM picks the best of n reference samples; nothing is trained."""

    n: int = 16  # candidates per prompt
    # reference samples per held-out prompt behind the empirical distribution that the exact KL and the
    # best-of-n expectations are computed on (>= n; Beirami et al.'s formula for discrete distributions)
    samples_per_prompt: int = 256

    def check(self, section: str) -> None:
        require(self.n >= 1, f"{section}.n", self.n, "an integer >= 1")
        require(self.samples_per_prompt >= self.n, f"{section}.samples_per_prompt", self.samples_per_prompt,
                f"an integer >= {section}.n={self.n}")


# ----- the shipped algorithms -----------------------------------------------------------------------
def _dpo_title(label: str) -> Callable[[Any], str]:
    return lambda cfg: f"rlhf-sweep run algo={cfg.algo}, seed {cfg.seed}: {label}={cfg.dpo.beta:g}"


OFFLINE_JUDGE = ("the RM trained on the same labeled pairs, which DPO never queried: "
                 "a proxy like the one an RL team would have optimized")

SHIPPED = (
    Algorithm("ppo", "rlhf_sweep.training.ppo", "ppo", PPOConfig, "ppo/beta", "ppo",
              lambda cfg: (f"rlhf-sweep run, seed {cfg.seed}: β={cfg.ppo.beta:g}, clip ε={cfg.ppo.clip_eps:g}, "
                           f"KL penalty {cfg.ppo.kl_in}+{cfg.ppo.kl_estimator}"),
              color="C0", final_metrics=("ppo/beta", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/value_loss"),
              eval_at_temperature=True, penalty=lambda cfg: kl.penalty(cfg.ppo.kl_estimator, cfg.ppo.kl_in)),
    Algorithm("rloo", "rlhf_sweep.training.rloo", "rloo", RLOOConfig, "rloo/beta", "rloo",
              lambda cfg: f"rlhf-sweep run algo=rloo, seed {cfg.seed}: β={cfg.rloo.beta:g}, k={cfg.rloo.num_generations}",
              color="C1"),
    Algorithm("grpo", "rlhf_sweep.training.grpo", "grpo", GRPOConfig, "grpo/beta", "grpo",
              lambda cfg: (f"rlhf-sweep run algo=grpo, seed {cfg.seed}: β={cfg.grpo.beta:g}, G={cfg.grpo.num_generations}, "
                           f"KL {cfg.grpo.kl_estimator} in the {cfg.grpo.kl_in}"),
              color="C2"),
    Algorithm("dpo", "rlhf_sweep.training.dpo", "dpo", DPOConfig, "dpo/beta", "dpo", _dpo_title("β"), color="C4",
              judge=OFFLINE_JUDGE),
    Algorithm("ipo", "rlhf_sweep.training.dpo", "dpo", DPOConfig, "dpo/beta", "dpo", _dpo_title("β (τ)"), color="C9",
              judge=OFFLINE_JUDGE),
    Algorithm("bon", "rlhf_sweep.training.bon", "bon", BoNConfig, "bon/n", "bon",
              lambda cfg: f"rlhf-sweep run algo=bon, seed {cfg.seed}: best-of-n' for n' up to {cfg.bon.n}",
              color="#c0392b", trains=False,  # plots.BON_COLOR: best-of-n has one colour in every figure
              kl_trend_note=lambda m: ("best-of-n trains nothing, so no KL grows over iterations: its KL is set "
                                       f"by n (exact {m['kl/exact']:.3g} nats, bound {m['kl/bon_bound']:.3g})")),
)
# the algorithm of a config that names none; its section is conf/ppo/, in every config (the others' come with algo=)
DEFAULT = SHIPPED[0].name

_registry: dict[str, Algorithm] = {a.name: a for a in SHIPPED}


# ----- the registry ---------------------------------------------------------------------------------
def registered() -> tuple[Algorithm, ...]:
    """The shipped algorithms, then the users' loaded in this process, in registration order."""
    return tuple(_registry.values())


def names() -> tuple[str, ...]:
    return tuple(_registry)


def get(name: str) -> Algorithm:
    """The card of `algo=name`; ConfigError when no algorithm of that name is registered."""
    require(name in _registry, "algo", name, " | ".join(_registry))
    return _registry[name]


def register(card: Algorithm) -> Algorithm:
    """Add a user's algorithm (again: a no-op); a shipped name keeps its shipped meaning."""
    old = _registry.get(card.name)
    if old is not None and old != card:
        raise ConfigError(f"algo={card.name} is already an algorithm ({old.module}); give {card.module}'s ALGORITHM another name")
    _registry[card.name] = card
    return card


def load(module: str, algo: str) -> Algorithm:
    """Import a user's algorithm module (named by `_algorithm_` in its conf file) and register its ALGORITHM card."""
    try:
        card = getattr(importlib.import_module(module), "ALGORITHM", None)
    except ImportError as e:
        raise ConfigError(f"{MODULE_KEY}={module} (algo={algo}) does not import ({type(e).__name__}: {e}); "
                          "put the folder that holds it on PYTHONPATH") from None
    if not isinstance(card, Algorithm):
        raise ConfigError(f"{MODULE_KEY}={module} (algo={algo}) defines no ALGORITHM = Algorithm(...) card (rlhf_sweep.config.algorithms)")
    require(card.name == algo, MODULE_KEY, module, f"a module whose ALGORITHM is named algo={algo} (its card says {card.name!r})")
    return register(card)


def sections(cards: Iterable[Algorithm] | None = None) -> dict[str, type]:
    """Each knobs section of `cards` (default: every registered algorithm) and its dataclass, first use first."""
    out: dict[str, type] = {}
    for a in registered() if cards is None else cards:
        if a.section is not None and a.knobs is not None:
            out.setdefault(a.section, a.knobs)
    return out


def algo_sections() -> dict[str, tuple[str, ...]]:
    """The sections that only an `algo=` option composes (all but the default algorithm's), and the
    algorithms that read each."""
    out: dict[str, tuple[str, ...]] = {}
    for a in registered():
        if a.section is not None and a.section != get(DEFAULT).section:
            out[a.section] = (*out.get(a.section, ()), a.name)
    return out


def knob_metrics() -> dict[str, str]:
    """algo -> the metric of its KL knob (reports plot each algorithm's trials against it)."""
    return {a.name: a.knob for a in registered()}


def colors() -> dict[str, str]:
    """algo -> its colour in the algorithms figure."""
    return {a.name: a.color for a in registered()}
