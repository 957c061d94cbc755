"""A fused LAMB step for CPU tensors (a small C kernel compiled at first use).

The kernel (``_lamb_kernel.c`` beside this file) is compiled with the system C compiler
(``$CC`` or ``gcc``; ``-O3 -march=native -fopenmp``) the first time it is needed, and cached by
hash of the source, compiler, flags and CPU under ``${TORCH_LAMB_CACHE_DIR:-~/.cache/torch_lamb}``
(written to a temporary name then renamed, so concurrent processes are safe). Nothing is compiled at
import.

Pass 1 reads p, g, m, v, writes m, v and sums ``||w||^2`` and ``||u||^2`` per tensor in double;
pass 2 re-forms u from the new m, v and writes p. Whole tensors run segment by segment (pass 2
finds a segment still in cache) with the trust ratios formed in the kernel; sharded tensors run
pass 1 over the bucket, sum the packed squared norms across ranks with ``reduce``, form the ratios
in torch and run pass 2. The optimizer's gradient pipeline (unscale, accumulate, clip) folds into
pass 1 through :class:`GradientPipeline`, and the moving average into pass 2 through
:class:`MovingAverage`, so an update with every Keras feature on streams each tensor once per pass.

Covered: CPU, contiguous tensors with float32 state (moments, accumulators, averages) and host
(Python float) scalars; parameters and gradients in float32, bfloat16 or float16 (float16 where the
compiler has ``_Float16``), widened to float32 a chunk at a time, with a low-precision parameter (or
the low-precision copy of a float32 master) rounded once per step. Anything else (CUDA, float64,
non-contiguous tensors, device-tensor scalars as ``skip_nonfinite`` uses, no compiler) takes the
foreach path (:func:`torch_lamb.functional.lamb_update`) with the same semantics;
:func:`kernel_supports` and :func:`kernel_dtype` say which.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from .distributed import Reducer
from .functional import LambScalars, TrustStats, lamb_update, trust_ratio

__all__ = [
    "GradientPipeline", "KernelBucket", "MovingAverage", "available", "compile_seconds", "fused_ema",
    "fused_lamb_update", "kernel_supports", "load_kernel",
]

_SOURCE = Path(__file__).with_name("_lamb_kernel.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_compile_s: float = 0.0

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # float16: 2, added when the kernel has _Float16
_MIN_PER_THREAD = 1 << 16  # below ~64K elements per thread, waking OpenMP workers costs more than it saves
_SEGMENT_BYTES = 8 << 20  # pass 2 re-reads a segment of this many bytes (all streams) from cache

# flags of the kernel's Bucket (keep in step with _lamb_kernel.c)
F_DECAY, F_ADAPTIVE_DECAY, F_MIN_RATIO, F_MAX_RATIO = 1, 2, 4, 8
F_LOSS_SCALE, F_ACCUMULATE, F_CLIPVALUE, F_CLIP_FACTORS, F_EMA, F_MIRROR = 16, 32, 64, 128, 256, 512


class _Bucket(ctypes.Structure):
    """The kernel's ``Bucket`` (field for field)."""

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
    ]


_ENTRY_POINTS = (
    "lamb_fused", "lamb_pass1", "lamb_pass2", "lamb_grad_sums", "lamb_accumulate", "lamb_ema", "lamb_stream",
)


@dataclass
class GradientPipeline:
    """How pass 1 forms each gradient, in Keras's order (each step optional).

    ``t = g / loss_scale``; ``t = (acc + t) / accumulation_steps`` (then ``acc`` is zeroed);
    ``t = clamp(t, -clipvalue, clipvalue)``; ``t = t * clip_factors[i]`` (clipnorm, global_clipnorm).
    ``accumulators`` is read by :func:`fused_lamb_update`; a :class:`KernelBucket` uses its own.
    """

    loss_scale: float | None = None
    accumulators: Sequence[Tensor] | None = None
    accumulation_steps: int | None = None
    clipvalue: float | None = None
    clip_factors: Tensor | None = None  # float32, one per tensor


@dataclass
class MovingAverage:
    """``avg = lerp(avg, p, weight)`` after p moves (Keras's ``use_ema``)."""

    averages: Sequence[Tensor]
    weight: float


def cache_dir() -> Path:
    """Where compiled kernels live: ``$TORCH_LAMB_CACHE_DIR`` or ``~/.cache/torch_lamb``."""
    root = os.environ.get("TORCH_LAMB_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_lamb"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


def _cpu_identity() -> str:
    """The CPU's model and feature flags: ``-march=native`` code is cached per CPU, so a cache dir
    shared between machines (an NFS home) never hands one an instruction set it lacks."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in f) if k.strip()}
        return f"{lines.get('model name', '')} {lines.get('flags', lines.get('Features', ''))}"
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


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
            recipe = " ".join([cc, *_FLAGS, _cpu_identity()]).encode()
            key = hashlib.sha256(_SOURCE.read_bytes() + recipe).hexdigest()[:16]
            target = cache_dir() / f"lamb_kernel_{key}.so"
            if not target.exists():
                _build(target, cc)
            lib = ctypes.CDLL(str(target))
            for name in _ENTRY_POINTS:
                fn = getattr(lib, name)
                fn.argtypes = [ctypes.POINTER(_Bucket)]
                fn.restype = ctypes.c_int
            lib.lamb_has_float16.restype = ctypes.c_int
            if lib.lamb_has_float16():
                _DTYPE_CODES[torch.float16] = 2
            _lib = lib
        except (OSError, RuntimeError, AttributeError, subprocess.CalledProcessError) as err:
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


def _covered(tensors: Sequence[Tensor], dtype: torch.dtype) -> bool:
    return (all([t.dtype is dtype for t in tensors]) and all([t.is_cpu for t in tensors])
            and all([t.is_contiguous() for t in tensors]))


def kernel_supports(*tensor_lists: Sequence[Tensor]) -> bool:
    """Whether the kernel covers these tensors as state: CPU, contiguous float32 throughout."""
    return all(_covered(ts, torch.float32) for ts in tensor_lists)


def kernel_dtype(tensors: Sequence[Tensor]) -> torch.dtype | None:
    """The dtype the kernel reads these parameters or gradients in (float32, bfloat16, or float16
    where the compiler has ``_Float16``), or None when they are not all of it, CPU and contiguous."""
    if not tensors or load_kernel() is None:
        return None
    dtype = tensors[0].dtype
    return dtype if dtype in _DTYPE_CODES and _covered(tensors, dtype) else None


def _ptrs(tensors: Sequence[Tensor]) -> array.array:
    """The tensors' data pointers as a C array of int64 (``_addr`` gives its address)."""
    return array.array("q", [t.data_ptr() for t in tensors])


def _addr(pointers: array.array) -> int:
    return pointers.buffer_info()[0]


def _threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // _MIN_PER_THREAD))


class KernelBucket:
    """The kernel's view of one bucket: sizes, masks and state pointers, built once and reused.

    The optimizer keeps one per bucket while its layout holds; each call passes the tensors that
    may change between steps (parameters, gradients). Every tensor must have the element count
    of the matching momentum (the optimizer checks shapes; :func:`fused_lamb_update` checks here).
    """

    def __init__(
        self,
        momentums: Sequence[Tensor],
        velocities: Sequence[Tensor],
        *,
        decay_mask: Sequence[bool],
        adapt_mask: Sequence[bool] | None = None,
        accumulators: Sequence[Tensor] = (),
        averages: Sequence[Tensor] = (),
    ) -> None:
        self.n = len(momentums)
        self.numels = [m.numel() for m in momentums]
        self.sizes = torch.tensor(self.numels, dtype=torch.int64)
        self.numel = sum(self.numels)
        self.decay_mask = torch.tensor(list(decay_mask), dtype=torch.uint8)
        self.adapt_list = None if adapt_mask is None else list(adapt_mask)
        self.adapt_mask = None if adapt_mask is None else torch.tensor(self.adapt_list, dtype=torch.uint8)
        self.tensors = (list(momentums), list(velocities), list(accumulators), list(averages))  # kept alive
        self.m, self.v = _ptrs(momentums), _ptrs(velocities)
        self.acc = _ptrs(accumulators) if accumulators else None
        self.avg = _ptrs(averages) if averages else None

    def _struct(
        self, params: Sequence[Tensor] | None, grads: Sequence[Tensor] | None, param_ptrs: array.array | None = None
    ) -> tuple[_Bucket, list[object]]:
        """The call's struct (a pass that reads no p or no g gets None for it), and what must outlive it."""
        b = _Bucket()
        keep: list[object] = []
        if params is not None:
            keep.append(ptrs := param_ptrs if param_ptrs is not None else _ptrs(params))
            b.p, b.p_dtype = _addr(ptrs), _DTYPE_CODES[params[0].dtype]
        if grads is not None:
            keep.append(ptrs := _ptrs(grads))
            b.g, b.g_dtype = _addr(ptrs), _DTYPE_CODES[grads[0].dtype]
        b.n, b.m, b.v = self.n, _addr(self.m), _addr(self.v)
        b.sizes, b.decay_mask = self.sizes.data_ptr(), self.decay_mask.data_ptr()
        if self.adapt_mask is not None:
            b.adapt_mask = self.adapt_mask.data_ptr()
        b.nthreads = _threads(self.numel)
        return b, keep

    def _pipeline(self, b: _Bucket, keep: list[object], pipe: GradientPipeline | None) -> None:
        if pipe is None:
            return
        _options(b, (F_LOSS_SCALE, "loss_scale", pipe.loss_scale), (F_CLIPVALUE, "clipvalue", pipe.clipvalue))
        if pipe.accumulation_steps is not None:
            if self.acc is None:
                raise ValueError("GradientPipeline: accumulation needs the bucket's accumulators.")
            b.flags |= F_ACCUMULATE
            b.accumulation_steps = pipe.accumulation_steps
            b.acc = _addr(self.acc)
        if pipe.clipvalue is not None and pipe.clip_factors is not None:
            raise ValueError("GradientPipeline: give `clipvalue` or `clip_factors`, not both.")
        if pipe.clip_factors is not None:
            factors = pipe.clip_factors.to(torch.float32).expand(self.n).contiguous()
            keep.append(factors)
            b.flags |= F_CLIP_FACTORS
            b.clip_factors = factors.data_ptr()

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        scalars: LambScalars,
        *,
        reduce: Reducer | None = None,
        pipeline: GradientPipeline | None = None,
        average: MovingAverage | None = None,
        mirrors: Sequence[Tensor] | None = None,
        param_ptrs: array.array | None = None,
    ) -> TrustStats:
        """One LAMB update of the bucket (host scalars only).

        ``params`` and ``grads`` may be bfloat16/float16 (:func:`kernel_dtype`); ``mirrors``: the
        low-precision copies of float32 master ``params``, rounded from them in pass 2;
        ``param_ptrs``: ``params``' data pointers when the caller already read them this step.
        """
        s, n = scalars, self.n
        b, keep = self._struct(params, grads, param_ptrs)
        if mirrors:
            keep.append(mirror_ptrs := _ptrs(mirrors))
            b.flags |= F_MIRROR
            b.mirror, b.mirror_dtype = _addr(mirror_ptrs), _DTYPE_CODES[mirrors[0].dtype]
        b.beta_1c, b.beta_2c, b.eps, b.lr = s.one_minus_beta_1, s.one_minus_beta_2, s.epsilon, s.lr
        b.bc1, b.bc2 = s.bias_correction_1, s.bias_correction_2
        _options(b, (F_DECAY, "decay", s.decay_factor), (F_ADAPTIVE_DECAY, "adaptive_decay", s.adaptive_weight_decay),
                 (F_MIN_RATIO, "min_ratio", s.min_trust_ratio), (F_MAX_RATIO, "max_ratio", s.max_trust_ratio))
        self._pipeline(b, keep, pipeline)
        if average is not None:
            if self.avg is None:
                raise ValueError("MovingAverage: the bucket was built without averages.")
            b.flags |= F_EMA
            b.ema_weight = average.weight
            b.avg = _addr(self.avg)
        sums = torch.empty(2 * n, dtype=torch.float64)
        b.sums = sums.data_ptr()
        if reduce is None:
            ratio = torch.empty(n, dtype=torch.float32)
            b.ratios = ratio.data_ptr()
            streams = 4 + (b.flags & F_ACCUMULATE != 0) + (b.flags & F_EMA != 0)
            b.segment = max(1, _SEGMENT_BYTES // (4 * streams))
            _run("lamb_fused", b)
            norms = torch.sqrt(sums.to(torch.float32))
            return TrustStats(norms[:n], norms[n:], ratio)
        _run("lamb_pass1", b)
        norms = torch.sqrt(reduce(sums.to(torch.float32)))
        weight_norm, update_norm = norms[:n], norms[n:]
        ratio = trust_ratio(weight_norm, update_norm, scalars, self.adapt_list)
        scale = (ratio * s.lr).to(torch.float32).contiguous()
        b.scale = scale.data_ptr()
        _run("lamb_pass2", b)
        return TrustStats(weight_norm, update_norm, ratio)

    def gradient_squares(self, grads: Sequence[Tensor], pipeline: GradientPipeline) -> Tensor:
        """Per tensor, the sum of squares (float64) of the gradients ``pipeline`` forms, before clipping."""
        b, keep = self._struct(None, grads)
        self._pipeline(b, keep, GradientPipeline(pipeline.loss_scale, None, pipeline.accumulation_steps))
        sums = torch.empty(2 * self.n, dtype=torch.float64)
        b.sums = sums.data_ptr()
        _run("lamb_grad_sums", b)
        return sums[: self.n]

    def accumulate(self, grads: Sequence[Tensor], loss_scale: float | None) -> None:
        """``acc += g`` (``g / loss_scale`` with a loss scale), in one pass."""
        b, _keep = self._struct(None, grads)
        b.acc = _addr(self.acc)
        _options(b, (F_LOSS_SCALE, "loss_scale", loss_scale))
        _run("lamb_accumulate", b)


    def stream(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """The benchmark's floor: the update's passes, segments and bytes, without the arithmetic.

        Adds g to the momentums and subtracts it from the velocities (the bucket's own scratch
        state, not an optimizer's); the parameters are rewritten unchanged.
        """
        b, _keep = self._struct(params, grads)
        sums, ratios = torch.empty(2 * self.n, dtype=torch.float64), torch.empty(self.n, dtype=torch.float32)
        b.sums, b.ratios, b.segment = sums.data_ptr(), ratios.data_ptr(), max(1, _SEGMENT_BYTES // 16)
        _run("lamb_stream", b)

    def ema(self, params: Sequence[Tensor], weight: float, param_ptrs: array.array | None = None) -> None:
        """``avg = lerp(avg, p, weight)`` over the bucket's averages, in one pass."""
        b, _keep = self._struct(params, None, param_ptrs)
        b.avg, b.ema_weight = _addr(self.avg), weight
        _run("lamb_ema", b)


def _options(b: _Bucket, *options: tuple[int, str, float | None]) -> None:
    """For each ``(flag, field, value)`` with a value: set the flag and the field."""
    for flag, name, value in options:
        if value is not None:
            b.flags |= flag
            setattr(b, name, value)


def _run(name: str, b: _Bucket) -> None:
    if getattr(load_kernel(), name)(ctypes.byref(b)) != 0:
        raise MemoryError(f"torch_lamb fused kernel: allocation failed in {name}")


def _check_sizes(numels: list[int], *tensor_lists: Sequence[Tensor]) -> None:
    for ts in tensor_lists:
        if ts and [t.numel() for t in ts] != numels:
            raise ValueError("fused_lamb_update: every list needs tensors of the parameters' sizes, in order.")


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
    pipeline: GradientPipeline | None = None,
    average: MovingAverage | None = None,
) -> TrustStats:
    """:func:`~torch_lamb.functional.lamb_update` with the fused kernel where it applies.

    ``pipeline`` and ``average`` fold the gradient pipeline and the moving average into the
    kernel's passes; they need a bucket the kernel covers (check :func:`kernel_supports` on every
    tensor involved first), else this raises.
    """
    host = not any(isinstance(getattr(scalars, f.name), Tensor) for f in fields(scalars))
    accumulators = list(pipeline.accumulators or ()) if pipeline else []
    averages = list(average.averages) if average else []
    covered = host and kernel_dtype(params) is not None and kernel_dtype(grads) is not None
    if not covered or not kernel_supports(momentums, velocities, accumulators, averages):
        if pipeline is not None or average is not None:
            raise ValueError("fused_lamb_update: `pipeline`/`average` need a bucket the kernel covers.")
        return lamb_update(params, grads, momentums, velocities, scalars, decay_mask=decay_mask,
                           adapt_mask=adapt_mask, reduce=reduce)
    bucket = KernelBucket(momentums, velocities, decay_mask=decay_mask, adapt_mask=adapt_mask,
                          accumulators=accumulators, averages=averages)
    _check_sizes(bucket.numels, params, grads, velocities, accumulators, averages)
    if len(decay_mask) != bucket.n or (adapt_mask is not None and len(adapt_mask) != bucket.n):
        raise ValueError("fused_lamb_update: `decay_mask` and `adapt_mask` need one flag per tensor.")
    return bucket.update(params, grads, scalars, reduce=reduce, pipeline=pipeline, average=average)


def fused_ema(averages: Sequence[Tensor], params: Sequence[Tensor], weight: float) -> None:
    """``avg = lerp(avg, p, weight)``, in one pass (tensors of equal sizes, pairwise)."""
    _check_sizes([a.numel() for a in averages], params)
    b = _Bucket()
    sizes = torch.tensor([a.numel() for a in averages], dtype=torch.int64)
    keep = [_ptrs(params), _ptrs(averages)]
    b.n, b.p, b.avg = len(averages), _addr(keep[0]), _addr(keep[1])
    b.sizes, b.nthreads, b.ema_weight = sizes.data_ptr(), _threads(int(sizes.sum())), weight
    _run("lamb_ema", b)
