"""One trial, end to end: world -> SFT reference -> labeled pairs -> RM -> the algorithm -> evaluation.

`run_config` is what `rlhf-sweep run`, every sweep trial and every compare-fixes arm call. The algorithm is
`cfg.algo`'s card in the registry (config/algorithms.py): `algorithm_module` imports the module it names,
`train_policy` hands its `train` a copy of the reference, and an algorithm that trains nothing replaces
training and evaluation with its module's `evaluate`. The reference and the RM are cached under
`cache_dir` by a hash of exactly the config that determines each, so a run that changes only the
algorithm's knobs reuses both.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from rlhf_sweep import __version__
from rlhf_sweep.config import algorithms
from rlhf_sweep.config.algorithms import Algorithm
from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import Config, ModelConfig, config_hash, rm_model, to_dict
from rlhf_sweep.evaluation.metrics import advantage_record, advantage_stats_from, diagnose, evaluate, rm_filler_curve
from rlhf_sweep.evaluation.verdicts import not_applicable, observations
from rlhf_sweep.maths import kl as klmod
from rlhf_sweep.models.lm import build_lm, train_sft
from rlhf_sweep.models.reward import EnsembleRM, RewardModel, calibrate, collect_pairs, pair_accuracy, train_rm
from rlhf_sweep.run import layout
from rlhf_sweep.simulation.world import PROMPT_LEN, World, WorldCheckError, describe_world
from rlhf_sweep.training.core import AlgorithmInputs
from rlhf_sweep.utils.runtime import cores, file_lock

# bump when the code of the world, SFT or RM changes what a cached artefact would hold
CACHE_VERSION = 3

# independent random streams per stage, so that an algorithm's knobs never change the SFT or RM data;
# "policy" is the training stream of whichever algorithm trains
STREAMS = {"sft": 1, "pairs": 2, "rm": 3, "policy": 4, "eval": 5}


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


def threads(cfg: Config) -> int:
    """The torch thread count a run uses (`threads=0`: every core it may run on)."""
    return cfg.threads or cores()


def world_key(cfg: Config) -> dict:
    """The world as cache keys hold it: the default world (draw null) hashes as it did before draws existed."""
    w = to_dict(cfg.world)
    if w["draw"] is None:
        w.pop("draw")
    return w


def sft_key(cfg: Config, device: torch.device, model: ModelConfig | None = None) -> str:
    """The SFT reference's cache key (`model`: another architecture on the same demonstrations, e.g. an RM backbone)."""
    w = world_key(cfg)
    w.pop("gold"), w.pop("labeler")  # the reference never sees gold or labels
    # the thread count is in the key (and so in every RM key): it changes the float reduction order, and
    # weights 1e-3 apart send PPO elsewhere, so a cache made with another count would break "same seed, same run"
    return "sft-" + config_hash(CACHE_VERSION, w, model or cfg.model, cfg.sft, cfg.seed, device.type, threads(cfg))


def rm_size_differs(cfg: Config) -> bool:
    """Whether the RM has a size of its own (rm.n_layer / rm.n_embd away from the policy's)."""
    m = rm_model(cfg)
    return (m.n_layer, m.n_embd) != (cfg.model.n_layer, cfg.model.n_embd)


ENSEMBLE_KEYS = ("ensemble_size", "ensemble_agg", "ensemble_lambda")


def rm_key(cfg: Config, device: torch.device, member: int = 0) -> str:
    """One reward model's cache key. Member 0 is the single RM (the ensemble fields are left out,
    so an ensemble reuses it); members 1.. of an ensemble differ only by their index."""
    r = to_dict(cfg.rm)
    for k in ENSEMBLE_KEYS:
        r.pop(k)
    if not rm_size_differs(cfg):  # the policy's size, named or not, is the RM of before rm.n_layer/n_embd existed
        r.pop("n_layer"), r.pop("n_embd")
    else:
        r["n_layer"], r["n_embd"] = rm_model(cfg).n_layer, rm_model(cfg).n_embd
    parts = [sft_key(cfg, device), world_key(cfg), r, cfg.seed] + ([{"member": member}] if member else [])
    return "rm-" + config_hash(*parts)


def ensemble_key(cfg: Config, device: torch.device) -> str:
    """The cache key of an ensemble's calibration (the members cache under their own keys)."""
    r = cfg.rm
    return "rmens-" + config_hash(rm_key(cfg, device), r.ensemble_size, r.ensemble_agg, r.ensemble_lambda)


class Timer:
    """Wall seconds per stage, and CPU seconds of this process (the compute a stage costs, even
    when other processes share the cores)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t, c = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 3)
        self.cpu[name] = round(self.cpu.get(name, 0.0) + time.process_time() - c, 3)


class CacheError(RuntimeError):
    """A cached artefact that is unreadable and cannot be moved aside; the message names the file to delete."""


def _load_cached(path: Path, module: torch.nn.Module, device: torch.device) -> dict | str:
    """The info dict of the cached artefact at `path`, loaded into `module`; or why it cannot be used."""
    before = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
        module.load_state_dict(blob["state"])
        return {"cached": True, "path": str(path), **blob["info"]}
    except Exception as e:  # garbage, a cut-short file, another shape: torch's message may advise an unsafe load
        module.load_state_dict(before)  # a failed load may have copied some tensors: a rebuild starts where a cold one does
        text = " ".join(str(e).split())
        if "weights_only" in text or "Weights only" in text or not text:
            text = "not a checkpoint this code wrote"
        return f"{type(e).__name__}: {text.split('. ')[0][:160]}"


def _set_aside(path: Path, why: str) -> None:
    """Move an unreadable cached artefact out of the way (kept for inspection), in one warning line."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except OSError as e:
        raise CacheError(f"the cached artefact {path} is unreadable ({why}) and cannot be moved aside ({e.strerror}); "
                         "delete it and run again") from None
    print(f"warning: the cached artefact {path} is unreadable ({why}); moved to {aside.name}, rebuilding it", file=sys.stderr, flush=True)


def load_or_train(path: Path, module: torch.nn.Module, train, device: torch.device) -> dict:
    """Load `module` from `path` if cached, else `train()` it and save; returns its info dict.

    Several processes (sweep workers, compare-fixes arms) often want the same uncached
    artefact at once: a lock per file (in .locks/ beside the cache) lets the first train
    it while the others wait and then load it, instead of each training it at a fraction
    of the speed. Saved via a temporary file and an atomic rename, so a reader without
    the lock never sees a half-written file. A cached file that does not load (damaged on
    disk, or not this artefact) is moved aside and rebuilt under the same lock.
    """
    if path.exists():
        info = _load_cached(path, module, device)
        if isinstance(info, dict):
            return info
    with file_lock(path.parent / ".locks" / f"{path.stem}.lock"):
        if path.exists():  # built by another process while this one waited, or the unreadable file seen above
            info = _load_cached(path, module, device)
            if isinstance(info, dict):
                return info
            _set_aside(path, info)
        info = train()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"state": module.state_dict(), "info": info}, tmp)
        os.replace(tmp, path)
        return {"cached": False, "path": str(path), **info}


def cached_tensors(path: Path, make) -> dict:
    """A dict of tensors from `path`, or `make()`'s, saved there first: load_or_train's lock and atomic
    rename for artefacts that are data, not a module's weights."""
    if not path.exists():
        with file_lock(path.parent / ".locks" / f"{path.stem}.lock"):
            if not path.exists():
                blob = make()
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                torch.save(blob, tmp)
                os.replace(tmp, path)
                return blob
    return torch.load(path, map_location="cpu", weights_only=True)


def reward_model_key(cfg: Config, device: torch.device) -> str:
    """The cache key of the RM a run optimizes against: the single RM's, or the ensemble's calibration's."""
    return ensemble_key(cfg, device) if cfg.rm.ensemble_size > 1 else rm_key(cfg, device)


def freeze(module: torch.nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def get_reference(cfg: Config, world: World, device: torch.device, say, model: ModelConfig | None = None,
                  what: str = "SFT reference") -> tuple[torch.nn.Module, dict]:
    """The SFT model of `model` (default: the policy's, i.e. the frozen reference), trained or loaded."""
    model = model or cfg.model
    torch.manual_seed(cfg.seed)
    lm = build_lm(model, world.vocab.size, PROMPT_LEN + cfg.world.max_new_tokens).to(device)

    def train() -> dict:
        rng, _ = streams(cfg.seed, "sft", device)
        return train_sft(lm, world, cfg.sft, rng, device, cfg.progress)

    info = load_or_train(Path(cfg.cache_dir) / f"{sft_key(cfg, device, model)}.pt", lm, train, device)
    say(f"{what}: {'cached' if info['cached'] else 'trained'}, loss {info['sft/loss']:.3f} ({info['path']})")
    freeze(lm)
    return lm, info


def labeled_pairs(cfg: Config, world: World, ref: torch.nn.Module, device: torch.device):
    """The RM's training pairs and held-out pairs: the same for every member of an ensemble."""
    rng, gen = streams(cfg.seed, "pairs", device)
    pairs = collect_pairs(ref, world, cfg.rm.n_pairs, cfg.rm.pairs, rng, gen, device)
    held_out = collect_pairs(ref, world, cfg.rm.n_eval_pairs, "random", rng, gen, device)
    return pairs, held_out


def get_rm_member(cfg: Config, world: World, ref: torch.nn.Module, device: torch.device, say, member: int = 0,
                  data=None) -> tuple[RewardModel, dict]:
    """Reward model number `member` (0 = the single RM), trained or loaded from its cache file.

    Members 1.. use another seed for the head and the batch order, and a bootstrap resample of
    the same labeled pairs (bagging): without new labels, that is where members disagree.
    `data` is a zero-argument function returning (pairs, held_out), so they are drawn only if needed.
    """
    arch, own_size = rm_model(cfg), rm_size_differs(cfg)
    lm = build_lm(arch, world.vocab.size, PROMPT_LEN + cfg.world.max_new_tokens).to(device)
    if not own_size:
        lm.load_state_dict(ref.state_dict())  # the RM starts from the SFT backbone, as in InstructGPT
    rm = RewardModel(lm, arch.n_embd).to(device)
    data = data or (lambda: labeled_pairs(cfg, world, ref, device))

    def train() -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        if own_size:  # an SFT model of the RM's size on the same demonstrations; the pairs still come from `ref`
            backbone, b_info = get_reference(cfg, world, device, say, arch, f"RM backbone ({arch.n_layer} x {arch.n_embd})")
            lm.load_state_dict(backbone.state_dict())
        pairs, held_out = data()
        train_pairs = pairs
        if member == 0:
            rng_rm, _ = streams(cfg.seed, "rm", device)
            torch.manual_seed(cfg.seed + 1)
        else:
            rng_rm = np.random.default_rng([cfg.seed, STREAMS["rm"], member])
            torch.manual_seed(cfg.seed + 1 + 1000 * member)
            n = len(pairs.prompts)
            train_pairs = pairs.subset(torch.from_numpy(rng_rm.integers(0, n, n)))
        torch.nn.init.normal_(rm.head.weight, std=1.0 / (arch.n_embd + 1) ** 0.5)
        torch.nn.init.zeros_(rm.head.bias)
        info = train_rm(rm, train_pairs, cfg.rm, rng_rm, device, cfg.progress)
        if own_size:  # which backbone, and whether this RM's training built it (the cache audit counts builds)
            info["backbone"] = {"path": b_info["path"], "cached": b_info["cached"]}
        calibrate(rm, torch.cat([pairs.prompts, pairs.prompts]), torch.cat([pairs.first, pairs.second]), device)
        info.update(pair_accuracy(rm, held_out, device))
        decided = held_out.gold_diff.abs() > 1e-6
        info["rm/label_agreement_with_gold"] = float((held_out.prefer_first == held_out.gold_first)[decided].float().mean())
        info["rm/train_seconds"] = round(time.perf_counter() - t0, 3)
        info["rm/train_cpu_seconds"] = round(time.process_time() - c0, 3)
        return info

    info = load_or_train(Path(cfg.cache_dir) / f"{rm_key(cfg, device, member)}.pt", rm, train, device)
    what = f"reward model{f' member {member}' if member else ''}{f' ({arch.n_layer} x {arch.n_embd})' if own_size else ''}"
    say(f"{what}: {'cached' if info['cached'] else f'trained on {cfg.rm.n_pairs} {cfg.rm.pairs} pairs'}, "
        f"acc on labels {info['rm/acc_labels']:.3f}, on gold {info['rm/acc_gold']:.3f} ({info['path']})")
    freeze(rm)
    return rm, info


def get_reward_model(cfg: Config, world: World, ref: torch.nn.Module, device: torch.device,
                     say) -> tuple[RewardModel | EnsembleRM, dict]:
    """The RM that PPO optimizes: one model, or an ensemble of cfg.rm.ensemble_size members."""
    memo: dict = {}

    def data():
        if "d" not in memo:
            memo["d"] = labeled_pairs(cfg, world, ref, device)
        return memo["d"]

    K = cfg.rm.ensemble_size
    members, infos = [], []
    for m in range(K):
        rm, info = get_rm_member(cfg, world, ref, device, say, m, data)
        members.append(rm)
        infos.append(info)
    if K == 1:
        return members[0], {**infos[0], "rm/train_seconds": infos[0].get("rm/train_seconds", float("nan")),
                            "rm/train_cpu_seconds": infos[0].get("rm/train_cpu_seconds", float("nan"))}
    ens = EnsembleRM(members, cfg.rm.ensemble_agg, cfg.rm.ensemble_lambda).to(device)

    def train() -> dict:
        pairs, held_out = data()
        calibrate(ens, torch.cat([pairs.prompts, pairs.prompts]), torch.cat([pairs.first, pairs.second]), device)
        return pair_accuracy(ens, held_out, device)

    info = load_or_train(Path(cfg.cache_dir) / f"{ensemble_key(cfg, device)}.pt", ens.norm, train, device)
    info["rm/train_seconds"] = float(sum(i.get("rm/train_seconds", float("nan")) for i in infos))
    info["rm/train_cpu_seconds"] = float(sum(i.get("rm/train_cpu_seconds", float("nan")) for i in infos))
    info["members"] = [{k: v for k, v in i.items() if k.startswith("rm/")} for i in infos]
    say(f"reward ensemble: {K} members, {cfg.rm.ensemble_agg}"
        f"{f' (lambda {cfg.rm.ensemble_lambda})' if cfg.rm.ensemble_agg == 'mean_std' else ''}, "
        f"acc on labels {info['rm/acc_labels']:.3f}, on gold {info['rm/acc_gold']:.3f}")
    freeze(ens)
    return ens, info


def algorithm_module(card: Algorithm):
    """The module that runs `card`'s algorithm, imported by the dotted path its card names."""
    try:
        return importlib.import_module(card.module)
    except ImportError as e:
        raise RuntimeError(f"algo={card.name}: its module {card.module} does not import ({type(e).__name__}: {e})") from None


def algorithm_inputs(cfg: Config, card: Algorithm, world: World, ref: torch.nn.Module, rm, device: torch.device, stream: str,
                     policy_lm: torch.nn.Module | None = None, on_iteration=None) -> AlgorithmInputs:
    """What the algorithm's module gets: the run, its knobs, the models, the `stream` and the pipeline's caches."""
    rng, gen = streams(cfg.seed, stream, device)
    return AlgorithmInputs(
        cfg=cfg, knobs=getattr(cfg, card.section) if card.section else None, world=world, ref=ref, rm=rm, device=device,
        rng=rng, gen=gen, policy_lm=policy_lm, on_iteration=on_iteration or (lambda _i, _entry, _batch: None),
        labeled_pairs=lambda: labeled_pairs(cfg, world, ref, device)[0],
        cached_tensors=lambda name, make: cached_tensors(Path(cfg.cache_dir) / f"{name}.pt", make),
        rm_key=reward_model_key(cfg, device))


def train_policy(cfg: Config, world: World, ref: torch.nn.Module, rm, device: torch.device,
                 on_iteration) -> tuple[torch.nn.Module, list[dict]]:
    """Train cfg.algo's policy: it starts as a copy of the reference and trains on the policy stream;
    returns the policy LM and one history entry per iteration."""
    card = algorithms.get(cfg.algo)
    if not card.trains:
        raise ValueError(f"algo={card.name} trains nothing (its module evaluates itself); train_policy runs algorithms that train")
    max_len = PROMPT_LEN + cfg.world.max_new_tokens
    policy_lm = build_lm(cfg.model, world.vocab.size, max_len).to(device)
    policy_lm.load_state_dict(ref.state_dict())
    inputs = algorithm_inputs(cfg, card, world, ref, rm, device, "policy", policy_lm, on_iteration)
    return algorithm_module(card).train(inputs)


def n_params(module: torch.nn.Module) -> int:
    """Parameters of a model, tied weights once."""
    return int(sum(p.numel() for p in module.parameters()))


def save_samples(path: Path, samples: dict, adv_records: list[dict], ood: dict) -> None:
    """The raw held-out numbers the diagnosis reads (~0.5 MB), so `explain` and tests can recompute it."""
    side = ("rm", "gold", "length", "filler")
    torch.save({
        "P": {k: torch.as_tensor(samples["P"][k]) for k in side},
        "R": {k: torch.as_tensor(samples["R"][k]) for k in side},
        "kl": {k: v.clone() for k, v in samples["kl"].items()} if samples["kl"] is not None else None,
        "adv": [{k: torch.as_tensor(v) for k, v in rec.items()} for rec in adv_records],
        "filler_curve": ood,
    }, path)


def run_config(cfg: Config | Sequence[str], run_dir: str | Path, *, threads: int | None = None, progress: bool | None = None,
               say=print) -> tuple[Config, dict]:
    """The one way to run a config: `rlhf-sweep run`, every sweep trial's seed, every best-of-n baseline and
    every compare-fixes arm come through here. cfg: a loaded Config or Hydra overrides to compose; the summary
    goes to run_dir. A cold SFT reference or RM is built under its lock, once per host."""
    cfg = compose(list(cfg)) if not isinstance(cfg, Config) else cfg
    cfg.run_dir = str(run_dir)
    if threads is not None:
        cfg.threads = threads
    if progress is not None:
        cfg.progress = progress
    return cfg, run(cfg, say=say)


def run(cfg: Config, say=print) -> dict:
    """Run one trial and return its summary (also written to cfg.run_dir/summary.json)."""
    torch.set_num_threads(threads(cfg))
    device = pick_device(cfg.device)
    if device.type == "cuda":  # same seed, same metrics: CUDA's atomics-based kernels (embedding backward) are not
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    world = World(cfg.world)
    if cfg.world.draw is not None:
        say(describe_world(cfg.world))
        problems = world.check()
        if problems:  # a draw range that makes a broken world: never run on it
            raise WorldCheckError(f"world.draw={cfg.world.draw}: " + "; ".join(problems))
    timer = Timer()
    card = algorithms.get(cfg.algo)
    penalty = card.penalty(cfg) if card.penalty is not None else None
    if penalty is not None and klmod.warning(penalty):
        say(klmod.warning(penalty))

    with timer.stage("sft"):
        ref, sft_info = get_reference(cfg, world, device, say)
    with timer.stage("rm"):
        rm, rm_info = get_reward_model(cfg, world, ref, device, say)
    adv_records = []  # raw per-iteration numbers behind the advantage diagnosis (samples.pt)
    if not card.trains:  # nothing to train: the evaluation is the algorithm
        with timer.stage("eval"):
            inputs = algorithm_inputs(cfg, card, world, ref, rm, device, "eval")
            metrics, samples, history = algorithm_module(card).evaluate(inputs)
    else:
        def on_iteration(_i: int, entry: dict, batch: dict) -> None:
            if "advantages" in batch:  # an offline algorithm has none
                adv_records.append(advantage_record(world, batch))
                # under the algorithm's own prefix (advantage_stats_from names them as PPO's history does)
                entry.update({f"{card.prefix}/{k.split('/', 1)[1]}": v for k, v in advantage_stats_from(adv_records[-1]).items()})

        with timer.stage(cfg.algo):  # the training stage's timing key: ppo, rloo, ...
            policy_lm, history = train_policy(cfg, world, ref, rm, device, on_iteration)
        with timer.stage("eval"):
            rng, gen = streams(cfg.seed, "eval", device)
            # an algorithm whose card says so is evaluated on the distribution it sampled from
            temperature = getattr(cfg, card.section).temperature if card.eval_at_temperature else 1.0
            metrics, samples = evaluate(policy_lm, ref, rm, world, cfg.eval.n_prompts, cfg.eval.confidence, rng, gen, device,
                                        temperature)
    with timer.stage("eval"):
        metrics["rm/acc_labels"] = rm_info["rm/acc_labels"]
        metrics["rm/acc_gold"] = rm_info["rm/acc_gold"]
        prefix = card.prefix
        if card.final_metrics:
            for k in card.final_metrics:
                metrics[k] = history[-1][k]
        else:  # the algorithm's own final statistics (one that evaluates itself has them in its metrics already)
            metrics.update({k: v for k, v in history[-1].items() if k.startswith(f"{prefix}/") and k not in metrics})
        final_beta = history[-1].get(f"{prefix}/beta", math.nan) if card.trains else math.nan
        obs = observations(metrics, history, final_beta, cfg.eval.trend_window, cfg.eval.trend_alpha,
                           cfg.eval.trend_min_growth)
        if not card.trains:
            obs["kl_increasing"] = not_applicable(card.kl_trend_note(metrics) if card.kl_trend_note else
                                                  f"algo={card.name} trains nothing, so no KL grows over iterations")
        if card.judge:
            obs["rm_prefers_policy"]["judge"] = card.judge
        # the RM's shape beyond the reference's filler counts; deterministic, draws no random numbers
        ood = rm_filler_curve(rm, world, samples["prompts"], samples["ref"], device)
        diag = diagnose(metrics, samples, history, final_beta, ood, prefix)
    timer.seconds["total"] = round(sum(timer.seconds.values()), 3)

    examples = [
        {"prompt": world.vocab.decode(samples["prompts"][i]), "policy": world.vocab.decode(samples["policy"][i]), "ref": world.vocab.decode(samples["ref"][i])}
        for i in range(5)
    ]
    # what the KL penalty's gradient is (kl.PENALTIES): in the config it ran with, and as a tag for MLflow
    tags = {"kl/gradient": penalty.gradient} if penalty is not None else {}
    summary = {
        "version": __version__,
        "config": {**to_dict(cfg), **tags},
        "tags": tags,
        "device": str(device),
        "metrics": metrics,
        "history": history,
        "observations": obs,
        "diagnosis": diag,
        "timing": timer.seconds,
        "cache": {"sft": sft_info, "rm": rm_info},
        # one RM of the run's RM size (an ensemble's member): what the RM-scaling report puts on its x axis
        "models": {"rm_params": n_params(rm.members[0] if isinstance(rm, EnsembleRM) else rm)},
        # what the run's RM(s) cost to train (when they were trained; nan for artefacts cached before
        # timing was recorded) and what PPO + evaluation cost now, in wall and CPU seconds
        "cost": {"rm_train_seconds": rm_info.get("rm/train_seconds", float("nan")),
                 "rm_train_cpu_seconds": rm_info.get("rm/train_cpu_seconds", float("nan")),
                 # the training stage's (PPO's, or the algorithm's; none for best-of-n) + the evaluation's
                 "ppo_eval_seconds": round(timer.seconds.get(cfg.algo, 0.0) + timer.seconds["eval"], 3),
                 "ppo_eval_cpu_seconds": round(timer.cpu.get(cfg.algo, 0.0) + timer.cpu["eval"], 3)},
        "examples": examples,
    }
    if cfg.run_dir:
        out = Path(cfg.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        layout.write_summary(out, summary)
        save_samples(layout.samples_path(out), samples, adv_records, ood)
    return summary

