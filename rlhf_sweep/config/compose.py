"""The one Hydra entry point. Everything that asks Hydra for a config or runs under Hydra comes through here:

- `compose(overrides)`: `conf/` and the user's config directories (paths.py) composed with Hydra overrides
  into a checked `Config` (every command, trial and reader that needs a config from overrides);
- `load_config(raw)`: a composed config merged onto the schema and validated;
- `compose_hydra(overrides)`: the raw composition with its `hydra` node (where a run will write);
- `hydra_command_line(argv)`, `run_under_hydra(task, argv)`, `hydra_run_dir()`: `rlhf-sweep run` as Hydra's
  own application (its run directory, --multirun, --cfg, --info).

A Hydra or OmegaConf error becomes one `ConfigError` line that names the key and what it accepts.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rlhf_sweep.config.algorithms import MODULE_KEY, algo_sections
from rlhf_sweep.config.draws import apply_draw
from rlhf_sweep.config.paths import PathsError, config_dirs, shipped_conf_dir, with_user_config_dirs
from rlhf_sweep.config.schema import Config, ConfigError, known_keys, node_at, schema_for, validate

CONF_DIR = str(shipped_conf_dir())


def _one_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
    return "; ".join(lines)


def load_config(cfg: DictConfig | dict) -> Config:
    """Merge a composed config onto the schema and validate it; raise ConfigError."""
    raw = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    module = raw.get(MODULE_KEY)  # a user's algorithm: its conf file names the module that defines it
    raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k not in ("hydra", MODULE_KEY)]) if "hydra" in raw or module else raw
    schema = OmegaConf.structured(schema_for(raw.get("algo"), module))
    try:
        merged = OmegaConf.merge(schema, raw)
        conf: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        known = known_keys(node_at(parent))
        raise ConfigError(f"unknown config key '{key}'; {('known keys under ' + (parent or 'the top level') + ': ' + known) if known else 'check the spelling'}") from None
    except (ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for '{key}': {msg}") from None
    validate(conf)
    if conf.world.draw is not None:
        conf.world = apply_draw(conf.world)
        validate(conf)  # the drawn world, with any fields set by hand
    return conf


def compose(overrides: Sequence[str] = ()) -> Config:
    """Compose `conf/` and the user's config directories (paths.py) with Hydra overrides, as
    `rlhf-sweep run` does, and validate it."""
    return load_config(_compose_raw(overrides, with_hydra_node=False))


def compose_hydra(overrides: Sequence[str] = (), without_sweeps: bool = False) -> DictConfig:
    """The composed config with its `hydra` node (hydra.run.dir, hydra.sweep.dir, ...), unvalidated;
    `without_sweeps` leaves out a --multirun's sweeps (seed=0,1,2, range(...)): what every job shares.
    Raises ConfigError (one line) when it does not compose."""
    return _compose_raw(overrides, with_hydra_node=True, without_sweeps=without_sweeps)


def _compose_raw(overrides: Sequence[str], with_hydra_node: bool, without_sweeps: bool = False) -> DictConfig:
    # Hydra is imported where it is used: commands that compose nothing (--help, report, ui) start without it
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        overrides = _shared_overrides(overrides) if without_sweeps else list(overrides)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=with_user_config_dirs(overrides),
                                 return_hydra_config=with_hydra_node)
    except PathsError as e:
        raise ConfigError(str(e)) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_hydra_error_line(str(e))) from None


def _shared_overrides(overrides: Sequence[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides)) if not o.is_sweep_override()]


def _hydra_error_line(message: str) -> str:
    """Hydra's error as one line naming the key and what it accepts."""
    text = message.split("Config search path")[0]
    m = re.search(r"Could not override '([^']+)'", text)
    if m and node_at(m.group(1)) is None:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        known = known_keys(node_at(parent))
        return f"unknown config key '{key}'; known keys under {parent or 'the top level'}: {known}"
    if m and m.group(1).split(".")[0] in algo_sections():
        key, algos = m.group(1), algo_sections()[m.group(1).split(".")[0]]
        return (f"{key} is a knob of {' and '.join(f'algo={a}' for a in algos)}, not of the algorithm this "
                f"config runs; add algo={algos[0]} (conf/algo/{algos[0]}.yaml)")
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if m:
        group, options = m.group(1), re.findall(r"^\t(\S+)", text, flags=re.M)
        return (f"{group}={m.group(2)} is not an option of group '{group}'; options: {', '.join(options)} "
                f"(looked in {', '.join(str(d) for d in config_dirs())}; add yours with --config-dir DIR)")
    return _one_line(Exception(text))


# ----- `rlhf-sweep run` as Hydra's application -------------------------------------------------------
HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p")  # Hydra flags that take the next argument
HYDRA_INFO_FLAGS = ("--info", "-i")
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # --info's optional value
PRINT_ONLY_FLAGS = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help")  # Hydra prints, runs nothing


@dataclass
class HydraCommandLine:
    """`rlhf-sweep run`'s arguments as Hydra reads them."""

    argv: list[str]  # for Hydra: the user's config directories joined to hydra.searchpath
    overrides: list[str]  # the config's own overrides (hydra.* and hydra/* left out)
    searchpath: list[str]  # the hydra.searchpath override, with the user's config directories
    multirun: bool
    print_only: bool  # --cfg, --info, --help: Hydra prints and runs nothing

    @property
    def hydra_overrides(self) -> list[str]:
        return [a for a in self.argv if a.startswith(("hydra.", "hydra/"))]


def hydra_command_line(argv: Sequence[str]) -> HydraCommandLine:
    """Read `rlhf-sweep run`'s arguments as Hydra will; ConfigError (one line) for a missing config directory."""
    argv = list(argv)
    overrides, skip, first = [], False, None
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in HYDRA_VALUE_FLAGS or a in HYDRA_INFO_FLAGS or a == "--resolve":
            skip = a in HYDRA_VALUE_FLAGS or (a in HYDRA_INFO_FLAGS and i + 1 < len(argv) and argv[i + 1] in INFO_TOPICS)
            continue
        if a.startswith("-"):
            continue
        first = i if first is None else first
        if not a.startswith(("hydra.", "hydra/")):
            overrides.append(a)
    # the user's config directories (--config-dir, RLHF_SWEEP_CONFIG_DIR) join any hydra.searchpath given
    try:
        searchpath = with_user_config_dirs([a for a in argv if _is_searchpath(a)])
    except PathsError as e:
        raise ConfigError(str(e)) from None
    # among the other overrides: Hydra's argparse takes them as one run of positional arguments
    at = first if first is not None else 0
    hydra_argv = [a for a in argv[:at] if not _is_searchpath(a)] + searchpath + [a for a in argv[at:] if not _is_searchpath(a)]
    return HydraCommandLine(hydra_argv, overrides, searchpath, multirun=any(a in ("-m", "--multirun") for a in argv),
                            print_only=any(a in PRINT_ONLY_FLAGS for a in hydra_argv))


def _is_searchpath(arg: str) -> bool:
    return arg.split("=", 1)[0] == "hydra.searchpath"


def run_under_hydra(task: Callable[[DictConfig], None], argv: Sequence[str], prog: str = "rlhf-sweep run") -> None:
    """Run `task(raw config)` as Hydra's application on the command line `argv` (a `hydra_command_line().argv`):
    Hydra makes the run directory, runs each job of a --multirun, or only prints (--cfg, --info).
    Hydra names the job after the file `task` is defined in (its log file, hydra.job.name)."""
    import hydra

    main = hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(task)
    sys.argv = [prog, *argv]  # Hydra reads its command line from sys.argv
    main()


def hydra_run_dir() -> str:
    """The run directory Hydra made for the job `run_under_hydra` is running."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir
