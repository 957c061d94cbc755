"""``$CC`` picks the kernel's compiler, as the README says: a named compiler runs, and one that is missing or fails
leaves the kernel off with a reason naming ``$CC`` (never a quiet fallback to gcc). Each case runs in a process of
its own, with a fresh cache folder, since the loader remembers its first result for the process."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GCC = shutil.which("gcc") or shutil.which("cc")
pytestmark = pytest.mark.skipif(GCC is None, reason="no C compiler here to wrap")

PROBE = """
import json
from torch_lamb.backends import kernel_build
status = kernel_build.kernel_status()
print(json.dumps({"available": status.available, "reason": status.reason, "compiler": status.compiler,
                  "text": str(status)}))
"""


def _status(cache: Path, cc: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env.update(TORCH_LAMB_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT / "src"))
    if cc is not None:
        env["CC"] = cc
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _libraries(cache: Path) -> list[Path]:
    return sorted(cache.glob("lamb_kernel_*.so")) if cache.exists() else []


def test_a_missing_cc_turns_the_kernel_off_naming_cc(tmp_path: Path) -> None:
    status = _status(tmp_path / "cache", "/nonexistent/cc")
    assert status["available"] is False and status["compiler"] is None
    assert status["reason"].startswith("$CC='/nonexistent/cc' was not found"), status
    assert "unset CC" in status["reason"] and "CPU kernel off: $CC=" in status["text"]
    assert _libraries(tmp_path / "cache") == []  # gcc was not used behind its back


def test_a_cc_that_fails_turns_the_kernel_off_with_its_exit_status(tmp_path: Path) -> None:
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'this compiler refuses' >&2\nexit 3\n")
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    status = _status(tmp_path / "cache", str(failing))
    assert status["available"] is False
    assert status["reason"] == f"$CC={str(failing)!r} ({failing}) failed (exit status 3): this compiler refuses"
    assert _libraries(tmp_path / "cache") == []


def test_the_cc_that_is_set_is_the_one_that_compiles_with_its_own_arguments(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "logging-cc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{GCC}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    status = _status(tmp_path / "cache", f"{wrapper} -DBUILT_THROUGH_CC")
    assert status["available"] is True, status
    assert status["compiler"] == f"{wrapper} -DBUILT_THROUGH_CC"
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("-DBUILT_THROUGH_CC -O3 ") and "lamb_kernel.c" in calls[0]
    assert len(_libraries(tmp_path / "cache")) == 1


def test_without_cc_gcc_or_cc_is_used(tmp_path: Path) -> None:
    status = _status(tmp_path / "cache", None)
    assert status["available"] is True and status["compiler"] == GCC, status
    blank = _status(tmp_path / "cache-blank", "  ")  # a blank CC counts as unset
    assert blank["available"] is True and blank["compiler"] == GCC, blank
