"""The package's architecture as tests: the import contracts (import-linter, pyproject.toml) hold on the
real tree and fail on a deliberately wrong import; one module owns each shared format or entry point; no
module is over the size limit; function-level imports of the package's own modules stay few."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "rlhf_sweep"
LINT = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 600
MAX_FUNCTION_IMPORTS = 5


def modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def lint(root: Path) -> subprocess.CompletedProcess:
    # the copy under test shadows the installed package: PYTHONPATH first, and the copy's pyproject
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    kept = re.findall(r"^(.+) KEPT\b", r.stdout, re.M)
    assert len(kept) >= 4, r.stdout


@pytest.mark.parametrize("module, line, broken", [
    # a lower layer importing a higher one
    ("rlhf_sweep/config/paths.py", "from rlhf_sweep.study import spec as _spec", "Layers import only downward"),
    # a reader that reaches for torch through the models
    ("rlhf_sweep/reporting/explain.py", "from rlhf_sweep.models import reward as _reward", "Readers read files"),
    # a study that writes its own report
    ("rlhf_sweep/study/journal.py", "from rlhf_sweep.reporting import report as _report", "Studies run trials"),
    # two siblings importing each other
    ("rlhf_sweep/maths/stats.py", "from rlhf_sweep.maths import gao as _gao\n", None),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, line, broken):
    root = tmp_path / "tree"
    shutil.copytree(PKG, root / "rlhf_sweep", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    if broken is None:  # a cycle: gao already imports nothing of stats, so make both directions
        (root / "rlhf_sweep/maths/gao.py").write_text((root / "rlhf_sweep/maths/gao.py").read_text()
                                                      + "\nfrom rlhf_sweep.maths import stats as _stats  # noqa\n")
        broken = "No import circles"
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    r = lint(root)
    assert r.returncode != 0, r.stdout[-2000:]
    assert re.search(rf"^{re.escape(broken)}.* BROKEN\b", r.stdout, re.M), r.stdout[-3000:]


def files_containing(pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [str(p.relative_to(ROOT)) for p in modules() if rx.search(p.read_text())]


def test_one_module_owns_the_summary_format_and_one_the_hydra_entry():
    assert files_containing(r'"summary\.json"') == ["rlhf_sweep/run/layout.py"]
    assert files_containing(r"initialize_config_dir|hydra\.main") == ["rlhf_sweep/config/compose.py"]


def test_no_module_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules()}
    assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}


def function_level_imports() -> list[str]:
    found = []
    for p in modules():
        tree = ast.parse(p.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                own = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("rlhf_sweep"))) or \
                      (isinstance(node, ast.Import) and any(a.name.startswith("rlhf_sweep") for a in node.names))
                if own:
                    found.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    return sorted(set(found))


def test_few_function_level_imports_of_the_package_each_with_its_reason():
    found = function_level_imports()
    assert len(found) <= MAX_FUNCTION_IMPORTS, found
    for where in found:
        path, line = where.rsplit(":", 1)
        text = (ROOT / path).read_text().splitlines()
        # the reason: a comment on the import's line or the line above it
        assert "#" in text[int(line) - 1] or text[int(line) - 2].strip().startswith("#"), f"{where}: say why it is imported here"


def test_lazy_imports_only_in_the_top_layer():
    """import-linter cannot see utils.lazy's proxies: keeping them in app/, the top layer, keeps every one pointing down."""
    users = [f for f in files_containing(r"lazy_import\(\"") if f != "rlhf_sweep/utils/lazy.py"]
    assert users and all(f.startswith("rlhf_sweep/app/") for f in users), users
    named = re.findall(r'lazy_import\("([\w.]+)"\)', "".join((ROOT / f).read_text() for f in users))
    assert all(not n.startswith("rlhf_sweep.app.cli") for n in named), named
