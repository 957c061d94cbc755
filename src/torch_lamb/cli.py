"""The ``torch-lamb`` command: ``torch-lamb demo`` and ``torch-lamb bench``.

``--version``, ``--help`` and a wrong command are answered without importing torch (seconds on a cold disk):
only the subcommand that runs imports its module.
"""

from __future__ import annotations

import argparse
import sys

from ._version import __version__

__all__ = ["main"]

COMMANDS = ("demo", "bench")


def build_parser() -> argparse.ArgumentParser:
    """The top-level options (each subcommand has its own parser)."""
    parser = argparse.ArgumentParser(
        prog="torch-lamb",
        description="LAMB for PyTorch. Run `torch-lamb demo --help` or `torch-lamb bench --help`.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"torch-lamb {__version__}")
    parser.add_argument("command", choices=COMMANDS,
                        help="demo: large batches on Fashion-MNIST, Lamb vs AdamW; bench: optimizer-step benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; returns a process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv[:1])  # prints usage / --help / --version, or errors on an unknown command
        return 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from . import demo

        return int(demo.main(rest) or 0)
    try:
        from . import bench
    except ImportError as err:
        print(f"torch-lamb bench is not available in this install: {err}", file=sys.stderr)
        return 1
    return int(bench.main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
