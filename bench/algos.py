"""Time per trial of each algorithm on the default world, against PPO's.

    python bench/algos.py [--seed N] [--threads N] [--repeats N] [extra overrides...]

Runs the default `rlhf-sweep run` config once per algorithm (`algo=ppo|rloo|grpo|dpo|ipo|bon`, each at its
documented defaults) with the SFT reference and RM cached (a first PPO run builds them and is not timed),
and prints, per algorithm, the wall seconds of the whole trial and of its training and evaluation stages,
and the trial's time as a ratio of PPO's. The last line is one JSON object. Run it on an idle machine
(`flock /work/heavy.lock` where machines are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from rlhf_sweep.config import algorithms  # noqa: E402
from rlhf_sweep.config.compose import compose  # noqa: E402
from rlhf_sweep.run import pipeline  # noqa: E402
from rlhf_sweep.utils.tables import format_table  # noqa: E402

ALGOS = tuple(a.name for a in algorithms.SHIPPED)


def one(algo: str, seed: int, threads: int, extra: list[str]) -> dict:
    cfg = compose([f"algo={algo}", f"seed={seed}", f"threads={threads}", "progress=false", "mlflow.enabled=false", *extra])
    t = time.perf_counter()
    s = pipeline.run(cfg, say=lambda *_: None)
    wall = time.perf_counter() - t
    return {"algo": algo, "wall_s": wall, "train_s": s["timing"].get(algo, 0.0), "eval_s": s["timing"]["eval"],
            "gold": s["metrics"]["gold/policy"], "kl": s["metrics"]["kl/exact"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the cores this process may use)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per algorithm (the fastest counts)")
    ap.add_argument("extra", nargs="*", help="overrides for every run, Hydra syntax")
    a = ap.parse_args()
    one("ppo", a.seed, a.threads, a.extra)  # builds (or loads) the reference and the RM: not timed
    rows = {}
    for algo in ALGOS:
        runs = [one(algo, a.seed, a.threads, a.extra) for _ in range(a.repeats)]
        rows[algo] = min(runs, key=lambda r: r["wall_s"])
    ppo = rows["ppo"]["wall_s"]
    print(format_table(("algorithm (defaults)", "trial s", "train s", "eval s", "x PPO", "gold", "KL (nats)"),
                       [(r["algo"], r["wall_s"], r["train_s"], r["eval_s"], r["wall_s"] / ppo, r["gold"], r["kl"]) for r in rows.values()],
                       title=f"time per trial on the default world, seed {a.seed}, SFT reference and RM cached"))
    print(json.dumps({f"{k}_trial_s": round(r["wall_s"], 2) for k, r in rows.items()}
                     | {f"{k}_x_ppo": round(r["wall_s"] / ppo, 3) for k, r in rows.items()}))


if __name__ == "__main__":
    main()
