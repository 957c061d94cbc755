"""A fused two-pass LAMB step for float32 CPU tensors (a small C kernel compiled at first use).

The kernel (``_lamb_kernel.c`` beside this file) is compiled with the system C compiler
(``$CC`` or ``gcc``; ``-O3 -march=native -fopenmp``) the first time it is needed, and cached by
source hash under ``${TORCH_LAMB_CACHE_DIR:-~/.cache/torch_lamb}`` (written to a temporary name
then renamed, so concurrent processes are safe). Nothing is compiled at import.

Pass 1 reads p, g, m, v, writes m, v and sums ``||w||^2`` and ``||u||^2`` per tensor in double;
the trust ratios are then formed in torch (after the optional ``reduce`` of the packed squared
norms, so sharded parameters stay exact); pass 2 re-forms u from the new m, v and writes p.

Covered: CPU, contiguous, float32 params, grads and moments, with host (Python float) scalars.
Anything else (CUDA, float64, float16/bfloat16 params or grads (master weights included), non-contiguous tensors,
device-tensor scalars as ``skip_nonfinite`` uses, no compiler) falls back to the foreach path
(:func:`torch_lamb.functional.lamb_update`) with identical semantics.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import torch
from torch import Tensor

from .distributed import Reducer
from .functional import LambScalars, TrustStats, lamb_update, trust_ratio

__all__ = ["available", "compile_seconds", "fused_lamb_update", "kernel_supports", "load_kernel"]

_SOURCE = Path(__file__).with_name("_lamb_kernel.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_compile_s: float = 0.0

_PP = ctypes.POINTER(ctypes.c_void_p)
_MIN_PER_THREAD = 1 << 16


def cache_dir() -> Path:
    """Where compiled kernels live: ``$TORCH_LAMB_CACHE_DIR`` or ``~/.cache/torch_lamb``."""
    root = os.environ.get("TORCH_LAMB_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_lamb"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


def _build(target: Path, cc: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True)
        os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel (compiling it on first use), or None when it cannot be built."""
    global _lib, _failed, _compile_s
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        t0 = time.perf_counter()
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set $CC)")
            key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc, *_FLAGS]).encode()).hexdigest()[:16]
            target = cache_dir() / f"lamb_kernel_{key}.so"
            if not target.exists():
                _build(target, cc)
            lib = ctypes.CDLL(str(target))
            lib.lamb_pass1.argtypes = [ctypes.c_int, _PP, _PP, _PP, _PP, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            lib.lamb_pass2.argtypes = [ctypes.c_int, _PP, _PP, _PP, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            lib.lamb_pass1.restype = lib.lamb_pass2.restype = ctypes.c_int
            _lib = lib
        except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            _failed = f"{err} {detail.decode(errors='replace')[:500]}".strip()
        _compile_s = time.perf_counter() - t0
    return _lib


def available() -> bool:
    """Whether the fused CPU kernel can be used (compiles it on first call)."""
    return load_kernel() is not None


def compile_seconds() -> float:
    """Seconds the first :func:`load_kernel` took (compile or cache hit, plus load)."""
    return _compile_s


def kernel_supports(params: Sequence[Tensor], grads: Sequence[Tensor], momentums: Sequence[Tensor],
                    velocities: Sequence[Tensor]) -> bool:
    """Whether a bucket is covered by the kernel: CPU, contiguous float32 throughout."""
    f32 = torch.float32
    for ts in (params, grads, momentums, velocities):
        for t in ts:
            if t.dtype != f32 or t.device.type != "cpu" or not t.is_contiguous():
                return False
    return True


def _ptrs(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def fused_lamb_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentums: Sequence[Tensor],
    velocities: Sequence[Tensor],
    scalars: LambScalars,
    *,
    decay_mask: Sequence[bool],
    adapt_mask: Sequence[bool] | None = None,
    reduce: Reducer | None = None,
) -> TrustStats:
    """:func:`~torch_lamb.functional.lamb_update` with the fused kernel where it applies."""
    if not params:
        return lamb_update(params, grads, momentums, velocities, scalars, decay_mask=decay_mask,
                           adapt_mask=adapt_mask, reduce=reduce)
    # device-tensor scalars (skip_nonfinite) stay on the foreach path: reading them would be a host read
    host = not any(isinstance(getattr(scalars, f.name), Tensor) for f in fields(scalars))
    lib = load_kernel() if host and params[0].device.type == "cpu" else None
    if lib is None or not kernel_supports(params, grads, momentums, velocities):
        return lamb_update(params, grads, momentums, velocities, scalars, decay_mask=decay_mask,
                           adapt_mask=adapt_mask, reduce=reduce)
    n = len(params)
    s = scalars
    sc = torch.tensor([
        s.one_minus_beta_1, s.one_minus_beta_2, s.bias_correction_1, s.bias_correction_2, s.epsilon,
        s.decay_factor if s.decay_factor is not None else 1.0,
        s.adaptive_weight_decay if s.adaptive_weight_decay is not None else 0.0,
        float(s.decay_factor is not None), float(s.adaptive_weight_decay is not None),
    ], dtype=torch.float32)
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    dmask = torch.tensor(list(decay_mask), dtype=torch.uint8)
    sums = torch.empty(2 * n, dtype=torch.float64)
    pp, mp, vp = _ptrs(params), _ptrs(momentums), _ptrs(velocities)
    # below ~64K elements per thread, waking OpenMP workers costs more than it saves
    threads = max(1, min(torch.get_num_threads(), int(sizes.sum()) // _MIN_PER_THREAD))
    rc = lib.lamb_pass1(n, pp, _ptrs(grads), mp, vp, sizes.data_ptr(), dmask.data_ptr(), sc.data_ptr(),
                        sums.data_ptr(), threads)
    if rc != 0:
        raise MemoryError("torch_lamb fused kernel: allocation failed in pass 1")
    squares = sums.to(torch.float32)
    if reduce is not None:
        squares = reduce(squares)
    norms = torch.sqrt(squares)
    weight_norm, update_norm = norms[:n], norms[n:]
    ratio = trust_ratio(weight_norm, update_norm, scalars, adapt_mask)
    scale = (ratio * s.lr).to(torch.float32).contiguous()
    rc = lib.lamb_pass2(n, pp, mp, vp, sizes.data_ptr(), dmask.data_ptr(), sc.data_ptr(), scale.data_ptr(),
                        threads)
    if rc != 0:
        raise MemoryError("torch_lamb fused kernel: allocation failed in pass 2")
    return TrustStats(weight_norm, update_norm, ratio)
