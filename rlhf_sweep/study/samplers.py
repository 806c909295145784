"""The Optuna sampler a study file names (`sampler`, `sampler_options`) and each worker's sampler seed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import optuna

if TYPE_CHECKING:
    from rlhf_sweep.study.spec import StudySpec


def make_sampler(spec: StudySpec, seed: int):
    if spec.trials:  # every trial is planned and enqueued: Optuna hands back their values, nothing is sampled
        return optuna.samplers.RandomSampler(seed=seed)
    opts = dict(spec.sampler_options)
    if spec.sampler == "tpe":
        # constant_liar: a running trial counts as a bad result, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, **{"constant_liar": True, **opts})
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **opts)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed, **opts)
    if spec.sampler == "gp":
        # log EHVI for several objectives; it reads constraints from trial.set_constraint, and
        # other workers' running trials enter its acquisition as pending points
        return optuna.samplers.GPSampler(seed=seed, **opts)
    # grid ids index a grid shuffled by the seed: every worker must use the same seed
    return _GridSampler({p.name: p.grid_values() for p in spec.space}, seed=spec.sampler_seed, **opts)


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler without its after_trial `study.stop()`, which is only legal inside
    `study.optimize`; the sweep stops by counting trials instead."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def worker_seed(spec: StudySpec, index: int, n_existing: int) -> int:
    """A sampler seed per (study seed, worker, resume point): parallel workers and a resumed
    study must not replay the same random start-up suggestions."""
    if spec.sampler == "grid":
        return spec.sampler_seed
    return int(np.random.SeedSequence([spec.sampler_seed, index, n_existing]).generate_state(1)[0])
