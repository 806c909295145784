"""The one Hydra entry point: `compose(overrides)` composes `conf/` (and the user's config directories) into a
checked `Config`; every command, trial and reader that needs a config from overrides comes through here.

A Hydra or OmegaConf error becomes one `ConfigError` line that names the key and what it accepts.
"""

from __future__ import annotations

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


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose `conf/` and the user's config directories (paths.py) with Hydra overrides, as
    `rlhf-sweep run` does, and validate it."""
    import re

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=with_user_config_dirs(list(overrides)))
    except PathsError as e:
        raise ConfigError(str(e)) from None
    except (HydraException, OmegaConfBaseException) as e:
        text = str(e).split("Config search path")[0]
        m = re.search(r"Could not override '([^']+)'", text)
        if m and node_at(m.group(1)) is None:
            key = m.group(1)
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            known = known_keys(node_at(parent))
            raise ConfigError(f"unknown config key '{key}'; known keys under {parent or 'the top level'}: {known}") from None
        if m and m.group(1).split(".")[0] in algo_sections():
            key, algos = m.group(1), algo_sections()[m.group(1).split(".")[0]]
            raise ConfigError(f"{key} is a knob of {' and '.join(f'algo={a}' for a in algos)}, not of the algorithm this "
                              f"config runs; add algo={algos[0]} (conf/algo/{algos[0]}.yaml)") from None
        m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
        if m:
            group, options = m.group(1), re.findall(r"^\t(\S+)", text, flags=re.M)
            raise ConfigError(f"{group}={m.group(2)} is not an option of group '{group}'; options: {', '.join(options)} "
                              f"(looked in {', '.join(str(d) for d in config_dirs())}; add yours with --config-dir DIR)") from None
        raise ConfigError(_one_line(Exception(text))) from None
    return load_config(raw)
