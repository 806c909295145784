"""Does `rm.center_coef` change the reward PPO sees? Two reward models that differ only in it, then PPO on each.

Reward centering (`center_coef * mean((r_chosen + r_rejected)^2)`) pulls the RM's raw scores toward 0.
The pipeline then standardises every RM on reference samples (reward.calibrate: minus the mean, over
the std), which removes any offset and scale the centering term set. What is left is whatever the term
changed in the *shape* of the learned reward. This script measures that on one seed:

- the raw scores' mean and std on reference samples, with and without centering (what centering does);
- the standardised scores PPO is trained on: their correlation between the two RMs and the mean
  absolute difference (what is left after calibration), on fresh reference samples;
- the held-out metrics of a default PPO run on each RM.

Usage: python bench/center_coef.py [--seed 0] [--coef 0.01] [extra overrides...]; prints tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from rlhf_sweep.config.compose import compose
from rlhf_sweep.models.reward import collect_pairs, score
from rlhf_sweep.run import pipeline
from rlhf_sweep.simulation.world import World

METRICS = ("rm/policy", "gold/policy", "gold/win_rate", "len/policy", "kl/exact", "rm/acc_labels", "rm/acc_gold")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coef", type=float, default=0.01)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = ["progress=false", "mlflow.enabled=false", f"seed={a.seed}", f"cache_dir={d}/cache", *a.overrides]
        cfgs = {"center_coef=0": compose([*base, "rm.center_coef=0.0"]), f"center_coef={a.coef:g}": compose([*base, f"rm.center_coef={a.coef}"])}
        device = pipeline.pick_device("cpu")
        first = next(iter(cfgs.values()))
        torch.set_num_threads(pipeline.threads(first))
        world = World(first.world)
        ref, _ = pipeline.get_reference(first, world, device, lambda *_: None)
        rng, gen = np.random.default_rng([a.seed, 99]), torch.Generator().manual_seed(a.seed * 1000 + 99)
        held = collect_pairs(ref, world, 2048, "random", rng, gen, device)  # fresh reference samples, not the RM's pairs
        rms = {k: pipeline.get_reward_model(c, world, ref, device, lambda *_: None)[0] for k, c in cfgs.items()}
        runs = {}
        for k, c in cfgs.items():
            c.run_dir = str(Path(d) / k)
            runs[k] = pipeline.run(c, say=lambda *_: None)
        raw, std = {}, {}
        for k, rm in rms.items():
            with torch.no_grad():
                raw[k] = torch.cat([rm.raw(held.prompts, held.first), rm.raw(held.prompts, held.second)]).numpy()
            std[k] = score(rm, torch.cat([held.prompts, held.prompts]), torch.cat([held.first, held.second]), device).numpy()
        keys = list(cfgs)
        print(f"seed {a.seed}: reward models that differ only in rm.center_coef ({keys[0]} vs {keys[1]})")
        print(f"{'':28s}" + "".join(f"{k:>20s}" for k in keys))
        print(f"{'raw score mean (ref)':28s}" + "".join(f"{raw[k].mean():20.3f}" for k in keys))
        print(f"{'raw score std (ref)':28s}" + "".join(f"{raw[k].std():20.3f}" for k in keys))
        for m in METRICS:
            print(f"{m + ' (PPO run)':28s}" + "".join(f"{runs[k]['metrics'][m]:20.3f}" for k in keys))
        corr = float(np.corrcoef(std[keys[0]], std[keys[1]])[0, 1])
        mad = float(np.abs(std[keys[0]] - std[keys[1]]).mean())
        print(f"standardised scores on {len(std[keys[0]])} held-out reference samples: correlation {corr:.3f}, "
              f"mean |difference| {mad:.3f} std units")
        out = {"seed": a.seed, "coef": a.coef, "raw_mean": {k: float(raw[k].mean()) for k in keys},
               "raw_std": {k: float(raw[k].std()) for k in keys}, "std_score_corr_ref": round(corr, 4), "std_score_mad_ref": round(mad, 4),
               "ppo": {k: {m: runs[k]["metrics"][m] for m in METRICS} for k in keys}}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
