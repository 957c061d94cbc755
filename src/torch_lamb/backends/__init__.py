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
accepts a bucket, and ``foreach`` where a first-use compile fails; an explicit
choice that a bucket cannot take raises a ``ValueError`` naming the parameters, device, dtype and
reason, as torch does for ``fused=True`` on an unsupported device.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from ..functional import TrustStats
from . import compiled, cpu_kernel, foreach, reference, triton

if TYPE_CHECKING:
    from ..layout import Bucket
    from ..optimizer import Lamb
    from ..plan import StepPlan

__all__ = ["AUTO_COMPILED_MAX_ENTRIES", "AUTO_ORDER", "BACKENDS", "CUDA_AUTO_ORDER", "IMPLEMENTATIONS", "Backend",
           "make_ready", "select"]


class Backend(Protocol):
    """What a backend provides. ``grads`` are the bucket's gradients as found in ``.grad``."""

    name: str

    def refuses(self, bucket: Bucket, opt: Lamb) -> str | None:
        """Why this backend cannot run ``bucket`` (None: it can)."""

    def prepare(self, bucket: Bucket) -> Any:
        """A view of the bucket built once per layout (the bucket's ``handle``)."""

    def accumulate(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> None:
        """A micro-step: ``acc += g / loss_scale``."""

    def grad_squares(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> Tensor:
        """Per tensor, the local sum of squares (float32) of the gradient the update uses, before clipping."""

    def update(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan, clip_factors: Tensor | None) -> TrustStats:
        """The update: pipeline, LAMB (calling ``bucket.reduce`` between its passes), EMA, master copy."""

    def ema(self, bucket: Bucket, plan: StepPlan) -> None:
        """Move the averages toward the weights (a call that does not update this bucket)."""

    # Optional: ``ready(bucket, grads, plan, clipping)``, called for every bucket of an update before any norm
    # is measured or bucket written, for work that may fail and must change nothing (the compiling backends
    # compile there); ``clipping``: the update will take per-entry clip factors.

    def bad_gradients(self, bucket: Bucket, grads: list[Tensor], limit: float) -> Tensor:
        """A 0-dim float count of local tensors holding NaN or a value of magnitude >= ``limit``
        (``skip_nonfinite``'s check; reading it is the guard's business)."""


BACKENDS: dict[str, Backend] = {
    "reference": reference.ReferenceBackend(),
    "foreach": foreach.ForeachBackend(),
    "fused": cpu_kernel.CpuKernelBackend(),
    "compiled": compiled.CompiledBackend(),
    "triton": triton.TritonBackend(),
}
IMPLEMENTATIONS = ("auto", *BACKENDS)
AUTO_ORDER = ("fused", "foreach")  # CPU tensors: the C kernel
CUDA_AUTO_ORDER = ("compiled", "foreach")  # GPU tensors: inductor's fused Triton kernels, compiled at first use
# Under "auto", "compiled" takes a bucket of at most this many entries: its first-use compile grows with them
# (about 100 s for BERT-base's 200 on a CPU), and a model of thousands of small tensors is better on foreach.
AUTO_COMPILED_MAX_ENTRIES = 512
_warned: set[str] = set()
_failed: set[tuple[str, str]] = set()  # (backend, device type) whose compile failed under "auto"


def select(bucket: Bucket, opt: Lamb) -> tuple[Backend, Any]:
    """The backend for ``bucket`` and its prepared handle (raises for an explicit choice it cannot honour)."""
    choice = opt.implementation
    if choice != "auto":
        order: tuple[str, ...] = (choice,)
    elif bucket.device.type == "cuda" and len(bucket.weights) <= AUTO_COMPILED_MAX_ENTRIES:
        order = CUDA_AUTO_ORDER
    else:
        order = AUTO_ORDER
    for name in order:
        if choice == "auto" and (name, bucket.device.type) in _failed:
            continue  # its first-use compile failed in this process (make_ready warned)
        backend = BACKENDS[name]
        reason = backend.refuses(bucket, opt)
        if reason is None:
            return backend, backend.prepare(bucket)
        if choice != "auto":
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


def make_ready(buckets: Sequence[Bucket], grads: Sequence[list[Tensor]], plan: StepPlan, opt: Lamb) -> None:
    """Every bucket's first-use work (the compiling backends compile their graphs or kernels, the clipping
    norms' included) before any bucket of the call is measured or written.

    Under "auto" a bucket whose compile fails takes ``foreach`` from then on, with one warning: "auto" never
    asked for a compiler. An explicit choice raises, having changed nothing.
    """
    clipping = plan.clip.kind in ("norm", "global")  # the update multiplies by per-entry factors
    for bucket, bucket_grads in zip(buckets, grads):
        ready = getattr(bucket.backend, "ready", None)
        if ready is None:
            continue
        try:
            ready(bucket, bucket_grads, plan, clipping)
        except Exception as err:
            if opt.implementation != "auto":
                raise
            name = bucket.backend.name if bucket.backend is not None else "?"
            _failed.add((name, bucket.device.type))  # later layouts skip it there: no compile retried per rebuild
            bucket.backend, bucket.handle = BACKENDS["foreach"], None
            _warn_once(f"{name!r} failed to compile ({type(err).__name__}: {err})",
                       "torch_lamb: {reason}; those parameters take the foreach backend.")


def _warn_once(reason: str | None, message: str) -> None:
    """Under "auto": one warning per process and reason when buckets fall back to foreach."""
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        warnings.warn(message.replace("{reason}", reason), RuntimeWarning, stacklevel=4)
