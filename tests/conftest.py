import os

import pytest

# A few seconds a trial: for plumbing tests, not for the science.
TINY = [
    "sft.n_demos=512", "sft.epochs=1", "rm.n_pairs=256", "rm.n_eval_pairs=64", "rm.epochs=1",
    "ppo.iterations=3", "ppo.batch_size=16", "eval.n_prompts=32", "progress=false",
]


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
