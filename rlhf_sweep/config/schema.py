"""Typed configuration: one dataclass per `conf/` group, with documented defaults, and `Config`, the whole.

Hydra composes YAML from `conf/`; `load_config` (compose.py) merges the result onto `Config` (or onto
`schema_for`'s class, which adds a user algorithm's knobs section), so a misspelt key or a value of the
wrong type fails at once, and `validate` checks ranges and choices. Each algorithm's knobs section and
its checks come from the algorithm registry (algorithms.py). `ConfigError` (errors.py) carries a
one-line message that names the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from rlhf_sweep.config import algorithms
from rlhf_sweep.config.algorithms import PPOConfig as PPOConfig  # the default algorithm's knobs, which readers import from here
from rlhf_sweep.config.errors import ConfigError as ConfigError  # raised by every check here; importers take it from the schema
from rlhf_sweep.config.errors import require


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
    # MLP activation (a transformers ACT2FN name). gelu is the exact (erf) GELU, faster on CPU than GPT-2's
    # tanh approximation (gelu_pytorch_tanh, one fused op; gelu_new, the same in six ops).
    activation: str = "gelu"
    # GPT-2 through the hand-written forward in models/lm.py (same weights, same function, faster at this
    # size); false = transformers' own forward. Llama always uses transformers'.
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
class RunSettings:
    """What every run sets, whichever algorithm it runs: the head of `Config`."""

    seed: int = 0
    algo: str = algorithms.DEFAULT  # what optimizes against the RM: a registered algorithm (config/algorithms.py, conf/algo/)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch threads; 0 = all cores
    cache_dir: str = "outputs/cache"
    run_dir: str = ""  # where summary.json goes; set by the CLI or the sweep
    progress: bool = True
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)


def _sections(named: dict[str, type]) -> list[tuple[str, type, Any]]:
    return [(name, cls, field(default_factory=cls)) for name, cls in named.items()]


# The whole config: RunSettings, each shipped algorithm's knobs section in the registry's order, eval, mlflow.
Config = dataclasses.make_dataclass(
    "Config", _sections({**algorithms.sections(algorithms.SHIPPED), "eval": EvalConfig, "mlflow": MLflowConfig}),
    bases=(RunSettings,), namespace={"__module__": __name__, "__doc__": "The whole config: what every run sets, and every algorithm's knobs."})


@functools.cache
def _with_sections(named: tuple[tuple[str, type], ...]) -> type:
    """Config with users' knobs sections after the shipped ones."""
    return dataclasses.make_dataclass("Config_" + "_".join(n for n, _ in named), _sections(dict(named)), bases=(Config,),
                                      namespace={"__module__": __name__})


def schema_for(algo: str | None, module: str | None) -> type:
    """The dataclass a composed config merges onto: `Config`, or, for a user's algorithm (`module`: the
    `_algorithm_` its conf file names), `Config` plus that algorithm's knobs section, after registering it."""
    if module is None:
        return Config
    card = algorithms.load(module, str(algo))
    if card.section is None or card.knobs is None:
        return Config
    taken = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    if card.section not in taken:
        return _with_sections(((card.section, card.knobs),))
    if taken[card.section] is not card.knobs:
        raise ConfigError(f"algo={card.name}: its knobs section '{card.section}' is already a section of the config; "
                          f"give {module}'s ALGORITHM a section of its own")
    return Config


def known_keys(node: Any) -> str:
    if dataclasses.is_dataclass(node):
        return ", ".join(f.name for f in dataclasses.fields(node))
    return ""


def node_at(path: str) -> Any:
    """The default value at a dotted key of the config (a registered user algorithm's section included), or None."""
    node: Any = Config()
    extra = {k: v for k, v in algorithms.sections().items() if not hasattr(node, k)}
    if extra:
        node = _with_sections(tuple(extra.items()))()
    for part in [p for p in path.split(".") if p]:
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


# numpy's and torch's generators take any non-negative seed; the stage streams derive seed * 1000 + k
MAX_SEED = 2**32 - 1


def validate(c: Config) -> None:
    """Range and choice checks; each failure names the key and what it accepts."""
    r, w, m = c.rm, c.world, c.model
    require(c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:"), "device", c.device, "auto, cpu, cuda or cuda:N")
    require(0 <= c.seed <= MAX_SEED, "seed", c.seed, f"an integer in [0, {MAX_SEED}]")
    require(c.threads >= 0, "threads", c.threads, "an integer >= 0 (0 = all cores)")
    require(m.arch in ARCHS, "model.arch", m.arch, " | ".join(ARCHS))
    require(m.activation in ACTIVATIONS, "model.activation", m.activation, " | ".join(ACTIVATIONS))
    require(m.n_layer >= 1, "model.n_layer", m.n_layer, "an integer >= 1")
    require(m.n_head >= 1, "model.n_head", m.n_head, "an integer >= 1")
    require(m.n_embd >= 1 and m.n_head >= 1 and m.n_embd % m.n_head == 0, "model.n_embd", m.n_embd, "an integer >= 1 that model.n_head divides")
    require(r.pairs in PAIR_MODES, "rm.pairs", r.pairs, " | ".join(PAIR_MODES))
    require(r.n_pairs >= 16, "rm.n_pairs", r.n_pairs, "an integer >= 16")
    require(r.n_eval_pairs >= 16, "rm.n_eval_pairs", r.n_eval_pairs, "an integer >= 16")
    require(r.center_coef >= 0, "rm.center_coef", r.center_coef, "a number >= 0")
    require(r.weight_decay >= 0, "rm.weight_decay", r.weight_decay, "a number >= 0")
    require(r.length_decorr >= 0, "rm.length_decorr", r.length_decorr, "a number >= 0")
    require(r.lr > 0, "rm.lr", r.lr, "a number > 0")
    require(r.ensemble_size >= 1, "rm.ensemble_size", r.ensemble_size, "an integer >= 1 (1 = a single reward model)")
    require(r.ensemble_agg in ENSEMBLE_AGGS, "rm.ensemble_agg", r.ensemble_agg, " | ".join(ENSEMBLE_AGGS))
    require(r.ensemble_lambda >= 0, "rm.ensemble_lambda", r.ensemble_lambda, "a number >= 0")
    require(r.n_layer is None or r.n_layer >= 1, "rm.n_layer", r.n_layer, "an integer >= 1, or null (the policy's model.n_layer)")
    require(r.n_embd is None or (r.n_embd >= 1 and r.n_embd % m.n_head == 0), "rm.n_embd", r.n_embd,
             f"a positive multiple of model.n_head={m.n_head}, or null (the policy's model.n_embd)")
    require(c.sft.lr > 0, "sft.lr", c.sft.lr, "a number > 0")
    require(c.sft.n_demos >= 16, "sft.n_demos", c.sft.n_demos, "an integer >= 16")
    require(c.sft.epochs >= 1, "sft.epochs", c.sft.epochs, "an integer >= 1")
    require(c.sft.batch_size >= 1, "sft.batch_size", c.sft.batch_size, "an integer >= 1")
    require(r.epochs >= 1, "rm.epochs", r.epochs, "an integer >= 1")
    require(r.batch_size >= 1, "rm.batch_size", r.batch_size, "an integer >= 1")
    require(w.draw is None or w.draw >= 0, "world.draw", w.draw, "an integer >= 0, or null (the default world)")
    require(w.n_intents >= 2, "world.n_intents", w.n_intents, "an integer >= 2")
    require(w.n_details >= 2, "world.n_details", w.n_details, "an integer >= 2")
    require(w.n_filler >= 1, "world.n_filler", w.n_filler, "an integer >= 1")
    require(w.n_explain >= 1, "world.n_explain", w.n_explain, "an integer >= 1")
    require(4 <= w.max_new_tokens <= 256, "world.max_new_tokens", w.max_new_tokens, "an integer in [4, 256]")
    require(0 <= w.second_detail_prob <= 1, "world.second_detail_prob", w.second_detail_prob, "a probability in [0, 1]")
    require(w.labeler.tau > 0, "world.labeler.tau", w.labeler.tau, "a number > 0")
    require(0 <= w.labeler.flip_rate <= 0.5, "world.labeler.flip_rate", w.labeler.flip_rate, "a probability in [0, 0.5]")
    require(0 < w.gold.directness <= 1, "world.gold.directness", w.gold.directness, "a number in (0, 1]")
    require(w.gold.ideal_len >= 0, "world.gold.ideal_len", w.gold.ideal_len, "an integer >= 0")
    d = w.demo
    require(min(d.complete, d.partial, d.wrong) >= 0 and d.complete + d.partial + d.wrong > 0, "world.demo", f"{d.complete}/{d.partial}/{d.wrong}", "non-negative weights complete/partial/wrong with a positive sum")
    algorithms.get(c.algo)
    validate_knobs(c)
    require(0 < c.eval.confidence < 1, "eval.confidence", c.eval.confidence, "a number in (0, 1)")
    require(0 < c.eval.trend_window <= 1, "eval.trend_window", c.eval.trend_window, "a share in (0, 1]")
    require(0 < c.eval.trend_alpha < 1, "eval.trend_alpha", c.eval.trend_alpha, "a level in (0, 1)")
    require(c.eval.trend_min_growth >= 0, "eval.trend_min_growth", c.eval.trend_min_growth, "a share >= 0 (0.25 is the default)")
    require(c.eval.n_prompts >= 16, "eval.n_prompts", c.eval.n_prompts, "an integer >= 16")


def rm_model(c: Config) -> ModelConfig:
    """The reward model's architecture: the policy's, with rm.n_layer / rm.n_embd where set."""
    return dataclasses.replace(c.model, n_layer=c.rm.n_layer or c.model.n_layer, n_embd=c.rm.n_embd or c.model.n_embd)


def validate_knobs(c: Config) -> None:
    """Every algorithm's knobs in the config (checked whichever algorithm runs: they are all in it), by each
    knobs dataclass's own `check`."""
    for section in algorithms.sections():
        knobs = getattr(c, section, None)
        if knobs is not None and hasattr(knobs, "check"):
            knobs.check(section)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'rm': {'lr': 0.1}} -> {'rm.lr': 0.1}: the MLflow params and CSV columns."""
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


