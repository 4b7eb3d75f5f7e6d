"""``quantoracle.__version__``: the installed distribution's version, or, running from a source
tree that is not installed, the ``version`` in the ``pyproject.toml`` beside the package."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DISTRIBUTION = "quantoracle"
_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _source_tree_version() -> str:
    """The ``[project]`` version of the source tree's pyproject.toml (no TOML parser needed:
    Python 3.10 has none); ``0+unknown`` when there is no such file or field."""
    if _PYPROJECT.is_file():
        project = _PYPROJECT.read_text().partition("[project]")[2].partition("\n[")[0]
        match = re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE)
        if match:
            return match.group(1)
    return "0+unknown"


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return _source_tree_version()


__version__ = _version()
