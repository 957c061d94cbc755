"""Build and load the gradient scan (``grad_scan.cpp``): the CPU kernel's per-step checks in one C++ pass.

Before each step on a reused layout, every gradient must be found packed, on the CPU and of its parameter's
shape and dtype, and every parameter must keep the storage, size and dtype the layout was built with. In
Python that is several attribute passes over the list, which on 2,000 small tensors cost as much as the
kernel's arithmetic; the scan does them in one pass and hands the kernel the gradients' pointers.

It is an optimisation only: the step never waits for it and never depends on it. The first use starts a
background build (a C++ compiler with torch's and Python's headers, about 20 s); until it is loaded, or
where it cannot be built, the optimizer takes its ordinary path, which reads and checks every gradient itself
and gives the same numbers. The library is cached beside the kernel's, under a hash of its source, the
command and the torch and Python builds, with the digest check of :mod:`~torch_lamb.backends.kernel_build`.
``$TORCH_LAMB_GRAD_SCAN=0`` (or :func:`set_enabled`) turns it off; ``$CXX`` names the compiler.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from . import kernel_build

try:
    import fcntl
except ImportError:  # not POSIX: concurrent builds still each write their own file and rename it into place
    fcntl = None  # type: ignore[assignment]

__all__ = ["ScanStatus", "dtype_code", "record", "scanner", "set_enabled", "status", "wait"]

SOURCE = Path(__file__).with_name("grad_scan.cpp")
Scan = Callable[[list, int, int, int, int], int]
"""``scan(params, pointers, numels, dtypes, out)``: -1 when every parameter passed, else the first that did not."""


@dataclass(frozen=True)
class ScanStatus:
    """Whether the scan is loaded, and if not, why (``"building"`` while its background build runs)."""

    available: bool
    reason: str | None
    path: str | None
    seconds: float  # the build (or cache hit) and load
    passed: int = 0  # steps whose gradients the scan checked and read (in this process)
    declined: int = 0  # steps it handed to the ordinary path (a gradient or parameter it does not take)

    def __str__(self) -> str:
        if self.available:
            return f"gradient scan on (loaded in {self.seconds:.2f} s from {self.path})"
        return f"gradient scan off: {self.reason}"


_lock = threading.Lock()
_enabled = os.environ.get("TORCH_LAMB_GRAD_SCAN", "1").strip() != "0"
_module: ModuleType | None = None
_failure: str | None = None
_builder: threading.Thread | None = None
_target: Path | None = None
_started = 0.0
_seconds = 0.0
_counts = [0, 0]  # passed, declined


def set_enabled(enabled: bool) -> None:
    """Use the scan where it is loaded (True, the default unless ``$TORCH_LAMB_GRAD_SCAN=0``) or never (False:
    every step takes the ordinary path; to compare the two, or to rule the scan out)."""
    global _enabled
    _enabled = bool(enabled)


def _command(cxx: str) -> list[str]:
    root = Path(torch.__file__).parent
    lib = str(root / "lib")
    includes = [sysconfig.get_paths()["include"], str(root / "include"), str(root / "include/torch/csrc/api/include")]
    return [*shlex.split(cxx), "-O2", "-shared", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *[f"-I{path}" for path in includes], str(SOURCE), "-o", "{out}", f"-L{lib}", f"-Wl,-rpath,{lib}",
            "-ltorch_python", "-ltorch_cpu", "-lc10"]


def _recipe(command: list[str]) -> Path:
    identity = " ".join([*[arg for arg in command if arg != str(SOURCE)], torch.__version__,  # the source by its bytes
                         str(torch.version.git_version), sys.version, str(sysconfig.get_config_var("EXT_SUFFIX"))])
    key = hashlib.sha256(SOURCE.read_bytes() + identity.encode()).hexdigest()[:16]
    return kernel_build.cache_dir() / f"grad_scan_{key}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"


def _build(target: Path, command: list[str], cxx: str) -> None:
    """The background build. One process builds at a time (a lock file beside the library): another that
    wants the same library waits for it here, off the main thread, and then finds it built."""
    global _failure
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(target.name + ".lock"), "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not kernel_build.verified(target):
                kernel_build.build_library(target, command, cxx)
        if not kernel_build.verified(target):
            _failure = f"the library at {target} does not match its digest after its build"
    except (OSError, kernel_build.KernelError) as err:
        _failure = str(err) or type(err).__name__


def _load(target: Path) -> None:
    global _module, _failure
    try:
        loader = importlib.machinery.ExtensionFileLoader("_grad_scan", str(target))
        spec = importlib.util.spec_from_file_location("_grad_scan", str(target), loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        if module.abi() != 1:
            raise ImportError(f"calling convention {module.abi()} (expected 1)")
        _module = module
    except (ImportError, OSError, AssertionError) as err:
        _failure = f"the library at {target} could not be loaded: {err}"


def _start() -> None:
    """First use: load a verified cached library, else start its build in a background thread (under _lock)."""
    global _builder, _target, _started, _failure, _seconds
    _started = time.perf_counter()
    cxx = kernel_build.compiler("CXX", ("g++", "c++"))
    if cxx is None:
        _failure = "no C++ compiler found ($CXX, g++ or c++)"
        return
    try:
        command = _command(cxx)
        _target = _recipe(command)
    except (ImportError, OSError, KeyError) as err:
        _failure = f"torch's or Python's headers were not found: {err}"
        return
    if kernel_build.verified(_target):
        _load(_target)
        _seconds = time.perf_counter() - _started
        return
    _builder = threading.Thread(target=_build, args=(_target, command, cxx), name="torch_lamb-grad-scan",
                                daemon=True)
    _builder.start()


def _settle() -> None:
    """Load the library once its background build has finished (under _lock)."""
    global _builder, _seconds, _failure
    if _builder is not None and not _builder.is_alive():
        _builder = None
        if _failure is None and _target is not None:
            if kernel_build.verified(_target):
                _load(_target)
            else:
                _failure = f"its build left no verified library at {_target}"
        _seconds = time.perf_counter() - _started


def scanner() -> Scan | None:
    """The scan when it is loaded and enabled, else None (the first call starts its build; never blocks on it)."""
    if _module is not None:
        return _module.scan if _enabled else None
    if not _enabled or _failure is not None:
        return None
    with _lock:
        if _target is None and _failure is None:
            _start()
        _settle()
    return _module.scan if _module is not None else None


def record(passed: bool) -> None:
    """Count a step the scan checked (``passed``) or handed to the ordinary path (reported by :func:`status`)."""
    _counts[0 if passed else 1] += 1


def dtype_code(dtype: torch.dtype) -> int:
    """``dtype`` as the scan's parameters' expected dtype codes spell it (the scan must be loaded)."""
    assert _module is not None, "the gradient scan is not loaded"
    return _module.dtype_code(torch.empty(0, dtype=dtype))


def wait(timeout: float | None = None) -> ScanStatus:
    """Start the scan's build if needed and wait for it (at most ``timeout`` seconds); its status then."""
    scanner()
    builder = _builder
    if builder is not None:
        builder.join(timeout)
    with _lock:
        _settle()
    return status()


def status() -> ScanStatus:
    """Whether the scan is loaded (without starting or waiting for anything)."""
    if _module is not None:
        reason = None if _enabled else "disabled (set_enabled(False) or $TORCH_LAMB_GRAD_SCAN=0)"
        return ScanStatus(_enabled, reason, str(_target), _seconds, *_counts)
    if not _enabled:
        return ScanStatus(False, "disabled (set_enabled(False) or $TORCH_LAMB_GRAD_SCAN=0)", None, 0.0, *_counts)
    reason = _failure or ("building" if _builder is not None else "not started (no fused layout yet)")
    return ScanStatus(False, reason, str(_target) if _target else None, _seconds, *_counts)
