"""The algorithm registry (config/algorithms.py): the six shipped cards against hand values, a user's
algorithm (one module, one conf file, nothing else touched) through `run` and a study, and the promise
that an algorithm's name appears only in its own module and the registry."""

import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_sweep.config import algorithms, paths
from rlhf_sweep.config.compose import compose
from rlhf_sweep.config.schema import Config, ConfigError

from .conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rlhf_sweep"


# ----- the shipped cards ----------------------------------------------------------------------------
def test_the_six_shipped_algorithms_with_their_sections_and_knobs():
    cards = {a.name: a for a in algorithms.SHIPPED}
    assert tuple(cards) == ("ppo", "rloo", "grpo", "dpo", "ipo", "bon") and algorithms.DEFAULT == "ppo"
    assert {n: a.section for n, a in cards.items()} == {"ppo": "ppo", "rloo": "rloo", "grpo": "grpo", "dpo": "dpo", "ipo": "dpo",
                                                         "bon": "bon"}
    assert {n: a.knobs.__name__ for n, a in cards.items()} == {"ppo": "PPOConfig", "rloo": "RLOOConfig", "grpo": "GRPOConfig",
                                                               "dpo": "DPOConfig", "ipo": "DPOConfig", "bon": "BoNConfig"}
    assert {n: a.knob for n, a in cards.items()} == {"ppo": "ppo/beta", "rloo": "rloo/beta", "grpo": "grpo/beta", "dpo": "dpo/beta",
                                                     "ipo": "dpo/beta", "bon": "bon/n"}
    assert {n: a.prefix for n, a in cards.items()} == {"ppo": "ppo", "rloo": "rloo", "grpo": "grpo", "dpo": "dpo", "ipo": "dpo",
                                                       "bon": "bon"}
    assert {n: a.color for n, a in cards.items()} == {"ppo": "C0", "rloo": "C1", "grpo": "C2", "dpo": "C4", "ipo": "C9",
                                                      "bon": "#c0392b"}
    assert [n for n, a in cards.items() if not a.trains] == ["bon"]
    assert cards["ppo"].eval_at_temperature and not any(a.eval_at_temperature for n, a in cards.items() if n != "ppo")
    assert [n for n, a in cards.items() if a.judge] == ["dpo", "ipo"]
    # the sections only an algo= option composes (ppo's is conf/ppo/, in every config), and who reads each
    assert algorithms.algo_sections() == {"rloo": ("rloo",), "grpo": ("grpo",), "dpo": ("dpo", "ipo"), "bon": ("bon",)}


def test_each_card_names_a_module_with_its_entry_point():
    for a in algorithms.SHIPPED:
        module = importlib.import_module(a.module)
        assert callable(getattr(module, "train" if a.trains else "evaluate")), a.name


def test_the_config_is_the_shared_settings_then_the_registered_sections():
    assert [f.name for f in dataclasses.fields(Config)] == [
        "seed", "algo", "device", "threads", "cache_dir", "run_dir", "progress", "world", "model", "sft", "rm",
        "ppo", "rloo", "grpo", "dpo", "bon", "eval", "mlflow"]
    c = compose(["algo=grpo"])
    assert algorithms.get(c.algo).title(c) == "rlhf-sweep run algo=grpo, seed 0: β=0.04, G=8, KL k3 in the loss"
    assert algorithms.get("ipo").title(compose(["algo=ipo", "dpo.beta=0.5"])) == "rlhf-sweep run algo=ipo, seed 0: β (τ)=0.5"


def test_an_unknown_algorithm_fails_in_one_line_naming_the_choices():
    with pytest.raises(ConfigError, match=r"^algo='nope' is invalid: algo accepts ppo \| rloo \| grpo \| dpo \| ipo \| bon$"):
        algorithms.get("nope")
    with pytest.raises(ConfigError, match=r"^rloo.beta=-1.0 is invalid"):
        compose(["algo=rloo", "rloo.beta=-1"])


# ----- a user's algorithm: one module, one conf file --------------------------------------------------
COPY_MODULE = '''
"""copy: the policy is the reference, unchanged; its history samples it each iteration, as the others' do."""
from dataclasses import dataclass

from rlhf_sweep.config.algorithms import Algorithm
from rlhf_sweep.config.errors import require
from rlhf_sweep.training.core import sample_and_score, sample_stats


@dataclass
class CopyConfig:
    iterations: int = 3
    batch_size: int = 16

    def check(self, section):
        require(self.iterations >= 1, f"{section}.iterations", self.iterations, "an integer >= 1")


def train(x):
    history = []
    for i in range(x.knobs.iterations):
        prompts = x.world.sample_prompts(x.knobs.batch_size, x.rng).to(x.device)
        batch = sample_and_score(x.policy_lm, x.ref, x.rm, prompts, x.world.cfg.max_new_tokens, x.gen)
        cpu = {k: v.cpu() for k, v in batch.items()}
        entry = {"iteration": i, **sample_stats(x.world, cpu), "copy/beta": 0.0}
        x.on_iteration(i, entry, cpu)
        history.append(entry)
    return x.policy_lm, history


ALGORITHM = Algorithm("copy", __name__, "copy", CopyConfig, knob="copy/beta", prefix="copy",
                      title=lambda cfg: f"copy, seed {cfg.seed}: the reference, {cfg.copy.iterations} samplings")
'''

COPY_CONF = """\
# @package _global_
# copy: the reference as the policy (a test's algorithm)
_algorithm_: copy_algo
algo: copy
copy:
  iterations: 3
  batch_size: 16
"""


@pytest.fixture(scope="module")
def user_algo(tmp_path_factory):
    """copy_algo.py in a module folder and algo/copy.yaml in a config folder, nowhere else."""
    root = tmp_path_factory.mktemp("user-algo")
    (root / "mods").mkdir()
    (root / "mods" / "copy_algo.py").write_text(textwrap.dedent(COPY_MODULE))
    (root / "conf" / "algo").mkdir(parents=True)
    (root / "conf" / "algo" / "copy.yaml").write_text(COPY_CONF)
    return root


@pytest.fixture
def registered_copy(user_algo, monkeypatch):
    """The user's directories in this process; the registry as it was afterwards."""
    monkeypatch.setattr(algorithms, "_registry", dict(algorithms._registry))
    monkeypatch.syspath_prepend(str(user_algo / "mods"))
    monkeypatch.setenv(paths.CONFIG_DIR_ENV, str(user_algo / "conf"))
    yield user_algo
    sys.modules.pop("copy_algo", None)


def test_a_user_algorithm_joins_the_schema_with_its_own_knobs(registered_copy):
    c = compose(["algo=copy", "copy.iterations=2"])
    assert (c.algo, c.copy.iterations, c.copy.batch_size) == ("copy", 2, 16)
    assert dataclasses.asdict(c)["copy"] == {"iterations": 2, "batch_size": 16} and isinstance(c, Config)
    assert "copy" in algorithms.names() and algorithms.algo_sections()["copy"] == ("copy",)
    with pytest.raises(ConfigError, match=r"^unknown config key 'copy.iterationz'|Could not override 'copy.iterationz'"):
        compose(["algo=copy", "copy.iterationz=2"])
    with pytest.raises(ConfigError, match=r"^copy.iterations=0 is invalid: copy.iterations accepts an integer >= 1$"):
        compose(["algo=copy", "copy.iterations=0"])
    assert "copy" not in dataclasses.asdict(compose([]))  # the shipped algorithms' configs are unchanged


def test_a_user_algorithm_whose_module_does_not_import_fails_in_one_line(registered_copy, tmp_path, monkeypatch):
    (tmp_path / "algo").mkdir()
    (tmp_path / "algo" / "lost.yaml").write_text("# @package _global_\n_algorithm_: no_such_module\nalgo: lost\n")
    monkeypatch.setenv(paths.CONFIG_DIR_ENV, str(tmp_path))
    with pytest.raises(ConfigError) as e:
        compose(["algo=lost"])
    assert len(str(e.value).splitlines()) == 1 and "_algorithm_=no_such_module" in str(e.value) and "PYTHONPATH" in str(e.value)


def run_cli(*argv: str, cwd: Path, user: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user / "mods"), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
    env.pop(paths.CONFIG_DIR_ENV, None)
    return subprocess.run([sys.executable, "-m", "rlhf_sweep", *argv, "--config-dir", str(user / "conf")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.e2e
def test_a_user_algorithm_runs_end_to_end_through_run(user_algo, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("run", "algo=copy", "copy.iterations=2", *TINY, f"cache_dir={user_algo / 'cache'}", "mlflow.enabled=false",
                f"hydra.run.dir={run_dir}", cwd=tmp_path, user=user_algo)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "no trajectory figure" not in r.stderr and (run_dir / "trajectory.png").is_file()
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["config"]["algo"] == "copy" and s["config"]["copy"] == {"iterations": 2, "batch_size": 16}
    assert [h["iteration"] for h in s["history"]] == [0, 1] and s["metrics"]["copy/beta"] == 0.0
    m = s["metrics"]
    assert finite(m["gold/policy"], m["rm/policy"], m["kl/exact"], m["len/policy"], m["gold/win_rate"])
    assert "copy" in s["timing"]  # its own training stage


@pytest.mark.e2e
def test_a_user_algorithm_runs_in_a_study(user_algo, tmp_path):
    fixed = {"algo": "copy", "copy.iterations": 2, "cache_dir": str(user_algo / "cache")}
    fixed.update(dict(o.split("=", 1) for o in TINY if not o.startswith(("ppo.", "progress"))))
    study = {"description": "a user's algorithm in a study", "objectives": {"gold/policy": "maximize", "kl/exact": "minimize"},
             "space": {"copy.batch_size": {"type": "categorical", "choices": [8, 16]}}, "fixed": fixed, "seeds": 1, "n_trials": 2,
             "sampler": "grid"}
    path = tmp_path / "copy_study.yaml"
    path.write_text(json.dumps(study))  # JSON is YAML
    out = tmp_path / "out"
    r = run_cli("sweep", str(path), "--out", str(out), "--storage", str(tmp_path / "study.journal"),
                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path, user=user_algo)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "trials: 2 complete, 0 failed" in r.stdout, r.stdout[-2000:]
    assert "report failed" not in r.stdout and "baseline failed" not in r.stdout + r.stderr  # the study's readers take it too
    assert (out / "report.md").is_file() and (out / "baseline" / "seed-0" / "summary.json").is_file()
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 3, rows
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("trials/t*/seed-*/summary.json"))]
    assert sorted(s["config"]["copy"]["batch_size"] for s in summaries) == [8, 16]
    assert all(s["config"]["algo"] == "copy" and finite(s["metrics"]["gold/policy"], s["metrics"]["kl/exact"]) for s in summaries)


# ----- an algorithm's name lives in its module and the registry -------------------------------------
# Files that may name a shipped algorithm beside its own module and the registry, and why:
NAMED_ELSEWHERE = {
    # ppo is the default algorithm: its section (conf/ppo/) is in every config, and its names are the summary
    # format's (diagnosis["ppo"], config["ppo"], the ppo.beta column), which the readers and the CLI's run table read
    "ppo": {"reporting/report.py", "reporting/explain.py", "reporting/kl_penalties.py", "reporting/world_runs.py",
            "evaluation/metrics.py", "app/cli.py"},
    # the study's baseline is best-of-n by design (study/baselines.py runs it, reporting/study_data.py reads its
    # runs and fits Gao et al.'s best-of-n form to them, report.py draws it); maths/gao.py's "bon" names that
    # functional form, not the algorithm
    "bon": {"study/baselines.py", "reporting/study_data.py", "reporting/report.py", "maths/gao.py"},
}
QUOTED = re.compile(r"""["'](ppo|rloo|grpo|dpo|ipo|bon)["']""")


def test_an_algorithm_is_named_only_in_its_own_module_and_the_registry():
    own = {a.name: {a.module.removeprefix("rlhf_sweep.").replace(".", "/") + ".py", "config/algorithms.py"} for a in algorithms.SHIPPED}
    found: dict[str, set[str]] = {a.name: set() for a in algorithms.SHIPPED}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for name in QUOTED.findall(path.read_text()):
            found[name].add(rel)
    for name, files in found.items():
        assert files - own[name] <= NAMED_ELSEWHERE.get(name, set()), (name, sorted(files - own[name]))
