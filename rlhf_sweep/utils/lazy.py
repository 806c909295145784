"""`lazy_import(name)`: a module named at the top of a file and imported on first use.

The command line names every module its commands use at its top, yet `rlhf-sweep --help` or a bad
config must not wait for torch, matplotlib or the study machinery: each proxy imports its module the
first time one of its attributes is read. Import-linter does not see these imports, so a proxy may
only name a module of a layer below the one that holds it.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """Stands for the module `__name__`: every attribute is read from it, importing it the first time.
    Nothing is copied, so a later change to the module (a test's monkeypatch) is seen through the proxy."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__name__))


def lazy_import(name: str) -> types.ModuleType:
    """A proxy for the module `name` (dotted, absolute) that imports it on first attribute access."""
    return LazyModule(name)
