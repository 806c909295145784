"""The KL-penalty section of a study report: its numbers against direct computations, its sentences
against their numbers' signs, the study file against the table, and one tiny study end to end."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from scipy import stats

from rlhf_sweep.maths import gao, kl
from rlhf_sweep.reporting import kl_penalties, plots
from rlhf_sweep.run import layout
from rlhf_sweep.study.spec import load_spec

from .test_report import check_png
from .test_sweep import env, sweep_cmd

BETAS = (0.01, 0.1, 1.0)
SEEDS = (0, 1, 2)
GOLD_REF = 0.8


def frontier(d: np.ndarray) -> np.ndarray:
    """A hump in d = sqrt(KL): Gao et al.'s RL form with a = 0.3, b = 0.2."""
    return d * (0.3 - 0.2 * np.log(np.where(d > 0, d, 1.0)))


def synthetic(rng: np.random.Generator) -> pd.DataFrame:
    """reward_k1 at KL 8/beta^0.5 x noise; loss_k3 at 2x that KL, on the same frontier; loss_k1 on a frontier 0.2 lower;
    both_exact at the same KL as reward_k1."""
    rows = []
    for b in BETAS:
        for s in SEEDS:
            base = 0.8 / math.sqrt(b) * math.exp(rng.normal(0, 0.1))
            for name, factor, shift in (("reward_k1", 1.0, 0.0), ("loss_k3", 2.0 * math.exp(rng.normal(0, 0.1)), 0.0),
                                        ("loss_k1", 1.5 * math.exp(rng.normal(0, 0.1)), -0.2), ("both_exact", math.exp(rng.normal(0, 0.1)), 0.0)):
                k = base * factor
                gold = GOLD_REF + frontier(np.sqrt(k)) + shift + rng.normal(0, 0.01)
                pen = next(p for p in kl.PENALTIES.values() if p.name == name)
                rows.append({"trial": 0, "penalty": name, "gradient": pen.gradient, "beta": b, "seed": s, "kl": k, "gold": gold})
    return pd.DataFrame(rows)


def test_ratios_and_frontier_offsets_match_direct_computations():
    pts = synthetic(np.random.default_rng(0))
    a = kl_penalties.analyse(pts, GOLD_REF)
    assert a.reference == "reward_k1"
    ref = pts[pts.penalty == "reward_k1"].set_index(["beta", "seed"])["kl"]
    own = pts[pts.penalty == "loss_k3"].set_index(["beta", "seed"])["kl"]
    ratios = (own / ref).to_numpy()
    c = a.comparisons["loss_k3"]
    assert c.kl_ratio == pytest.approx(stats.gmean(ratios))
    t = stats.t.interval(0.95, len(ratios) - 1, loc=np.log(ratios).mean(), scale=stats.sem(np.log(ratios)))
    assert c.kl_ratio_ci == pytest.approx(tuple(np.exp(t)))
    assert c.n_pairs == 9 and 1.7 < c.kl_ratio < 2.3 and c.kl_ratio_ci[0] > 1
    assert c.ratio_by_beta[0.1] == pytest.approx(own.loc[0.1].mean() / ref.loc[0.1].mean())
    # the gold offset: mean residual from reward_k1's own RL fit, over loss_k1's points inside reward_k1's KL range
    r = pts[pts.penalty == "reward_k1"]
    fit = gao.fit_rl(np.sqrt(r.kl), r.gold - GOLD_REF)
    o = pts[pts.penalty == "loss_k1"]
    d = np.sqrt(o.kl.to_numpy())
    inside = (d >= np.sqrt(r.kl).min()) & (d <= np.sqrt(r.kl).max())
    off = a.comparisons["loss_k1"]
    assert off.n_inside == int(inside.sum()) and off.n_outside == int((~inside).sum()) and off.n_inside >= 3
    assert off.gold_offset == pytest.approx(float(np.mean(o.gold.to_numpy()[inside] - GOLD_REF - fit.predict(d[inside]))))
    assert off.gold_offset_ci[1] < 0
    assert a.comparisons["both_exact"].kl_ratio_ci[0] < 1 < a.comparisons["both_exact"].kl_ratio_ci[1]


def test_sentences_follow_the_numbers():
    a = kl_penalties.analyse(synthetic(np.random.default_rng(1)), GOLD_REF)
    lines = "\n".join(kl_penalties.section(a, "kl_placement.png", 5, 6))
    line = {n: next(x for x in lines.splitlines() if x.startswith(f"- **{kl_penalties.label(n)}**")) for n in ("loss_k3", "loss_k1", "both_exact")}
    assert "lets through more KL" in line["loss_k3"] and "same frontier" in line["loss_k3"]
    assert "frontier lies below" in line["loss_k1"] and "lets through more KL" in line["loss_k1"]
    assert "as much KL as these seeds can tell" in line["both_exact"]
    assert "1 lie off its frontier: loss+k1 (below)" in lines
    assert "- **reward+k1**" not in lines  # the reference is not compared with itself
    # the flipped case: less KL and a frontier above
    c = kl_penalties.Comparison("loss_k2", "partial", "x", gao.GaoFit("rl", 1, 1, 1, 3), kl_ratio=0.5, kl_ratio_ci=(0.4, 0.6),
                            n_pairs=9, gold_offset=0.1, gold_offset_ci=(0.05, 0.15), n_inside=9)
    assert kl_penalties.kl_sentence(c, "reward_k1").startswith("lets through less KL: 0.50x")
    assert kl_penalties.frontier_sentence(c, "reward_k1").startswith("its frontier lies above: mean gold +0.100")


def test_figure_is_drawn(tmp_path):
    a = kl_penalties.analyse(synthetic(np.random.default_rng(2)), GOLD_REF)
    path = plots.kl_placement(a.table, a.points, {n: c.fit for n, c in a.comparisons.items()},
                              {n: kl_penalties.label(n) for n in a.comparisons}, GOLD_REF, tmp_path / "kl.png", title="t")
    check_png(Path(path), min_w=1000)


def test_points_read_each_trials_penalty_beta_and_seeds(tmp_path):
    """Penalty and beta from the config the trial's own summary.json records (its first seed with one), per-seed
    values from the trial; a trial without any summary is left out with a note naming it."""
    spec = load_spec("kl_placement")
    study = optuna.create_study(directions=["maximize", "minimize"])
    dists = {"kl_penalty": optuna.distributions.CategoricalDistribution(spec.space[0].choices),
             "ppo.beta": optuna.distributions.FloatDistribution(0.01, 1.0, log=True)}
    run_dir = tmp_path / "t0000"
    seed_dir = layout.seed_dir(run_dir, spec.seeds[1])  # the first seed's files are gone: the next one says it
    seed_dir.mkdir(parents=True)
    layout.write_summary(seed_dir, {"config": {"ppo": {"kl_estimator": "k3", "kl_in": "loss", "beta": 0.1}}})
    per_seed = {"0": {"gold/policy": 0.4, "kl/exact": 2.0}, "1": {"gold/policy": 0.6, "kl/exact": 4.0},
                "2": {"gold/policy": None, "kl/exact": 5.0}}
    for params, where in (({"kl_penalty": "loss_k3", "ppo.beta": 0.1}, run_dir), ({"kl_penalty": "loss_k1", "ppo.beta": 1.0}, tmp_path / "gone")):
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=[0.5, 3.0],
                                                  user_attrs={"per_seed": per_seed, "run_dir": str(where)}))
    pts, notes = kl_penalties.points(spec, study)
    assert pts[["trial", "penalty", "gradient", "beta"]].drop_duplicates().values.tolist() == [[0, "loss_k3", "biased", 0.1]]
    assert pts["seed"].tolist() == [0, 1] and pts["kl"].tolist() == [2.0, 4.0]  # a seed without gold is left out
    assert len(notes) == 1 and notes[0].startswith("KL penalties: trial 1 left out") and str(tmp_path / "gone") in notes[0]


def test_the_study_file_is_the_whole_table_on_a_full_grid():
    spec = load_spec("kl_placement")
    choices = next(p for p in spec.space if p.name == "kl_penalty").choices
    assert sorted(choices) == sorted(p.name for p in kl.PENALTIES.values())
    betas = next(p for p in spec.space if p.name == "ppo.beta").grid
    assert min(betas) <= 0.01 and max(betas) >= 1.0 and len(betas) >= 4 and len(spec.seeds) >= 3
    assert spec.sampler == "grid" and spec.n_trials == len(choices) * len(betas)
    assert kl_penalties.searched(spec)


@pytest.mark.e2e
def test_a_tiny_kl_study_gets_its_report_section(tmp_path_factory):
    """Two penalties x two betas x two seeds on a tiny world: the sweep's report has the section and the figure."""
    from .conftest import TINY

    tmp, cwd = tmp_path_factory.mktemp("kl-study"), tmp_path_factory.mktemp("kl-study-cwd")
    fixed = dict(x.split("=", 1) for x in TINY if not x.startswith("progress"))
    (tmp / "tiny_kl.yaml").write_text(yaml.safe_dump({
        "objectives": {"gold/policy": "maximize", "kl/exact": "minimize"},
        "space": {"kl_penalty": ["reward_k1", "loss_k3"], "ppo.beta": {"type": "float", "grid": [0.1, 1.0], "log": True}},
        "fixed": fixed, "seeds": 2, "n_trials": 4, "sampler": "grid"}))
    r = subprocess.run(sweep_cmd(str(tmp / "tiny_kl.yaml"), tmp, "--workers", "1"), cwd=cwd, env=env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the biased penalty warns once per run (2 betas x 2 seeds), the default never
    assert r.stdout.count("warning: ppo.kl_in=loss with ppo.kl_estimator=k3 has a biased KL gradient") == 4
    md = (tmp / "out" / "report.md").read_text()
    assert "## 5. KL penalties" in md and "](kl_placement.png)" in md
    assert "- **loss+k3** (biased; minimizes the forward KL(ref || pi) per token" in md
    check_png(tmp / "out" / "kl_placement.png", min_w=1000)
    rows = [ln for ln in md.splitlines() if ln.startswith("| loss+k3 | biased |")]
    assert [r.split("|")[3].strip() for r in rows[:2]] == ["0.100", "1.000"]  # the KL table: one row per beta
    assert len(rows) == 3  # and one in the frontier table
