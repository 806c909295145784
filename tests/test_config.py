"""conf/ mirrors the dataclasses, and bad input fails in one line that names the key."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_sweep.config.compose import CONF_DIR, compose
from rlhf_sweep.config.schema import Config, ConfigError, config_hash, flatten

GROUPS = {"world": "default", "model": "gpt2", "sft": "default", "rm": "default", "ppo": "default", "eval": "default", "mlflow": "default"}


@pytest.mark.parametrize("group,option", GROUPS.items())
def test_conf_defaults_equal_dataclass_defaults(group, option):
    """The YAML a user reads and the dataclass defaults never drift apart."""
    text = yaml.safe_load((Path(CONF_DIR) / group / f"{option}.yaml").read_text())
    assert flatten(text) == flatten(dataclasses.asdict(getattr(Config(), group)))


@pytest.mark.parametrize("option", ["ppo", "rloo", "grpo", "dpo", "ipo", "bon"])
def test_algo_options_equal_dataclass_defaults(option):
    """Each conf/algo/ option names its algorithm and carries its sections whole, at the dataclass defaults
    (an option's `defaults` list brings another option's sections: ipo uses dpo's)."""
    def sections(name: str) -> dict:
        text = yaml.safe_load((Path(CONF_DIR) / "algo" / f"{name}.yaml").read_text())
        out = {}
        for d in text.pop("defaults", []):
            if d != "_self_":
                out.update(sections(d))
        return {**out, **text}

    text = sections(option)
    assert text.pop("algo") == option
    for section, values in text.items():
        assert flatten(values) == flatten(dataclasses.asdict(getattr(Config(), section))), section
    assert dataclasses.asdict(compose([f"algo={option}"])) == {**dataclasses.asdict(Config()), "algo": option}


def test_compose_defaults_equal_config():
    assert dataclasses.asdict(compose([])) == dataclasses.asdict(Config())


def test_compose_applies_overrides_and_experiments():
    c = compose(["ppo.beta=0.1", "seed=3", "experiment=unbiased_labelers"])
    assert (c.ppo.beta, c.seed, c.world.labeler.length_bias, c.world.labeler.filler_bias) == (0.1, 3, 0.0, 0.0)
    assert compose(["model=llama"]).model.arch == "llama"


@pytest.mark.parametrize(
    "override,needle",
    [
        ("ppo.betta=0.1", "ppo.betta"),
        ("+ppo.betta=0.1", "ppo.betta"),
        ("ppo.beta=-1", "ppo.beta"),
        ("ppo.clip_eps=0", "ppo.clip_eps"),
        ("model.arch=bert", "gpt2 | llama"),
        ("ppo.kl_estimator=k4", "k1 | k2 | k3 | exact"),
        ("ppo.kl_in=everywhere", "reward | loss | both"),
        ("ppo.kl_estimator=k2", "k2 belongs in the loss"),
        ("rm.pairs=sorted", "random | length_matched"),
        ("model=bert", "gpt2, llama"),
        ("ppo.beta=abc", "ppo.beta"),
    ],
)
def test_bad_overrides_raise_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        compose([override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize("override,needle", [("ppo.foo=1", "ppo.foo"), ("ppo.beta=-1", "ppo.beta"), ("ppo.clip_eps=0", "ppo.clip_eps"),
                                             ("model.arch=bert", "model.arch"), ("ppo.kl_estimator=k9", "ppo.kl_estimator")])
def test_cli_exits_nonzero_with_one_line(override, needle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "rlhf_sweep", "run", override], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "outputs").exists()  # failed before making a run directory


def test_config_hash_is_stable_and_sensitive():
    a, b = Config(), Config()
    assert config_hash(a.rm) == config_hash(b.rm)
    b.rm.center_coef = 0.01
    assert config_hash(a.rm) != config_hash(b.rm)


def test_cache_keys_hold_the_thread_count():
    """Weights trained with another thread count differ in the last bits, and PPO amplifies that:
    a cached artefact is reused only by runs with the same effective thread count."""
    import os

    import torch

    from rlhf_sweep.run import pipeline

    cpu = torch.device("cpu")
    one, two, every = (compose([f"threads={t}"]) for t in (1, 2, 0))
    assert pipeline.sft_key(one, cpu) != pipeline.sft_key(two, cpu)
    assert pipeline.rm_key(one, cpu) != pipeline.rm_key(two, cpu)
    same = compose([f"threads={os.cpu_count()}"])
    assert pipeline.sft_key(every, cpu) == pipeline.sft_key(same, cpu)
    assert pipeline.sft_key(one, cpu) == pipeline.sft_key(compose(["threads=1", "ppo.beta=0.5"]), cpu)  # PPO knobs never retrain
