"""The error every config check raises: `ConfigError`, one line that names the key and what it accepts,
and `require`, the check that raises it. Below the schema and the algorithm registry, which both check."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key and the fix."""


def require(ok: bool, key: str, value: Any, accepts: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {key} accepts {accepts}")
