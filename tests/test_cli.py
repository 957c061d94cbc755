"""The ``torch-lamb`` command's surface: ``--version`` and ``--help`` without importing torch, no abbreviated
options, help texts without doubled defaults or raw markup, and a package whose names load on first use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=300)


def _imported(importtime_stderr: str) -> set[str]:
    """The modules ``python -X importtime`` reports as imported (the last column of its table)."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def _version() -> str:
    namespace: dict[str, str] = {}
    exec((ROOT / "src" / "torch_lamb" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


@pytest.mark.parametrize("argv", [
    ["-m", "torch_lamb.cli", "--version"], ["-m", "torch_lamb", "--version"], ["-m", "torch_lamb", "--help"],
    ["-m", "torch_lamb"], ["-m", "torch_lamb", "nope"],
], ids=["cli-version", "main-version", "help", "no-command", "unknown-command"])
def test_version_help_and_usage_errors_never_import_torch(argv: list[str]) -> None:
    done = _run("-X", "importtime", *argv)
    modules = _imported(done.stderr)
    assert "torch_lamb._version" in modules  # the table was read
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}, sorted(modules)[:20]
    if "--version" in argv:
        assert (done.returncode, done.stdout) == (0, f"torch-lamb {_version()}\n")
    elif "--help" in argv:
        assert done.returncode == 0 and "{demo,bench}" in done.stdout
    else:
        assert done.returncode == 2 and "usage: torch-lamb" in done.stderr


def test_the_version_is_written_once() -> None:
    """pyproject.toml reads it from torch_lamb/_version.py; the package exports the same string."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and meta["project"]["dynamic"] == ["version"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "torch_lamb._version.__version__"}
    import torch_lamb

    assert torch_lamb.__version__ == _version() and re.fullmatch(r"\d+\.\d+\.\d+", _version())


def test_the_package_loads_its_names_on_first_use() -> None:
    code = (
        "import sys, torch_lamb; light = 'torch' not in sys.modules;"
        "from torch_lamb import Lamb, CosineDecay, kernel_status;"
        "import torch_lamb.optimizer as o;"
        "names = [getattr(torch_lamb, n) for n in torch_lamb.__all__];"
        "print(light, Lamb is o.Lamb, torch_lamb.functional.__name__, set(torch_lamb.__all__) <= set(dir(torch_lamb)))"
    )
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "torch_lamb.functional", "True"]
    missing = _run("-c", "import torch_lamb; torch_lamb.no_such_name")
    assert missing.returncode == 1 and "AttributeError: module 'torch_lamb' has no attribute 'no_such_name'" in (
        missing.stderr)


@pytest.mark.parametrize("argv", [
    ["--vers"], ["demo", "--qui"], ["demo", "--out=x", "--batch", "64"], ["bench", "--qui"], ["bench", "--cas", "tiny"],
])
def test_abbreviated_options_are_refused(argv: list[str]) -> None:
    done = _run("-m", "torch_lamb", *argv)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "torch-lamb" not in done.stdout  # not taken as --version, nor run
    assert "unrecognized arguments" in done.stderr or "required: command" in done.stderr


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_help_states_each_default_once_without_markup(command: str) -> None:
    done = _run("-m", "torch_lamb", command, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines: join them
    assert "``" not in text and ":func:" not in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for option_help in re.split(r"\s--(?=[a-z])", text):
        assert option_help.count("default") <= 1, option_help
    if command == "demo":
        for default in ("(default: torch_lamb_demo)", "(default: 128,512,2048,8192;", "(default: lamb,adamw)",
                        "(default: 0.1)", "(default: cpu)", "(default: 1,"):
            assert default in text, default
