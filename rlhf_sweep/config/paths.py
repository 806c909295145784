"""Where configs and studies come from: the ones shipped with the package and the user's own.

The repository keeps `conf/` and `studies/` at its top level; the wheel carries them as the packages
`rlhf_sweep.conf` and `rlhf_sweep.studies` (pyproject's package-dir), and an editable install maps
the same names onto the repository's folders. `shipped_conf_dir` and `shipped_studies_dir` are the
only places that know this; everything else asks them.

User additions, without touching the package:
- config groups and overlays (e.g. `experiment/my_overlay.yaml`, `world/my_world.yaml`) in directories
  named by `--config-dir DIR` (any command) or `RLHF_SWEEP_CONFIG_DIR` (several joined by `:`). Hydra
  searches them after the shipped `conf/` (as its own `--config-dir` and `hydra.searchpath` do), so
  they add options; a shipped name keeps its shipped meaning.
- study files by path, or by name from `--studies-dir DIR` / `RLHF_SWEEP_STUDIES_DIR`, then `./studies/`
  of the current directory, then the shipped ones (the first match wins).
The command-line flags set the environment variables, so worker processes see the same directories.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

CONFIG_DIR_ENV = "RLHF_SWEEP_CONFIG_DIR"
STUDIES_DIR_ENV = "RLHF_SWEEP_STUDIES_DIR"


class PathsError(ValueError):
    """A user directory that does not exist; the message is one line naming it."""


def _shipped(package: str, folder: str) -> Path:
    try:
        path = Path(str(resources.files(package)))
    except ModuleNotFoundError:
        # a source checkout put on sys.path without installing it
        path = Path(__file__).resolve().parents[2] / folder
    if not path.is_dir():
        raise PathsError(f"the package's {folder}/ is missing (looked for {path}); reinstall rlhf-sweep")
    return path


def shipped_conf_dir() -> Path:
    """The config groups that come with the package (the repository's conf/)."""
    return _shipped("rlhf_sweep.conf", "conf")


def shipped_studies_dir() -> Path:
    """The study files that come with the package (the repository's studies/)."""
    return _shipped("rlhf_sweep.studies", "studies")


def _env_dirs(var: str) -> list[Path]:
    return [Path(p).expanduser().resolve() for p in os.environ.get(var, "").split(os.pathsep) if p.strip()]


def add_user_dir(var: str, path: str, flag: str) -> Path:
    """Put a command-line directory first in the environment variable (which spawned workers inherit)."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise PathsError(f"{flag} {path}: no such directory ({p})")
    rest = [str(d) for d in _env_dirs(var) if d != p]
    os.environ[var] = os.pathsep.join([str(p), *rest])
    return p


def _unique(dirs: list[Path]) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and all(not d.samefile(o) for o in out):
            out.append(d)
    return out


def user_config_dirs() -> list[Path]:
    """The user's config directories, in search order (the shipped conf/ excluded)."""
    missing = [d for d in _env_dirs(CONFIG_DIR_ENV) if not d.is_dir()]
    if missing:
        raise PathsError(f"{CONFIG_DIR_ENV} names {missing[0]}, which is not a directory")
    shipped = shipped_conf_dir()
    return [d for d in _unique(_env_dirs(CONFIG_DIR_ENV)) if not d.samefile(shipped)]


def config_dirs() -> list[Path]:
    """Every directory Hydra composes from, in its search order: the shipped conf/, then the user's."""
    return [shipped_conf_dir(), *user_config_dirs()]


def study_dirs() -> list[Path]:
    """Where a study name is looked up, first match first: the user's directories, ./studies, the shipped ones."""
    missing = [d for d in _env_dirs(STUDIES_DIR_ENV) if not d.is_dir()]
    if missing:
        raise PathsError(f"{STUDIES_DIR_ENV} names {missing[0]}, which is not a directory")
    return _unique([*_env_dirs(STUDIES_DIR_ENV), Path.cwd() / "studies", shipped_studies_dir()])


def group_options(group: str) -> list[str]:
    """The options of a config group across every config directory (e.g. the experiment overlays)."""
    return sorted({p.stem for d in config_dirs() for p in (d / group).glob("*.yaml")})


def with_user_config_dirs(overrides: list[str]) -> list[str]:
    """Hydra overrides with the user's config directories appended to `hydra.searchpath`.

    A `hydra.searchpath=[...]` the user gave keeps its entries (first); the environment's directories
    follow. Without user directories the overrides come back unchanged.
    """
    dirs = [f"file://{d}" for d in user_config_dirs()]
    if not dirs:
        return list(overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given: list[str] = []
    rest = []
    for o in overrides:
        if o.split("=", 1)[0].lstrip("+~") == "hydra.searchpath":
            value = OverridesParser.create().parse_override(o).value()
            given = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        else:
            rest.append(o)
    entries = list(dict.fromkeys([*given, *dirs]))
    quoted = ",".join("'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'" for e in entries)
    return [*rest, f"hydra.searchpath=[{quoted}]"]
