"""Reading a YAML file the way every study file is read: UTF-8 text, valid YAML, no key given twice.

PyYAML's safe_load keeps the last of two equal keys in a mapping without a word, so an edited study
file whose `fixed:` sets `ppo.iterations` twice runs the value further down; here that is an error
naming the key and both lines. A file that is not UTF-8 text is one line naming the file and the
byte, never a UnicodeDecodeError traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlFileError(ValueError):
    """A YAML file that cannot be read as given; the message is one line naming the file and the place."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (YAML 1.2 requires unique keys)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    break
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (lines {first} and {key_node.start_mark.line + 1}; "
                        "the second would silently win)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def loads(text: str) -> Any:
    """Parse YAML text with UniqueKeyLoader (yaml.YAMLError on bad YAML or a duplicate key)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> Any:
    """The parsed file; YamlFileError (one line: the file, the line, the problem) when it is not UTF-8,
    not valid YAML, or gives a mapping key twice; OSError when it cannot be opened."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise YamlFileError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); save it as UTF-8") from None
    try:
        return loads(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise YamlFileError(f"{path}: not valid YAML{where}: {problem}") from None
