"""Interchangeable backends behind one small protocol, and the one place that picks them.

Each backend runs the whole Keras pipeline for a bucket (unscale, accumulate, clip, decay, LAMB,
EMA, master copy), reading every scalar from the call's :class:`~torch_lamb.plan.StepPlan`:

* ``reference``: Keras's literal per-tensor form, the spec every other backend is tested against;
* ``foreach``: the same pipeline in ``torch._foreach_*`` ops (any device, no host sync);
* ``fused``: the CPU kernel (``lamb_kernel.c``), which folds the pipeline into its two passes;
* ``compiled``: the reference math as two bucket functions under ``torch.compile`` (the CUDA default);
* ``triton``: the C kernel's two passes as Triton kernels over a chunk table (opt-in, CUDA).

``implementation="auto"`` takes the first of :data:`AUTO_ORDER` (CPU tensors) or :data:`CUDA_AUTO_ORDER`
(CUDA tensors: ``compiled``, for buckets of at most :data:`AUTO_COMPILED_MAX_ENTRIES` entries) that
accepts a bucket, and ``foreach`` where a first-use compile fails. ``fused`` follows torch's ``fused=True`` on
the CPU: the kernel where it applies, ``foreach`` (the same numbers) for the float64, strided or capturable
buckets that torch's fused kernels also take; on another device it raises torch's ``RuntimeError``. Any other
explicit choice that a bucket cannot take raises a ``ValueError`` naming the parameter, device, dtype and reason.
"""

from __future__ import annotations

import warnings

from ..bucket import Backend, Bucket
from ..config import IMPLEMENTATIONS, LambConfig
from . import compiled, cpu_kernel, foreach, reference, triton

__all__ = ["AUTO_COMPILED_MAX_ENTRIES", "AUTO_ORDER", "BACKENDS", "CUDA_AUTO_ORDER", "IMPLEMENTATIONS", "Backend",
           "fall_back", "reset_fallbacks", "select"]

BACKENDS: dict[str, Backend] = {
    "reference": reference.ReferenceBackend(),
    "foreach": foreach.ForeachBackend(),
    "fused": cpu_kernel.CpuKernelBackend(),
    "compiled": compiled.CompiledBackend(),
    "triton": triton.TritonBackend(),
}
assert set(IMPLEMENTATIONS) == {"auto", *BACKENDS}, "config.IMPLEMENTATIONS names the backends"
AUTO_ORDER = ("fused", "foreach")  # CPU tensors: the C kernel
FUSED_ORDER = ("fused", "foreach")  # as torch's fused=True on CPU: float64, strided or capturable buckets too
CUDA_AUTO_ORDER = ("compiled", "foreach")  # GPU tensors: inductor's fused Triton kernels, compiled at first use
# Under "auto", "compiled" takes a bucket of at most this many entries: its first-use compile grows with them
# (about 100 s for BERT-base's 200 on a CPU), and a model of thousands of small tensors is better on foreach.
AUTO_COMPILED_MAX_ENTRIES = 512
_warned: set[str] = set()
_failed: set[tuple[str, str]] = set()  # (backend, device type) whose compile failed under "auto"


def select(bucket: Bucket, config: LambConfig) -> tuple[Backend, object]:
    """The backend for ``bucket`` and its prepared handle (raises for an explicit choice it cannot honour)."""
    choice = config.implementation
    if choice == "fused" and bucket.device.type != "cpu":
        raise RuntimeError(  # torch's wording for fused=True on a device its fused kernels do not cover
            f"`fused=True` requires all the params to be floating point Tensors of supported devices: ['cpu']. "
            f"Received: parameter {bucket.names[0]!r} on {bucket.device} (torch_lamb's fused backend is its CPU "
            "kernel; on CUDA use implementation='compiled' or 'triton').")
    if choice == "fused" and cpu_kernel.unavailable() is None:
        order: tuple[str, ...] = FUSED_ORDER
    elif choice != "auto":
        order = (choice,)
    elif bucket.device.type == "cuda" and len(bucket.weights) <= AUTO_COMPILED_MAX_ENTRIES:
        order = CUDA_AUTO_ORDER
    else:
        order = AUTO_ORDER
    for name in order:
        if choice == "auto" and (name, bucket.device.type) in _failed:
            continue  # its first-use compile failed in this process (fall_back warned)
        backend = BACKENDS[name]
        reason = backend.refuses(bucket, config)
        if reason is None:
            return backend, backend.prepare(bucket)
        if choice != "auto" and name == order[-1]:
            p = bucket.owners[0]
            raise ValueError(
                f"implementation={choice!r} cannot update parameter {bucket.names[0]!r} (device {p.device}, "
                f"dtype {p.dtype}): {reason}. Use implementation='auto' to fall back to 'foreach' there."
            )
        if name == "fused" and bucket.device.type == "cpu":
            _warn_once(cpu_kernel.unavailable(), _KERNEL_MISSING)
    raise AssertionError("the foreach backend accepts every bucket")


_KERNEL_MISSING = (
    "torch_lamb: the CPU kernel is unavailable ({reason}); CPU parameters take the slower foreach backend. "
    f"To fix: {cpu_kernel.FIX_HINT}. torch_lamb.kernel_status() reports the kernel's state."
)


def fall_back(bucket: Bucket, err: Exception) -> None:
    """Under "auto", a bucket whose first-use compile failed takes ``foreach`` from then on (and so do the later
    layouts' buckets of that backend on that device type, in this process), with one warning."""
    name = bucket.backend.name if bucket.backend is not None else "?"
    _failed.add((name, bucket.device.type))
    bucket.backend, bucket.handle = BACKENDS["foreach"], None
    _warn_once(f"{name!r} failed to compile ({type(err).__name__}: {err})",
               "torch_lamb: {reason}; those parameters take the foreach backend.")


def reset_fallbacks() -> None:
    """Forget, in this process, which backends failed to compile under "auto" and which warnings were given:
    the next layout tries them again (after installing a compiler, say)."""
    _failed.clear()
    _warned.clear()


def _warn_once(reason: str | None, message: str) -> None:
    """Under "auto": one warning per process and reason when buckets fall back to foreach."""
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        warnings.warn(message.replace("{reason}", reason), RuntimeWarning, stacklevel=5)
