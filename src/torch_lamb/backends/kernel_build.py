"""Build, verify and load the CPU kernel (``lamb_kernel.c`` beside this file).

The kernel is compiled with the system C compiler the first time it is needed, never at import: ``$CC``
when it is set (split as a shell would, so ``CC="ccache gcc"`` works), else ``gcc``, else ``cc``. A ``$CC``
that cannot be found or fails leaves the kernel off with a reason naming ``$CC``: it is never quietly
replaced by another compiler. The library is cached under ``${TORCH_LAMB_CACHE_DIR:-~/.cache/torch_lamb}``
by a hash of the source, compiler, flags and CPU (``-march=native`` code must never reach another CPU
through a shared cache), with a SHA-256 digest of its bytes beside it:

* a library whose bytes do not match its digest (truncated, corrupt, half-copied) is never loaded:
  it is rebuilt once, since loading a truncated library kills the process with SIGBUS;
* after loading, the library's own description of its ``Bucket`` struct, flags and dtype codes
  (``lamb_abi()``) must equal the declaration here, else the kernel is refused;
* when the kernel cannot be used, :func:`kernel_status` says why, and the optimizer warns once per
  process (``implementation="auto"``) or raises (``implementation="fused"``).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KernelStatus", "cache_dir", "kernel_status", "load_kernel"]

SOURCE = Path(__file__).with_name("lamb_kernel.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
ENTRY_POINTS = ("lamb_fused", "lamb_pass1", "lamb_pass2", "lamb_grad_sums", "lamb_accumulate", "lamb_ema",
                "lamb_count_bad")
FLOOR_ENTRY_POINTS = ("lamb_stream",)
FIX_HINT = "set $CC to a working C compiler with OpenMP, or $TORCH_LAMB_CACHE_DIR to a writable folder"


class Bucket(ctypes.Structure):
    """The kernel's ``Bucket``; checked field by field against ``lamb_abi()`` at load time."""

    _fields_ = [
        ("n", ctypes.c_int64),
        *[(name, ctypes.c_void_p) for name in ("p", "g", "m", "v", "acc", "avg")],  # arrays of data pointers
        *[(name, ctypes.c_void_p) for name in
          ("sizes", "decay_mask", "adapt_mask", "clip_factors", "scale", "sums", "ratios")],
        *[(name, ctypes.c_int64) for name in ("flags", "nthreads", "segment")],
        *[(name, ctypes.c_float) for name in (
            "beta_1c", "beta_2c", "bc1", "bc2", "eps", "decay", "adaptive_decay", "lr", "min_ratio", "max_ratio",
            "loss_scale", "accumulation_steps", "clipvalue", "ema_weight")],
        ("mirror", ctypes.c_void_p),
        *[(name, ctypes.c_int64) for name in ("p_dtype", "g_dtype", "mirror_dtype")],
        ("limit", ctypes.c_float),
        ("group", ctypes.c_void_p),  # run -> slot, for strided trust-ratio slices (NULL: none)
        ("slots", ctypes.c_int64),
        ("unscale", ctypes.c_float),  # GradScaler's 1/scale (1: none, or a bfloat16 gradient)
        ("bf16_unscale", ctypes.c_float),  # the same for a bfloat16 gradient, applied (and rounded) as it is widened
    ]


@dataclass(frozen=True)
class Kernel:
    """A loaded, verified library and the constants it declared."""

    lib: ctypes.CDLL
    constants: dict[str, int]  # F_* flags and DT_* dtype codes, as the library defines them
    path: Path


@dataclass(frozen=True)
class KernelStatus:
    """What :func:`kernel_status` reports: whether the CPU kernel is usable, and if not, why."""

    available: bool
    reason: str | None  # why it is not available (None when it is)
    path: str | None  # the cached library
    compiler: str | None
    seconds: float  # the first load: compile or cache hit, verification and load
    float16: bool  # whether the library handles float16 tensors (the compiler has _Float16)

    def __str__(self) -> str:
        if self.available:
            return f"CPU kernel on ({self.compiler}, loaded in {self.seconds:.2f} s from {self.path})"
        return f"CPU kernel off: {self.reason} ({FIX_HINT})"


class KernelError(RuntimeError):
    """The kernel cannot be built, verified or loaded."""


_lock = threading.Lock()
_loaded: dict[bool, Kernel | None] = {}  # floor variant -> kernel (None: failed, see _failures)
_failures: dict[bool, str] = {}
_seconds: dict[bool, float] = {}


def cache_dir() -> Path:
    """Where compiled kernels live: ``$TORCH_LAMB_CACHE_DIR`` or ``~/.cache/torch_lamb``."""
    root = os.environ.get("TORCH_LAMB_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_lamb"


def _cc_variable() -> str:
    """``$CC`` as set (blank counts as unset)."""
    return os.environ.get("CC", "").strip()


def compiler(variable: str = "CC", candidates: tuple[str, ...] = ("gcc", "cc")) -> str | None:
    """The compiler command as one shell-quoted string (its program resolved on ``$PATH``), or None without one.

    When ``$CC`` (``variable``) is set it is the only candidate, so that the compiler a user names is the one
    that runs; else the first of ``candidates`` found (the gradient scan asks for ``$CXX``, ``g++``, ``c++``).
    """
    named = os.environ.get(variable, "").strip()
    if named:
        try:
            program, *args = shlex.split(named)
        except ValueError:  # unbalanced quotes
            return None
        found = shutil.which(program)
        return shlex.join([found, *args]) if found else None
    found = next((path for path in map(shutil.which, candidates) if path), None)
    return shlex.join([found]) if found else None


def _no_compiler_reason() -> str:
    cc = _cc_variable()
    if cc:
        return f"$CC={cc!r} was not found (or is not a command); fix it, or unset CC to use gcc or cc"
    return "no C compiler found (neither gcc nor cc is on $PATH; set $CC to one)"


def cpu_identity() -> str:
    """The CPU's model and feature flags (part of the cache key)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in f) if k.strip()}
        return f"{lines.get('model name', '')} {lines.get('flags', lines.get('Features', ''))}"
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def verified(target: Path) -> bool:
    """Whether ``target`` exists and its bytes match the digest written beside it at build time."""
    try:
        return _digest_path(target).read_text().strip() == _digest(target)
    except OSError:
        return False


_running: dict[subprocess.Popen, str] = {}  # compilers at work (a background build's), and their output files


@atexit.register
def _stop_builds() -> None:
    """A process that exits during a background build stops its compiler and removes the half-written file,
    rather than leave the compiler running on (the build is redone by the next process that needs it)."""
    for proc, tmp in list(_running.items()):
        proc.kill()
        proc.wait()
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def build_library(target: Path, command: list[str], compiler_name: str) -> None:
    """Run ``command`` (``{out}`` in it: where the compiler writes), then rename the digest and the library into
    place (atomic: a reader sees the old file, none, or the whole new one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    digest_tmp = tmp + ".sha256"
    try:
        try:
            proc = subprocess.Popen([tmp if arg == "{out}" else arg for arg in command], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except OSError as err:  # found but not runnable (permissions, a bad interpreter line)
            raise KernelError(f"{compiler_name} could not be run: {err}") from None
        _running[proc] = tmp
        try:
            stdout, stderr = proc.communicate()
        finally:
            _running.pop(proc, None)
        if proc.returncode != 0:
            output = (stderr or stdout).decode(errors="replace")[:400].strip()
            raise KernelError(f"{compiler_name} failed (exit status {proc.returncode}): {output or 'no output'}")
        Path(digest_tmp).write_text(_digest(Path(tmp)))
        os.replace(digest_tmp, _digest_path(target))
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, digest_tmp):
            if os.path.exists(leftover):
                os.unlink(leftover)


def build_kernel(target: Path, cc: str, flags: list[str]) -> None:
    """Compile the kernel to ``target`` (atomic, with its digest)."""
    build_library(target, [*shlex.split(cc), *flags, str(SOURCE), "-o", "{out}", "-lm"], _named(cc))


def _named(cc: str) -> str:
    """The compiler as an error names it: ``$CC=...`` when it came from ``$CC``."""
    return f"$CC={_cc_variable()!r} ({cc})" if _cc_variable() else cc


def parse_abi(text: str) -> tuple[dict[str, tuple[int, int]], dict[str, int], int]:
    """``lamb_abi()``'s text as (field -> (offset, size), constant -> value, struct size)."""
    fields: dict[str, tuple[int, int]] = {}
    constants: dict[str, int] = {}
    size = -1
    for item in text.split(";"):
        key, _, value = item.partition("=")
        if key == "size":
            size = int(value)
        elif ":" in value:
            offset, _, nbytes = value.partition(":")
            fields[key] = (int(offset), int(nbytes))
        else:
            constants[key] = int(value)
    return fields, constants, size


def check_abi(text: str, struct: type[ctypes.Structure] = Bucket) -> dict[str, int]:
    """Compare the library's ABI text with ``struct``; return its constants or raise :class:`KernelError`."""
    fields, constants, size = parse_abi(text)
    ours = {name: (getattr(struct, name).offset, getattr(struct, name).size) for name, _ in struct._fields_}
    problems = [f"struct size {size} != {ctypes.sizeof(struct)}"] if size != ctypes.sizeof(struct) else []
    problems += [f"field {k}: library {fields.get(k)} != python {v}" for k, v in ours.items() if fields.get(k) != v]
    problems += [f"field {k} is unknown to python" for k in fields.keys() - ours.keys()]
    if problems:
        raise KernelError("kernel ABI mismatch: " + "; ".join(problems[:4]))
    return constants


def _load(target: Path, entry_points: tuple[str, ...]) -> Kernel:
    lib = ctypes.CDLL(str(target))
    lib.lamb_abi.restype = ctypes.c_char_p
    constants = check_abi(lib.lamb_abi().decode())
    for name in entry_points:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(Bucket)]
        fn.restype = ctypes.c_int
    return Kernel(lib, constants, target)


def load_kernel(floor: bool = False) -> Kernel | None:
    """The verified kernel (built on first use), or None when it cannot be had (see :func:`kernel_status`).

    ``floor=True`` gives the benchmark's own build (``-DLAMB_FLOOR``), which adds ``lamb_stream``.
    """
    if floor in _loaded:
        return _loaded[floor]
    with _lock:
        if floor in _loaded:
            return _loaded[floor]
        t0 = time.perf_counter()
        kernel = None
        try:
            kernel = _build_and_load(floor)
        except (OSError, KernelError, AttributeError) as err:
            _failures[floor] = str(err) or type(err).__name__
        _seconds[floor] = time.perf_counter() - t0
        _loaded[floor] = kernel
    return kernel


def _build_and_load(floor: bool) -> Kernel:
    cc = compiler()
    if cc is None:
        raise KernelError(_no_compiler_reason())
    flags = FLAGS + (["-DLAMB_FLOOR"] if floor else [])
    recipe = " ".join([cc, *flags, cpu_identity()]).encode()
    key = hashlib.sha256(SOURCE.read_bytes() + recipe).hexdigest()[:16]
    target = cache_dir() / f"lamb_{'floor' if floor else 'kernel'}_{key}.so"
    if not verified(target):  # missing, or not the bytes that were built: (re)build once
        build_kernel(target, cc, flags)
        if not verified(target):
            raise KernelError(f"the library at {target} does not match its digest after a rebuild")
    return _load(target, ENTRY_POINTS + (FLOOR_ENTRY_POINTS if floor else ()))


def kernel_status() -> KernelStatus:
    """Whether the CPU kernel is usable (building it if it was never tried), where it lives, and why not."""
    kernel = load_kernel()
    return KernelStatus(
        available=kernel is not None,
        reason=None if kernel is not None else _failures.get(False),
        path=str(kernel.path) if kernel is not None else None,
        compiler=compiler(),
        seconds=_seconds.get(False, 0.0),
        float16=kernel is not None and "DT_F16" in kernel.constants,
    )


def reset() -> None:
    """Forget what was loaded or failed, so the next :func:`load_kernel` tries again (tests, new $CC)."""
    with _lock:
        _loaded.clear()
        _failures.clear()
        _seconds.clear()
