"""Beyond one world: the analyses of world, phase and RM-scaling studies (rlhf_sweep.reporting: world_runs,
drawn_worlds, labeler_phases, world_studies; their statistics in rlhf_sweep.maths.stats) against values computed
another way, reward models of their own size (keys, backbones, parameters, caching across studies), and the three
study kinds end to end on tiny configs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import Config, config_hash, rm_model, to_dict
from rlhf_sweep.maths import gao, stats
from rlhf_sweep.models.lm import build_lm
from rlhf_sweep.models.reward import RewardModel
from rlhf_sweep.reporting import drawn_worlds, labeler_phases, rm_scaling, world_runs, world_studies
from rlhf_sweep.reporting.report import trial_frame
from rlhf_sweep.reporting.study_data import spec_of
from rlhf_sweep.run import pipeline
from rlhf_sweep.simulation.world import PROMPT_LEN, World
from rlhf_sweep.study.storage import load_study

from .conftest import TINY


# ----- statistics against another computation ---------------------------------------------------------
def test_share_ci_is_clopper_pearson():
    from scipy.stats import beta

    s, lo, hi = stats.share_ci(3, 10)
    assert s == 0.3
    assert lo == pytest.approx(beta.ppf(0.025, 3, 8)) and hi == pytest.approx(beta.ppf(0.975, 4, 7))
    # closed forms at the ends: k = 0 -> [0, 1 - (alpha/2)^(1/n)], k = n -> [(alpha/2)^(1/n), 1]
    assert stats.share_ci(0, 20)[1:] == pytest.approx((0.0, 1 - 0.025 ** (1 / 20)))
    assert stats.share_ci(20, 20)[1:] == pytest.approx((0.025 ** (1 / 20), 1.0))


def test_correlations_match_numpy_fisher_z_and_bh_by_hand():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    n = 30
    x = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "c": rng.normal(size=n), "flat": np.ones(n)})
    y = pd.Series(2 * x["a"] + rng.normal(size=n))
    df = stats.correlations(x, y).set_index("param")
    assert "flat" not in df.index  # a constant parameter has no correlation
    r = np.corrcoef(x["a"], y)[0, 1]
    assert df.loc["a", "r"] == pytest.approx(r)
    z, half = math.atanh(r), norm.ppf(0.975) / math.sqrt(n - 3)
    assert (df.loc["a", "lo"], df.loc["a", "hi"]) == pytest.approx((math.tanh(z - half), math.tanh(z + half)))
    p = df["p"].sort_values()
    m = len(p)
    bh = np.minimum.accumulate((p.to_numpy() * m / np.arange(1, m + 1))[::-1])[::-1].clip(max=1)
    assert df.loc[p.index, "q"].to_numpy() == pytest.approx(bh)


def test_trend_matches_polyfit_and_ranks():
    x = np.array([1e3, 3e3, 1e4, 3e4, 1e5])
    y = np.array([0.1, 0.3, 0.2, 0.6, 0.7])
    t = stats.trend(x, y)
    slope = np.polyfit(np.log10(x), y, 1)[0]
    ranks = np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1]
    assert t["slope"] == pytest.approx(slope) and t["rho"] == pytest.approx(ranks) and t["lo"] < slope < t["hi"]
    assert math.isnan(stats.trend(x, np.ones(5))["rho"])


def test_robustness_counts_worlds_and_runs():
    runs = pd.DataFrame({"world.draw": [0, 0, 1, 1, 2, 2], "seed": [0, 1] * 3,
                         "rm_prefers_policy": [True, True, True, False, False, False],
                         "humans_prefer_reference": [True] * 6, "kl_increasing": [False] * 6, "all_three": [False] * 6})
    s = drawn_worlds.robustness(runs).set_index(["key", "level"])
    assert (s.loc[("rm_prefers_policy", "every seed"), "k"], s.loc[("rm_prefers_policy", "at least one seed"), "k"]) == (1, 2)
    assert s.loc[("rm_prefers_policy", "runs"), "share"] == pytest.approx(0.5)
    assert s.loc[("humans_prefer_reference", "every seed"), ["share", "lo", "hi"]].tolist() == pytest.approx([1.0, 0.025 ** (1 / 3), 1.0])
    assert s.loc[("kl_increasing", "runs"), "share"] == 0


def test_phase_indicators_and_boundary():
    m = {"len/policy": 5.0, "len/ref": 3.9, "gold/policy_hi": 0.5, "gold/ref_lo": 0.6}
    assert world_runs.phase_indicators(m) == {"verbosity_drift": True, "gold_collapse": True}
    assert world_runs.phase_indicators({**m, "len/policy": 4.8, "gold/policy_hi": 0.7}) == {"verbosity_drift": False, "gold_collapse": False}
    cells = pd.DataFrame({"b": [0, 0.1, 0.2, 0.4] * 2, "ppo.beta": [0.03] * 4 + [0.3] * 4,
                          "x": [0, 1, 0.33, 1] + [0, 0, 0, 0.34]})
    # holds (majority of seeds) at 0.1, fails at 0.2, holds from 0.4 on: the boundary is between 0.2 and 0.4
    assert labeler_phases.boundary(cells, "b", "x", 0.03) == (0.2, 0.4)
    assert labeler_phases.boundary(cells, "b", "x", 0.3) == (0.4, None)
    cells["y"] = 1.0
    assert labeler_phases.boundary(cells, "b", "y", 0.3) == (None, 0.0)


def test_cache_audit_counts_builds_and_flags_a_second_build():
    runs = pd.DataFrame({"rm_path": ["a", "a", "b", "b", None], "rm_cached": [False, True, False, True, None],
                         "sft_path": ["s"] * 5, "sft_cached": [False] + [True] * 4})
    a = world_studies.cache_audit(runs)
    assert a["rm"] == {"files": 2, "runs": 4, "built": 2, "built_twice": []}
    assert a["sft"] == {"files": 1, "runs": 5, "built": 1, "built_twice": []}
    runs.loc[1, "rm_cached"] = False  # a second build of 'a': caching failed
    assert world_studies.cache_audit(runs)["rm"]["built_twice"] == ["a"]


def rm_params_by_hand(n_layer: int, d: int) -> int:
    """GPT-2 parameters of an RM in the default world, counted by hand: embeddings (vocabulary V, positions P), per
    layer 12 d^2 + 13 d, the final norm, the scalar head."""
    V, P = 4 + 3 * 8 + 8 + 8, 5 + 24
    return V * d + P * d + n_layer * (12 * d * d + 13 * d) + 2 * d + d + 1


def test_rm_params_by_hand():
    """The count the pipeline records (`n_params` of the RM as `get_rm_member` builds it) against the hand count;
    the e2e test below checks the one a run writes into its summary."""
    cfg = compose(["rm.n_layer=1", "rm.n_embd=32"])
    arch = rm_model(cfg)
    rm = RewardModel(build_lm(arch, World(cfg.world).vocab.size, PROMPT_LEN + cfg.world.max_new_tokens), arch.n_embd)
    assert pipeline.n_params(rm) == rm_params_by_hand(1, 32)


def test_rm_scaling_prints_and_trends_only_identified_peaks():
    """rm_scaling.peak_columns keeps a fitted peak's numbers only where gao identifies it inside the reached KL (NaN
    otherwise, so trends and figures skip it); the table row prints the status words and no number instead."""
    exact = {"se_a": 0.0, "se_b": 0.0, "cov_ab": 0.0}
    inside = rm_scaling.peak_columns(gao.GaoFit("bon", 1.0, 0.25, 0.95, 20, **exact).peak(3.0))
    assert inside[:3] == (pytest.approx(1.0), pytest.approx(4.0), gao.INSIDE) and inside[3].startswith("4 [")
    low = rm_scaling.peak_columns(gao.GaoFit("rl", 0.2, 0.002, 0.19, 200, **exact).peak(1.2))  # below the R² floor
    assert math.isnan(low[0]) and math.isnan(low[1]) and low[2:] == (gao.NOT_IDENTIFIED, gao.NOT_IDENTIFIED)
    far = rm_scaling.peak_columns(gao.GaoFit("rl", 0.2, 0.00025, 0.9, 200, **exact).peak(1.2))  # exp(799): no OverflowError
    assert math.isnan(far[1]) and far[2] == gao.BEYOND
    row = {"size": "1 x 32", "params": 1000.0, "n_pairs": 64, "acc_labels": 0.6, "acc_gold": 0.6, "rl_a": 0.2, "rl_b": 0.002,
           "rl_r2": 0.19, "rl_peak_gain": low[0], "rl_peak_kl": low[1], "rl_peak_status": low[2], "rl_peak_text": low[3],
           "emp_peak_gain": 0.01, "emp_peak_kl": 0.5, "bon_a": 1.0, "bon_b": 0.25, "bon_r2": 0.95, "bon_peak_gain": inside[0],
           "bon_peak_kl": inside[1], "bon_peak_status": inside[2], "bon_peak_text": inside[3]}
    cells = rm_scaling.scaling_rows(pd.DataFrame([row]))[0]
    assert cells[8:10] == ["", gao.NOT_IDENTIFIED] and cells[15] == pytest.approx(1.0) and cells[16] == inside[3]
    assert rm_scaling.identified_sentence(pd.DataFrame([row])) == (
        "Fitted peaks identified inside the reached KL: RL 0 of 1, best-of-n 1 of 1 (the others print their status "
        "instead of a number).")


# ----- reward models of their own size ----------------------------------------------------------------
def test_default_cache_keys_are_those_of_before():
    """Keys computed the way they were before world.draw and rm.n_layer/n_embd existed: unchanged for the defaults."""
    cpu = torch.device("cpu")
    c = compose(["threads=1"])
    w = to_dict(Config().world)
    w.pop("draw")
    sft_w = {k: v for k, v in w.items() if k not in ("gold", "labeler")}
    old_sft = "sft-" + config_hash(pipeline.CACHE_VERSION, sft_w, c.model, c.sft, c.seed, "cpu", 1)
    assert pipeline.sft_key(c, cpu) == old_sft
    r = {k: v for k, v in to_dict(c.rm).items() if k not in (*pipeline.ENSEMBLE_KEYS, "n_layer", "n_embd")}
    assert pipeline.rm_key(c, cpu) == "rm-" + config_hash(old_sft, w, r, c.seed)
    # the policy's size named explicitly is the same RM; another size is another one
    assert pipeline.rm_key(compose(["threads=1", "rm.n_layer=2", "rm.n_embd=64"]), cpu) == pipeline.rm_key(c, cpu)
    assert pipeline.rm_key(compose(["threads=1", "rm.n_layer=1"]), cpu) != pipeline.rm_key(c, cpu)


def test_rm_size_validation():
    from rlhf_sweep.config.schema import ConfigError

    for bad in ("rm.n_layer=0", "rm.n_embd=30"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            compose([bad])


@pytest.mark.e2e
def test_rms_of_one_size_data_and_world_train_once_across_studies(tmp_path):
    """Must show 4: two 'studies' (different PPO knobs, different run directories) over the same RM size, data and
    world train that RM and its backbone once; the policy's own size, named, reuses the default RM."""
    base = [*TINY, "threads=1", "mlflow.enabled=false", f"cache_dir={tmp_path / 'cache'}"]
    small = ["rm.n_layer=1", "rm.n_embd=32"]
    say = lambda *_: None  # noqa: E731
    first = pipeline.run(compose([*base, *small, "ppo.beta=0.1", f"run_dir={tmp_path / 'study-a'}"]), say)
    rm_file = Path(first["cache"]["rm"]["path"])
    mtime = rm_file.stat().st_mtime_ns
    second = pipeline.run(compose([*base, *small, "ppo.beta=0.5", "ppo.clip_eps=0.1", f"run_dir={tmp_path / 'study-b'}"]), say)
    assert (first["cache"]["rm"]["cached"], second["cache"]["rm"]["cached"]) == (False, True)
    # the RM's parameters as the run records them, for the RM-scaling report (one RM, tied weights once)
    assert first["models"]["rm_params"] == second["models"]["rm_params"] == rm_params_by_hand(1, 32)
    assert second["cache"]["rm"]["path"] == str(rm_file) and rm_file.stat().st_mtime_ns == mtime
    bb = first["cache"]["rm"]["backbone"]
    assert bb["cached"] is False and bb["path"] != first["cache"]["sft"]["path"]
    # the RM really has its size, and its backbone is not the policy's reference
    state = torch.load(rm_file, weights_only=True)["state"]
    assert state["head.weight"].shape == (1, 32) and not any(".h.1." in k for k in state)
    default = pipeline.run(compose([*base, f"run_dir={tmp_path / 'default'}"]), say)
    named = pipeline.run(compose([*base, "rm.n_layer=2", "rm.n_embd=64", f"run_dir={tmp_path / 'named'}"]), say)
    assert named["cache"]["rm"]["cached"] and named["cache"]["rm"]["path"] == default["cache"]["rm"]["path"]
    runs = pd.DataFrame([world_runs.run_row(s) for s in (first, second, default, named)])
    assert runs["rm.params"].tolist() == [rm_params_by_hand(1, 32)] * 2 + [rm_params_by_hand(2, 64)] * 2
    audit = world_studies.cache_audit(runs)
    assert audit["rm"]["files"] == 2 and audit["rm"]["built"] == 2 and not audit["rm"]["built_twice"]
    assert audit["backbone"]["files"] == 1 and audit["backbone"]["built"] == 1


# ----- the three study kinds end to end --------------------------------------------------------------
def tiny_study(path: Path, space: dict, n_trials: int, fixed: dict | None = None, seeds: int = 1) -> Path:
    import yaml

    tiny = {k: yaml.safe_load(v) for k, v in (o.split("=") for o in TINY if not o.startswith("progress"))}
    spec = {"description": "tiny", "objectives": {"gold/policy": "maximize", "kl/exact": "minimize"}, "space": space,
            "fixed": {k: v for k, v in {**tiny, "mlflow.enabled": False, **(fixed or {})}.items() if k not in space}, "seeds": seeds, "n_trials": n_trials, "sampler": "grid"}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.e2e
def test_world_phase_and_rm_scaling_reports(tmp_path, monkeypatch):
    from rlhf_sweep.reporting import report
    from rlhf_sweep.study import sweep

    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    studies = {
        "worlds": (tiny_study(tmp_path / "w.yaml", {"world.draw": {"type": "int", "grid": [0, 1, 2, 3, 4]}}, 4),
                   "## Robustness over drawn worlds", ["world_robustness.png"]),
        "phase": (tiny_study(tmp_path / "p.yaml", {"world.labeler.length_bias": {"type": "float", "grid": [0.0, 0.8]},
                                                   "ppo.beta": {"type": "float", "grid": [0.01, 0.3]}}, 4,
                             {"world.labeler.filler_bias": 0.0}), "## Phase diagram", ["phase.png"]),
        "rm": (tiny_study(tmp_path / "r.yaml", {"rm.n_layer": {"type": "int", "grid": [1, 2]},
                                                "rm.n_pairs": {"type": "int", "grid": [64, 256]}}, 4, {"ppo.beta": 0.01}),
               "## Reward-model scaling", ["rm_scaling_curves.png", "rm_scaling_data.png", "rm_scaling_params.png"]),
    }
    for name, (path, heading, pngs) in studies.items():
        res = sweep.sweep(str(path), workers=1, name=name, out=str(tmp_path / name), progress=False,
                          tracking_uri=None)
        assert res.n_complete == 4
        md = Path(report.report(name, storage=str(tmp_path / name / "optuna.journal"), out=str(tmp_path / name), say=lambda *_: None)).read_text()
        assert heading in md and "## Cache audit" in md and "## World analyses\n\nnot computed" not in md, md[-3000:]
        for png in pngs:
            assert (tmp_path / name / png).stat().st_size > 10_000 and f"]({png})" in md
        audit = md[md.index("## Cache audit"):].splitlines()
        rows = [line for line in audit if line.startswith(("| SFT references", "| RM backbones", "| reward models"))]
        assert rows and all(line.endswith("| none |") for line in rows), rows
    md = (tmp_path / "worlds" / "report.md").read_text()
    assert "4 drawn worlds" in md
    runs, _, _ = world_runs.load_runs(*_spec_trials("worlds", tmp_path))
    assert sorted(runs["world.draw"]) == sorted(set(runs["world.draw"])) and len(runs) == 4
    # every run of the three studies: no artefact built twice
    every = world_studies.all_study_runs(tmp_path)
    assert len(every) == 12 and all(not a["built_twice"] for a in world_studies.cache_audit(every).values())
    md = (tmp_path / "rm" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 1 x 64 | "))
    assert "n/a" not in row.split("|")[13]  # a best-of-n fit per RM (its a)
    # each RM's best-of-n is the trial's, run by the worker; the report only reads it, and `sweep` again fills a gap
    bon = sorted((tmp_path / "rm" / "trials").glob("t*/baseline/seed-0/summary.json"))
    assert len(bon) == 4 and not list((tmp_path / "worlds" / "trials").glob("t*/baseline"))
    shutil.rmtree(bon[0].parent)
    rm_rows = lambda md: [line for line in md.splitlines() if re.match(r"^\| \d+ x \d+ \| ", line)]  # noqa: E731
    before = len(rm_rows(md))
    report.report("rm", storage=str(tmp_path / "rm" / "optuna.journal"), out=str(tmp_path / "rm"), say=lambda *_: None)
    assert not bon[0].exists()
    # that RM keeps its row (its PPO fit) with its best-of-n columns n/a
    rows = rm_rows((tmp_path / "rm" / "report.md").read_text())
    assert len(rows) == before and sum(r.split("|")[13].strip() == "n/a" for r in rows) == 1
    sweep.sweep(str(studies["rm"][0]), workers=1, name="rm", out=str(tmp_path / "rm"), progress=False, tracking_uri=None)
    assert bon[0].is_file()


def _spec_trials(name: str, root: Path):
    ostudy, _, _, _ = load_study(name, str(root / name / "optuna.journal"), str(root / name))
    spec = spec_of(ostudy, name)
    return spec, trial_frame(spec, ostudy)


def test_run_row_reads_a_summary(tmp_path):
    """run_row on a summary as pipeline.run writes it (a hand-made one: the fields it reads)."""
    c = dataclasses.asdict(compose(["world.draw=3"]))
    m = {"len/policy": 6.0, "len/ref": 4.0, "gold/policy": 0.1, "gold/ref": 0.8, "gold/policy_hi": 0.2, "gold/ref_lo": 0.7}
    obs = {k: {"value": v} for k, v in (("rm_prefers_policy", True), ("humans_prefer_reference", True), ("kl_increasing", False))}
    s = {"config": c, "metrics": m, "observations": obs, "cache": {"rm": {"path": "x.pt", "cached": True}}}
    row = world_runs.run_row(json.loads(json.dumps(s)))
    assert row["world.draw"] == 3 and row["world.labeler.tau"] == c["world"]["labeler"]["tau"]
    assert (row["rm.n_layer"], row["rm.n_embd"]) == (2, 64)  # null: the policy's size
    assert (row["all_three"], row["verbosity_drift"], row["gold_collapse"], row["d_len"]) == (False, True, True, 2.0)
    assert (row["rm_path"], row["rm_cached"], row["backbone_path"]) == ("x.pt", True, None)
    diag = {"reward_model": {"rm_gain": 1.2, "share_of_rm_gain_from_length": 0.7}}
    assert world_runs.run_row({**s, "diagnosis": diag})["length_share"] == 0.7
    diag["reward_model"]["rm_gain"] = 0.1  # too small a gain for its share to mean anything
    assert math.isnan(world_runs.run_row({**s, "diagnosis": diag})["length_share"])


def test_cluster_interval_resamples_worlds():
    """Two worlds of opposite verdicts: the run share is 0.5, and resampling whole worlds spans 0 to 1; when every
    world agrees, the interval is the exact one over worlds, not a point."""
    assert stats.cluster_mean_ci([np.array([1.0, 1.0]), np.array([0.0, 0.0])]) == pytest.approx((0.5, 0.0, 1.0))
    share, lo, hi = stats.cluster_mean_ci([np.ones(2)] * 20)
    assert (share, lo, hi) == pytest.approx((1.0, 0.025 ** (1 / 20), 1.0))


@pytest.mark.e2e
def test_a_failed_trial_best_of_n_keeps_the_trial_and_is_run_again(tmp_path, monkeypatch):
    """An RM trial's best-of-n that raises in the worker leaves the trial COMPLETE with one warning; the end of the
    same sweep runs it again."""
    from rlhf_sweep.study import baselines, sweep

    monkeypatch.chdir(tmp_path)
    real, calls = baselines.run_baseline, []

    def flaky(spec, *args, **kwargs):
        calls.append(spec.fixed.get("rm.n_layer"))
        if len(calls) == 1:
            raise OSError("disk full")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(baselines, "run_baseline", flaky)
    said = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: said.append(" ".join(map(str, a))))
    path = tiny_study(tmp_path / "r.yaml", {"rm.n_layer": {"type": "int", "grid": [1]}}, 1)
    res = sweep.sweep(str(path), workers=1, name="r", out=str(tmp_path / "r"), progress=False, tracking_uri=None)
    assert res.n_complete == 1 and res.n_failed == 0
    assert any("trial 0's best-of-n failed (OSError: disk full)" in line for line in said), said
    assert (tmp_path / "r" / "trials" / "t0000" / "baseline" / "seed-0" / "summary.json").is_file()
    assert calls[0] == 1 and calls.count(1) == 2  # the trial's try, then the sweep's end
