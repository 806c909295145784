"""The study files a name can reach, listed for `rlhf-sweep studies`: each with its kind and one-line description."""

from __future__ import annotations

import re
from typing import Any

from rlhf_sweep.config.paths import PathsError, shipped_studies_dir, study_dirs
from rlhf_sweep.study.spec import StudyError
from rlhf_sweep.utils.yamlfile import YamlFileError, read_yaml


def one_line(text: str, width: int = 100) -> str:
    """The first sentence of a description, on one line, at most `width` characters."""
    text = " ".join(str(text or "").split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    first = m.group(1) if m else text
    return first if len(first) <= width else first[: width - 1].rstrip() + "…"


def list_studies() -> list[dict[str, Any]]:
    """Every study file a name can reach (paths.study_dirs, first match first), with its one-line description.

    Each row: name, kind (study | compare-fixes), trials, source ('shipped' or the user's directory),
    description; a name that a directory earlier in the order already holds is left out (it cannot be
    reached by name), and a file that does not read says so in its description.
    """
    try:
        dirs = study_dirs()
    except PathsError as e:
        raise StudyError(str(e)) from None
    shipped, rows, seen = shipped_studies_dir(), [], set()
    for d in dirs:
        source = "shipped" if d.samefile(shipped) else str(d)
        for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
            if f.stem in seen:
                continue
            seen.add(f.stem)
            try:  # one stray file (not UTF-8, not YAML) gets its own row; the listing goes on
                raw = read_yaml(f)
            except (OSError, YamlFileError) as e:
                why = str(e).split(": ", 1)[-1] if isinstance(e, YamlFileError) else e.strerror or type(e).__name__
                rows.append({"name": f.stem, "kind": "?", "trials": "", "source": source,
                             "description": one_line(f"(unreadable: {why})")})
                continue
            raw = raw if isinstance(raw, dict) else {}
            fixes = "arms" in raw
            rows.append({"name": f.stem, "kind": "compare-fixes" if fixes else "study",
                         "trials": "" if fixes else raw.get("n_trials", ""), "source": source,
                         "description": one_line(raw.get("description", ""))})
    return rows
