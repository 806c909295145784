"""`sweep --dry-run`'s wall-time estimate (dryrun.py) from measured runs, checked against numbers by hand."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import to_dict
from rlhf_sweep.study import dryrun
from rlhf_sweep.study.spec import load_spec


def write_summary(path, cfg, total, sft=0.5, rm=0.5, built=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": to_dict(cfg), "timing": {"sft": sft, "rm": rm, "total": total},
                                "cache": {"sft": {"cached": not built}, "rm": {"cached": not built}}}))


def test_estimate_from_runs_of_the_same_sizes_plus_builds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty cache: this study's SFT reference and RM are not built yet
    spec = load_spec("smoke")  # 2 seeds a trial
    base = dataclasses.replace(compose(spec.fixed_overrides()), threads=2)
    out = tmp_path / "outputs"
    for i, total in enumerate([4.0, 6.0, 20.0]):
        write_summary(out / "runs" / f"r{i}" / "summary.json", base, total)
    write_summary(out / "runs" / "built" / "summary.json", base, 30.0, sft=15.0, rm=9.0, built=True)  # 6 s once built
    other = dataclasses.replace(base, ppo=dataclasses.replace(base.ppo, iterations=50))
    write_summary(out / "runs" / "other" / "summary.json", other, 100.0)  # other PPO sizes: not counted
    write_summary(out / "mlartifacts" / "x" / "summary.json", base, 1000.0)  # an MLflow artifact copy: not counted

    e = dryrun.estimate(spec, base, [], remaining=4, workers=2, threads=2, outputs=out)
    # runs 4, 6, 20, 6 -> median 6 s; 4 trials on 2 workers = 2 rounds x 2 seeds x 6 s, + 2 seeds x (15 + 9) s of builds
    assert e.seconds == pytest.approx(2 * 2 * 6.0 + 2 * (15.0 + 9.0))
    assert "median pipeline time of 4 run(s)" in e.source and "to build the SFT reference and RM" in e.source

    none = dryrun.estimate(spec, base, [], remaining=4, workers=2, threads=2, outputs=tmp_path / "elsewhere")
    assert none.seconds is None and "no measurement yet" in none.source
