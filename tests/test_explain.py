"""The diagnosis and `explain`: every number in summary.json["diagnosis"] recomputed here from the
raw samples of a small run (samples.pt), the RM's filler curve on a hand-made RM, and explain.md."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import WorldConfig
from rlhf_sweep.evaluation.metrics import rm_filler_curve
from rlhf_sweep.models.lm import response_mask
from rlhf_sweep.reporting import explain
from rlhf_sweep.run import pipeline
from rlhf_sweep.simulation.world import EOS, PAD, World

from .conftest import TINY


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    cfg = compose([*TINY, "ppo.iterations=6", "mlflow.enabled=false", f"cache_dir={d}/cache"])
    cfg.run_dir = str(d / "run")
    summary = pipeline.run(cfg, say=lambda *_: None)
    return d / "run", summary


def test_diagnosis_recomputed_from_raw_samples(small_run):
    run_dir, _ = small_run
    s = json.loads((run_dir / "summary.json").read_text())
    raw = torch.load(run_dir / "samples.pt", weights_only=False)
    P = {k: v.double().numpy() for k, v in raw["P"].items()}
    R = {k: v.double().numpy() for k, v in raw["R"].items()}
    m, diag = s["metrics"], s["diagnosis"]
    # the metrics the diagnosis reads are the raw samples' means
    for key, side, col in (("rm/policy", P, "rm"), ("rm/ref", R, "rm"), ("len/policy", P, "length"), ("len/ref", R, "length"),
                           ("filler/policy", P, "filler"), ("gold/ref", R, "gold")):
        assert m[key] == pytest.approx(side[col].mean(), abs=1e-5), key
    # (a) slopes by least squares rm ~ 1 + gold + length + filler on reference samples, and the share of the gain
    X = np.column_stack([np.ones(len(R["rm"])), R["gold"], R["length"], R["filler"]])
    coef = np.linalg.lstsq(X, R["rm"], rcond=None)[0]
    a = diag["reward_model"]
    assert a["rm_slope_per_token_holding_gold"] == pytest.approx(coef[2], rel=1e-4, abs=1e-6)
    assert a["rm_slope_per_filler_holding_gold"] == pytest.approx(coef[3], rel=1e-4, abs=1e-6)
    d_rm = P["rm"].mean() - R["rm"].mean()
    assert a["share_of_rm_gain_from_length"] == pytest.approx(coef[2] * (P["length"].mean() - R["length"].mean()) / d_rm, rel=1e-3)
    assert a["filler_curve"] == raw["filler_curve"]
    # (b) advantages: per-iteration correlations and filler share from the raw rollout records, averaged
    recs = raw["adv"]
    assert len(recs) == s["config"]["ppo"]["iterations"]
    len_corr = [np.corrcoef(r["seq_adv"].double(), r["length"].double())[0, 1] for r in recs]
    fill_corr = [np.corrcoef(r["seq_adv"].double(), r["filler"].double())[0, 1] if r["filler"].double().std() > 0 else 0.0 for r in recs]
    share = [int(r["pos_filler_tokens"]) / max(int(r["pos_tokens"]), 1) for r in recs]
    b = diag["ppo"]
    assert b["adv_length_corr_mean"] == pytest.approx(np.mean(len_corr), abs=1e-6)
    assert b["adv_filler_corr_mean"] == pytest.approx(np.mean(fill_corr), abs=1e-6)
    assert b["filler_share_of_positive_adv_tokens"] == pytest.approx(np.mean(share), abs=1e-6)
    assert b["clipfrac_mean"] == pytest.approx(np.mean([h["ppo/clipfrac"] for h in s["history"]]))
    # (c) KL: k1's negative share and bias against exact KL from the per-token terms
    kl = raw["kl"]
    mask = kl["mask"].bool()
    c = diag["kl"]
    assert c["k1_negative_token_share"] == pytest.approx((kl["k1"][mask] < 0).double().mean().item())
    assert c["k1_bias_vs_exact"] == pytest.approx((kl["k1"].sum(1) - kl["exact"].sum(1)).double().mean().item(), abs=1e-5)
    assert m["kl/exact"] == pytest.approx(kl["exact"].sum(1).double().mean().item(), abs=1e-5)
    assert c["beta_times_kl"] == pytest.approx(s["config"]["ppo"]["beta"] * m["kl/exact"])
    g = c["growth"]
    assert g["kl_at_start_length"] == pytest.approx(g["last"]["per_token_kl"] * (s["history"][0]["len"] + 1))
    # held out: sequence KL / per-token KL is the mean number of response tokens (incl. EOS) in the raw mask
    assert m["kl/exact"] / m["kl/exact_per_token"] == pytest.approx(kl["mask"].sum(1).double().mean().item(), rel=1e-5)
    # per iteration: the tokens per sequence the diagnosis reports are the content tokens plus an EOS where one came
    for row in c["growth"]["series"]:
        h = s["history"][row["iteration"]]
        assert row["seq_kl"] == h["kl/exact"]
        if h["kl/exact"] > 0:
            assert h["len"] <= row["tokens_per_seq"] <= h["len"] + 1 + 1e-9


class FillerCounter(nn.Module):
    """A hand-made 'RM': the number of filler tokens in the response, so its curve is known exactly."""

    def __init__(self, world):
        super().__init__()
        self.world = world

    def forward(self, prompts, responses):
        return (self.world.vocab.is_filler(responses) & response_mask(responses).bool()).sum(1).float()


def test_rm_filler_curve_on_a_hand_made_rm():
    world = World(WorldConfig(max_new_tokens=8))
    f0, e0 = world.vocab.filler0, world.vocab.explain0
    prompts = world.sample_prompts(3, np.random.default_rng(0))
    responses = torch.tensor([[f0, e0, EOS, PAD, PAD, PAD, PAD, PAD],
                              [e0, EOS, PAD, PAD, PAD, PAD, PAD, PAD],
                              [e0] * 8])  # never ended: left out
    c = rm_filler_curve(FillerCounter(world), world, prompts, responses, torch.device("cpu"), max_extra=10)
    assert c["n"] == 2 and c["k"] == list(range(6))  # room for 5 more tokens after the length-2 answer
    assert c["rm"] == pytest.approx([0.5 + k for k in range(6)])  # one filler token more per k
    assert c["rm_peak_k"] == 5 and c["ref_filler_max"] == 1.0


def test_explain_writes_the_three_parts(small_run):
    run_dir, summary = small_run
    path = explain.explain(run_dir)
    text = path.read_text()
    for head in ("## (a) The reward model", "## (b) PPO", "## (c) The KL term"):
        assert head in text
    d = summary["diagnosis"]
    assert f"{d['reward_model']['rm_slope_per_token_holding_gold']:.3f} std units per token" in text
    assert f"{d['ppo']['adv_length_corr_mean']:.2f}" in text and f"{d['kl']['k1_negative_token_share']:.0%}" in text


def test_cli_explain_missing_run_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rlhf_sweep", "explain", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "summary.json" in lines[0]


# ----- every sentence follows the sign and size of its own number -----------------------------------
def _synthetic(slope=0.4, share=1.2, rm_gain=1.8, adv_len=0.3, adv_fill=0.2, pos_fill=0.4, ref_fill=0.15, clip=0.05,
               kl_from=1.0, kl_to=15.0, len_from=4.0, len_to=7.0, beta_kl=0.45, k1_bias=-0.4, k1_neg=0.13, increasing=True):
    n = 20
    hist = []
    for i in range(n):
        f = i / (n - 1)
        length = len_from + (len_to - len_from) * f
        seq = kl_from + (kl_to - kl_from) * f if i else 0.0
        hist.append({"iteration": i, "kl/exact": seq, "kl/exact_per_token": seq / (length + 1), "len": length,
                     "kl/penalty": seq, "ppo/beta": 0.03})
    return {
        "config": {"eval": {"n_prompts": 512}, "ppo": {"iterations": n, "beta": 0.03, "kl_estimator": "k1", "kl_in": "reward",
                                                       "batch_size": 64}, "seed": 0},
        "metrics": {"kl/exact": kl_to},
        "observations": {"kl_increasing": {"value": increasing}},
        "history": hist,
        "diagnosis": {
            "reward_model": {"rm_slope_per_token_holding_gold": slope, "rm_slope_per_filler_holding_gold": 0.1, "rm_slope_per_gold": 1.0,
                             "fit_r2_on_reference": 0.5, "rm_gain": rm_gain, "gold_gain": -0.6, "length_gain": len_to - len_from,
                             "filler_gain": 1.3, "share_of_rm_gain_from_length": share, "share_of_rm_gain_from_filler": 0.1,
                             "share_of_rm_gain_from_gold": -0.3},
            "ppo": {"adv_length_corr_mean": adv_len, "adv_filler_corr_mean": adv_fill, "filler_share_of_positive_adv_tokens": pos_fill,
                    "filler_share_of_tokens_ref": ref_fill, "clipfrac_mean": clip, "clipfrac_last": clip},
            "kl": {"beta_times_kl": beta_kl, "rm_gain": rm_gain, "beta_final": 0.03, "k1_negative_token_share": k1_neg,
                   "k1_bias_vs_exact": k1_bias, "k1_seq_std": 3.0, "exact_seq_std": 2.0},
        },
    }


def _text(s):
    return "\n".join(explain.part_reward_model(s, None) + explain.part_ppo(s) + explain.part_kl(s))


def test_the_puzzle_reads_as_the_puzzle():
    t = _text(_synthetic())
    for phrase in ("scores the longer one higher", "Length alone accounts for more than the whole gain", "longer, politer samples get positive advantages",
                   "Filler is over-represented", "every extra token adds to the sequence KL", "and the KL keeps growing",
                   "on average it under-charges", "0.400 nats below the exact KL", "3.00 more tokens"):
        assert phrase in t, phrase


def test_reversed_numbers_give_reversed_sentences():
    t = _text(_synthetic(slope=-0.3, share=-0.4, adv_len=-0.3, adv_fill=-0.2, pos_fill=0.05, kl_from=15.0, kl_to=3.0, len_from=7.0,
                         len_to=4.0, beta_kl=3.0, k1_bias=0.4, increasing=False))
    for phrase in ("scores the shorter one higher", "Length works against the RM gain", "shorter, plainer samples get the positive advantages",
                   "Filler is under-represented", "The sequence KL did not grow", "The policy is not longer than at the start",
                   "The penalty charges at least as much as the RM pays", "on average it over-charges", "0.400 nats above the exact KL",
                   "3.00 fewer tokens"):
        assert phrase in t, phrase
    for wrong in ("scores the longer one higher", "positive advantages, so the policy gradient raises", "over-represented", "keeps growing",
                  "under-charges", "every extra token adds"):
        assert wrong not in t, wrong
    # the RM pays more than the penalty charges, but the verdict says the KL stopped: the sentence follows the verdict
    t = _text(_synthetic(increasing=False))
    assert "has nonetheless stopped growing" in t and "keeps growing" not in t
    # no RM gain: nothing for length to explain, no drift for the penalty to hold back
    t = _text(_synthetic(rm_gain=-0.2, share=float("nan")))
    assert "does not score the policy above the reference" in t and "pays nothing for drifting" in t


def test_tiny_numbers_say_they_are_tiny():
    t = _text(_synthetic(slope=0.01, share=0.02, adv_len=0.01, adv_fill=0.0, pos_fill=0.15, k1_bias=0.001, clip=0.5))
    for phrase in ("barely tells longer from shorter", "Length explains almost none of the RM gain", "Advantages barely track length",
                   "about as common among reinforced tokens", "on average it matches the exact KL", "Clipping is active on a large share"):
        assert phrase in t, phrase
    for wrong in ("scores the longer one higher", "Length alone", "longer, politer", "over-represented", "the few clipped tokens"):
        assert wrong not in t, wrong
