"""Performance in one run: PPO against its compute floor and TRL, sweep workers, cost growth.

    python bench/run.py [--quick] [--device cpu|cuda] [--threads N] [--skip-trl] [--skip-sweep] [--workers-list 1,2,4,8]

1. PPO throughput for the default model and batch (the cached SFT reference and RM), and the
   compute floor in the same process: the same sampling steps, forwards and forward/backward
   minibatches on the very batches the framework produced, in a tight loop with nothing around
   them (no rewards, GAE, statistics or logging). floor_ratio = framework time / floor time.
2. TRL's RLOOTrainer (the optional `bench` extra: pip install -e .[bench]) against this PPO on
   the identical tiny GPT-2 (random weights, so every completion runs the full 24 tokens):
   64 completions, 24 new tokens, one update per batch (PPO: one epoch, one minibatch).
   trl_ratio = our completions/s / TRL's completions/s.
3. Sweep throughput: the same grid of trials with each worker count of `--workers-list` (default 1,2;
   bench/sweep_workers.py), CPU trials (device=cpu) with cores // workers threads each. Counts above
   this machine's cores are not run (a worker per core is the most a sweep gives a trial; beyond it
   workers only share cores), and the output says so. workers_speedup = trials/hour with 2 workers /
   trials/hour with 1; workers_speedup_N for every other N measured.
4. Cost growth: time per PPO iteration as max_new_tokens and batch double (random weights, so
   the tokens really double).

With --device cuda, PPO also runs on this machine's CPU in the same process: cuda_speedup = CUDA
completions/s / CPU completions/s (the throughput line of the table above, on each device).

The last line printed is one JSON object. Ratios are measured in this one run, on this machine:
run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from rlhf_sweep.config.compose import compose  # noqa: E402
from rlhf_sweep.models.lm import PolicyWithValue, build_lm, decoder, draw, lm_logits, response_logits  # noqa: E402
from rlhf_sweep.models.reward import RewardModel  # noqa: E402
from rlhf_sweep.run import pipeline  # noqa: E402
from rlhf_sweep.simulation.world import PROMPT_LEN, World  # noqa: E402
from rlhf_sweep.training.ppo import train_ppo  # noqa: E402
from rlhf_sweep.utils.tables import format_table  # noqa: E402

TARGETS = {"floor_ratio": ("<=", 1.5), "trl_ratio": (">=", 2.0), "workers_speedup": (">=", 1.8),
           "workers_speedup_4": (">=", 3.0), "workers_speedup_8": (">=", 5.0)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def quiet(_msg: str) -> None:
    pass


def policy_from(ref: torch.nn.Module, cfg, world: World, device: torch.device) -> PolicyWithValue:
    lm = build_lm(cfg.model, world.vocab.size, PROMPT_LEN + cfg.world.max_new_tokens).to(device)
    lm.load_state_dict(ref.state_dict())
    return PolicyWithValue(lm, cfg.model.n_embd).to(device)


def random_models(cfg, world: World, device: torch.device, seed: int = 0):
    """Untrained reference and RM: sampling from them rarely ends early, so every row runs max_new_tokens."""
    torch.manual_seed(seed)
    max_len = PROMPT_LEN + cfg.world.max_new_tokens
    ref = build_lm(cfg.model, world.vocab.size, max_len).to(device).eval()
    rm = RewardModel(build_lm(cfg.model, world.vocab.size, max_len), cfg.model.n_embd).to(device).eval()
    for p in [*ref.parameters(), *rm.parameters()]:
        p.requires_grad_(False)
    return ref, rm


def time_ppo(cfg, world: World, ref, rm, device: torch.device, iterations: int, warmup: int = 2) -> dict:
    """Wall time of `iterations` framework PPO iterations after a warm-up; records each batch for the floor."""
    policy = policy_from(ref, cfg, world, device)
    rng, gen = pipeline.streams(cfg.seed, "policy", device)
    train_ppo(policy, ref, rm, world, dataclasses.replace(cfg.ppo, iterations=warmup), rng, gen, device, progress=False)
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(_i: int, _entry: dict, b: dict) -> None:
        batches.append((b["prompts"], b["responses"], b["advantages"]))

    start = policy.state_dict()
    sync(device)
    t = time.perf_counter()
    train_ppo(policy, ref, rm, world, dataclasses.replace(cfg.ppo, iterations=iterations), rng, gen, device, False, record)
    sync(device)
    wall = time.perf_counter() - t
    tokens = sum(int((r != 0).sum()) for _, r, _ in batches)  # response tokens up to and incl. EOS (PAD is 0)
    return {"wall": wall, "iterations": iterations, "completions": iterations * cfg.ppo.batch_size, "tokens": tokens,
            "batches": batches, "start": start}


def time_floor(cfg, world: World, ref, rm, device: torch.device, run: dict) -> float:
    """The framework's unavoidable work on the same batches: the sampling steps, the reference's and
    the RM's forwards, epochs x minibatches of forward/backward/step. Nothing else."""
    policy = policy_from(ref, cfg, world, device)
    policy.load_state_dict(run["start"])
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.ppo.lr, eps=1e-5, fused=True)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    p = cfg.ppo
    head = policy.lm.get_output_embeddings()
    sync(device)
    t = time.perf_counter()
    for prompts, responses, adv in run["batches"]:
        prompts, responses, adv = prompts.to(device), responses.to(device), adv.to(device)
        seqs = torch.cat([prompts, responses], 1)
        with torch.no_grad():  # sampling: the same cached steps and draws, the recorded tokens fed back
            step = decoder(policy.lm, len(prompts), seqs.shape[1])
            h = step(prompts)
            for i in range(responses.shape[1]):
                draw(torch.softmax(head(h).float(), -1), gen)
                if i == responses.shape[1] - 1:
                    break
                h = step(responses[:, i : i + 1])
            lm_logits(ref, seqs)
            rm(prompts, responses)
        mb = len(seqs) // p.minibatches
        for _ in range(p.epochs):
            perm = torch.randperm(len(seqs), device=device)
            for s in range(p.minibatches):
                idx = perm[s * mb : (s + 1) * mb]
                logits, values = policy(seqs[idx])
                logp = torch.log_softmax(response_logits(logits).float(), -1)
                logp = logp.gather(-1, responses[idx].unsqueeze(-1)).squeeze(-1)
                loss = -(logp * adv[idx]).mean() + values.square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    sync(device)
    return time.perf_counter() - t


def bench_ppo(device: torch.device, threads: int, quick: bool) -> dict:
    cfg = compose(["progress=false", f"device={device.type}", f"threads={threads}"])
    world = World(cfg.world)
    t = time.perf_counter()
    ref, _ = pipeline.get_reference(cfg, world, device, quiet)
    rm, _ = pipeline.get_reward_model(cfg, world, ref, device, quiet)
    setup = time.perf_counter() - t
    run = time_ppo(cfg, world, ref, rm, device, 10 if quick else 30)
    floor = time_floor(cfg, world, ref, rm, device, run)
    return {"setup_s": setup, "framework_s": run["wall"], "floor_s": floor, "iterations": run["iterations"],
            "completions_per_s": run["completions"] / run["wall"], "tokens_per_s": run["tokens"] / run["wall"],
            "floor_completions_per_s": run["completions"] / floor, "floor_ratio": run["wall"] / floor,
            "ms_per_iteration": 1000 * run["wall"] / run["iterations"]}


def vocab_tokenizer(world: World, path: Path):
    """A word-level tokenizer over the world's token ids ('t0' .. 't43'), saved so TRL can load it offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(world.vocab.size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t3", unk_token="t0")
    fast.padding_side = "left"
    fast.save_pretrained(path)
    return fast


def bench_trl(device: torch.device, threads: int, quick: bool) -> dict | None:
    """TRL's RLOOTrainer and our PPO doing the same work on the same untrained GPT-2."""
    try:
        import trl
        from datasets import Dataset
        from transformers import GPT2ForSequenceClassification, TrainerCallback
    except ImportError:
        return None
    cfg = compose(["progress=false", f"device={device.type}", f"threads={threads}", "ppo.epochs=1", "ppo.minibatches=1",
                   "ppo.batch_size=64", "world.max_new_tokens=24"])
    world = World(cfg.world)
    steps = 6 if quick else 15
    ref, rm = random_models(cfg, world, device)
    ours = time_ppo(cfg, world, ref, rm, device, steps)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            self.times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = vocab_tokenizer(world, d / "model")
        torch.manual_seed(0)
        # a longer position table than ours (TRL pads prompts to a multiple of 64); same compute per token
        lm = build_lm(cfg.model, world.vocab.size, 128)
        lm.save_pretrained(d / "model")  # TRL builds its reference model from the policy's path
        rm_hf = build_lm(cfg.model, world.vocab.size, 128).config
        rm_hf.num_labels = 1
        reward = GPT2ForSequenceClassification(rm_hf)
        rng = np.random.default_rng(0)
        prompts = world.sample_prompts(32 * (steps + 3), rng)
        data = Dataset.from_dict({"prompt": [" ".join(f"t{int(i)}" for i in row if int(i) != 0) for row in prompts]})
        args = trl.RLOOConfig(
            output_dir=str(d / "out"), per_device_train_batch_size=64, num_generations=2, max_completion_length=24,
            num_iterations=1, steps_per_generation=1, gradient_accumulation_steps=1, beta=0.05, learning_rate=1e-4,
            max_steps=steps + 2, logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=device.type == "cpu",
            bf16=False, fp16=False, gradient_checkpointing=False, temperature=1.0, top_k=0, disable_dropout=True, dataloader_num_workers=0, seed=0,
        )
        timer = StepTimes()
        trainer = trl.RLOOTrainer(model=str(d / "model"), reward_funcs=reward, args=args, train_dataset=data,
                                  processing_class=tok, reward_processing_classes=[tok], callbacks=[timer])
        torch.set_num_threads(threads)
        trainer.train()
    t = timer.times[2:]  # the first two steps warm up
    trl_cps = 64 * (len(t) - 1) / (t[-1] - t[0])
    our_cps = ours["completions"] / ours["wall"]
    return {"trl_version": trl.__version__, "ours_completions_per_s": our_cps, "trl_completions_per_s": trl_cps,
            "trl_ratio": our_cps / trl_cps, "ours_ms_per_step": 1000 * ours["wall"] / steps,
            "trl_ms_per_step": 1000 * (t[-1] - t[0]) / (len(t) - 1)}


def bench_growth(device: torch.device, threads: int, quick: bool) -> list[dict]:
    """ms per PPO iteration (default epochs/minibatches) with untrained models, doubling tokens then batch."""
    rows = []
    grid = [(24, 64), (48, 64), (96, 64), (24, 128), (24, 256)]
    if quick:
        grid = grid[:2] + grid[3:4]
    for new_tokens, batch in grid:
        cfg = compose(["progress=false", f"device={device.type}", f"threads={threads}",
                       f"world.max_new_tokens={new_tokens}", f"ppo.batch_size={batch}"])
        world = World(cfg.world)
        ref, rm = random_models(cfg, world, device)
        run = time_ppo(cfg, world, ref, rm, device, 3 if quick else 6, warmup=1)
        # positions: what the forwards process (prompt + the batch's longest response, every row)
        positions = sum(r.shape[0] * (PROMPT_LEN + r.shape[1]) for _, r, _ in run["batches"])
        rows.append({"max_new_tokens": new_tokens, "batch_size": batch, "tokens_per_iter": run["tokens"] / run["iterations"],
                     "positions_per_iter": positions / run["iterations"], "ms_per_iteration": 1000 * run["wall"] / run["iterations"]})
    base = rows[0]
    for r in rows:
        r["time_x"] = r["ms_per_iteration"] / base["ms_per_iteration"]
        r["tokens_x"] = r["tokens_per_iter"] / base["tokens_per_iter"]
        r["positions_x"] = r["positions_per_iter"] / base["positions_per_iter"]
    return rows


def bench_sweep(quick: bool, counts: list[int]) -> dict:
    """trials/hour of the same grid for each worker count that this machine's cores allow."""
    import sweep_workers as sw

    from rlhf_sweep.utils.runtime import cores

    n_cores = cores()
    measured = [w for w in counts if w <= n_cores]
    skipped = [w for w in counts if w > n_cores]
    # full: trials the size of a shipped study's (default PPO: 150 iterations of 64), at least two per worker;
    # quick: small ones, where each worker's start-up (a fresh interpreter importing torch) weighs more
    trials, iterations, batch = (4, 40, 32) if quick else (max(8, 2 * max(measured, default=1)), 150, 64)
    trials += trials % 2  # the grid is (trials / 2) betas x 2 clip ranges
    study = sw.OUT / "bench_grid.yaml"
    if sw.OUT.exists():
        import shutil

        shutil.rmtree(sw.OUT)
    sw.OUT.mkdir(parents=True)
    sw.write_study(study, trials, iterations, batch, device="cpu")
    threads = {w: max(1, n_cores // w) for w in measured}
    for t in sorted(set(threads.values())):  # SFT and RM into the cache for every thread count: every timed sweep starts warm
        sw.sweep(study, f"warm{t}", n_cores // t, n_trials=n_cores // t)
    walls = {w: sw.sweep(study, f"workers{w}", w) for w in measured}
    base = min(walls) if walls else None
    return {"trials": trials, "iterations": iterations, "batch_size": batch, "cores": n_cores, "threads": threads, "wall": walls,
            "trials_per_hour": {w: 3600 * trials / t for w, t in walls.items()},
            "speedup": {w: walls[base] / t for w, t in walls.items()}, "base": base,
            "skipped": {w: f"{w} workers need {w} cores, this machine has {n_cores}: beyond a worker per core they only share "
                           f"cores, so trials/hour is bounded by what {n_cores} worker(s) give" for w in skipped}}


def workers_list(text: str) -> list[int]:
    try:
        ws = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        sys.exit(f"--workers-list: expected worker counts like 1,2,4,8, got {text!r}")
    if not ws or ws[0] < 1:
        sys.exit(f"--workers-list: expected worker counts >= 1 like 1,2,4,8, got {text!r}")
    return ws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations and trials (about 3 minutes on 2 cores)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for the in-process benches")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true", help="the sweep bench runs CPU worker processes")
    ap.add_argument("--workers-list", default="1,2", help="worker counts of the sweep bench, e.g. 1,2,4,8 (those above the cores are not run)")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    out: dict = {"device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"), "threads": a.threads,
                 "torch": torch.__version__}

    ppo = bench_ppo(device, a.threads, a.quick)
    print(format_table(("PPO, default model and batch", "framework", "floor"), [
        ("seconds", f"{ppo['framework_s']:.2f}", f"{ppo['floor_s']:.2f}"),
        ("completions/s", f"{ppo['completions_per_s']:.0f}", f"{ppo['floor_completions_per_s']:.0f}"),
        ("tokens/s", f"{ppo['tokens_per_s']:.0f}", ""),
        ("ms per iteration", f"{ppo['ms_per_iteration']:.1f}", ""),
        ("floor_ratio (<= 1.5)", f"{ppo['floor_ratio']:.2f}", ""),
    ], title=f"\n{ppo['iterations']} iterations after warm-up on {out['device']}, {a.threads} threads"))
    out.update({k: round(ppo[k], 3) for k in ("completions_per_s", "tokens_per_s", "floor_ratio", "ms_per_iteration")})

    trl_res = None if a.skip_trl else bench_trl(device, a.threads, a.quick)
    if trl_res is None:
        print("\nTRL: skipped" + ("" if a.skip_trl else " (not installed: pip install -e .[bench])"))
        out["trl_ratio"] = None
    else:
        print(format_table(("64 completions x 24 tokens, 1 update", "rlhf-sweep PPO", f"TRL {trl_res['trl_version']} RLOO"), [
            ("completions/s", f"{trl_res['ours_completions_per_s']:.0f}", f"{trl_res['trl_completions_per_s']:.0f}"),
            ("ms per step", f"{trl_res['ours_ms_per_step']:.0f}", f"{trl_res['trl_ms_per_step']:.0f}"),
            ("trl_ratio (>= 2)", f"{trl_res['trl_ratio']:.2f}", ""),
        ], title="\nagainst TRL, identical untrained GPT-2"))
        out["trl_ratio"] = round(trl_res["trl_ratio"], 3)
        out["trl_completions_per_s"] = round(trl_res["trl_completions_per_s"], 3)

    growth = bench_growth(device, a.threads, a.quick)
    print(format_table(("max_new_tokens", "batch", "tokens/iter", "ms/iter", "time x", "tokens x", "positions x"), [
        (r["max_new_tokens"], r["batch_size"], f"{r['tokens_per_iter']:.0f}", f"{r['ms_per_iteration']:.0f}",
         f"{r['time_x']:.2f}", f"{r['tokens_x']:.2f}", f"{r['positions_x']:.2f}") for r in growth
    ], title="\ncost growth (untrained models, default epochs and minibatches; tokens: response tokens sampled,\n"
             "positions: prompt + padded response, every row, which is what the forwards and backwards process)"))
    out["growth"] = [{k: round(v, 3) for k, v in r.items()} for r in growth]

    if device.type == "cuda":
        cpu = bench_ppo(torch.device("cpu"), a.threads, a.quick)
        print(format_table(("PPO, default model and batch", "cuda", "cpu"), [
            ("completions/s", f"{ppo['completions_per_s']:.0f}", f"{cpu['completions_per_s']:.0f}"),
            ("ms per iteration", f"{ppo['ms_per_iteration']:.1f}", f"{cpu['ms_per_iteration']:.1f}"),
            ("cuda_speedup", f"{ppo['completions_per_s'] / cpu['completions_per_s']:.2f}", ""),
        ], title=f"\nCUDA against this machine's CPU ({a.threads} threads), same run"))
        out.update({"cpu_completions_per_s": round(cpu["completions_per_s"], 3),
                    "cuda_speedup": round(ppo["completions_per_s"] / cpu["completions_per_s"], 3)})

    out["workers_speedup"] = None
    if not a.skip_sweep:
        sw = bench_sweep(a.quick, workers_list(a.workers_list))
        ws = sorted(sw["wall"])
        rows = [("threads per worker", *[sw["threads"][w] for w in ws]),
                ("wall seconds", *[f"{sw['wall'][w]:.1f}" for w in ws]),
                ("trials/hour", *[f"{sw['trials_per_hour'][w]:.0f}" for w in ws]),
                (f"speedup vs {sw['base']} worker(s)", *[f"{sw['speedup'][w]:.2f}" for w in ws])]
        print(format_table(("sweep, same grid", *[f"{w} worker{'s' if w > 1 else ''}" for w in ws]), rows,
                           title=f"\n{sw['trials']} trials of {sw['iterations']} PPO iterations x {sw['batch_size']}, warm cache, "
                                 f"CPU trials, {sw['cores']} cores"))
        for why in sw["skipped"].values():
            print(f"not run: {why}")
        out["workers"] = {str(w): {"threads": sw["threads"][w], "wall_s": round(sw["wall"][w], 1),
                                   "trials_per_hour": round(sw["trials_per_hour"][w], 1), "speedup": round(sw["speedup"][w], 3)}
                          for w in ws}
        out["workers_not_run"] = {str(w): why for w, why in sw["skipped"].items()}
        for w in ws:
            out[f"trials_per_hour_{w}"] = round(sw["trials_per_hour"][w], 1)
            if w != sw["base"] and sw["base"] == 1:
                out["workers_speedup" if w == 2 else f"workers_speedup_{w}"] = round(sw["speedup"][w], 3)

    misses = [f"{k} {out[k]} (target {op} {v})" for k, (op, v) in TARGETS.items()
              if out.get(k) is not None and not (out[k] <= v if op == "<=" else out[k] >= v)]
    print("\ntargets missed: " + ("; ".join(misses) if misses else "none"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
