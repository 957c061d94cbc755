"""What to tell a user to install, from where they stand: torch-lamb is on no package index, so asking pip for
its extras by the project's name cannot work; the packages themselves, into the Python that is running, can."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

__all__ = ["install_hint"]


def _clone_root() -> Path | None:
    """The clone this package runs from (an editable install or ``PYTHONPATH=src``), or None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "torch_lamb").is_dir() else None


def install_hint(packages: list[str], extra: str) -> str:
    """A command that installs ``packages`` into this Python, and, when running from a clone, the extra that
    brings them with the rest of what it is for (``pip install -e 'CLONE[extra]'``)."""
    pip = f"{shlex.quote(sys.executable)} -m pip install"
    hint = f"`{pip} {' '.join(packages)}`"
    root = _clone_root()
    if root is not None:
        hint += f" (or, for all of the {extra} extra, `{pip} -e {shlex.quote(f'{root}[{extra}]')}`)"
    return hint
