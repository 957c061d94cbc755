"""Interchangeable backends behind one small protocol, and the one place that picks them.

Each backend runs the whole Keras pipeline for a bucket (unscale, accumulate, clip, decay, LAMB,
EMA, master copy), reading every scalar from the call's :class:`~torch_lamb.plan.StepPlan`:

* ``reference``: Keras's literal per-tensor form, the spec every other backend is tested against;
* ``foreach``: the same pipeline in ``torch._foreach_*`` ops (any device, no host sync);
* ``fused``: the CPU kernel (``lamb_kernel.c``), which folds the pipeline into its two passes;
* ``compiled``: the reference math as two bucket functions under ``torch.compile`` (opt-in).

``implementation="auto"`` takes the first of :data:`AUTO_ORDER` that accepts a bucket; an explicit
choice that a bucket cannot take raises a ``ValueError`` naming the parameters, device, dtype and
reason, as torch does for ``fused=True`` on an unsupported device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from ..functional import TrustStats
from . import compiled, cpu_kernel, foreach, reference, triton

if TYPE_CHECKING:
    from ..layout import Bucket
    from ..optimizer import Lamb
    from ..plan import StepPlan

__all__ = ["AUTO_ORDER", "BACKENDS", "IMPLEMENTATIONS", "Backend", "select"]


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

    # Optional: ``ready(bucket, grads, plan, clip_factors)``, called for every bucket before any update of
    # the call, for work that may fail and must change nothing (the compiled backend compiles there).

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
AUTO_ORDER = ("fused", "foreach")
_warned: set[str] = set()


def select(bucket: Bucket, opt: Lamb) -> tuple[Backend, Any]:
    """The backend for ``bucket`` and its prepared handle (raises for an explicit choice it cannot honour)."""
    choice = opt.implementation
    for name in AUTO_ORDER if choice == "auto" else (choice,):
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
            _warn_once(cpu_kernel.unavailable)
    raise AssertionError("the foreach backend accepts every bucket")


def _warn_once(why: Callable[[], str | None]) -> None:
    """Under "auto": one warning per process when the CPU kernel exists for a bucket but cannot be built."""
    reason = why()
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"torch_lamb: the CPU kernel is unavailable ({reason}); CPU parameters take the slower foreach "
            f"backend. To fix: {cpu_kernel.FIX_HINT}. torch_lamb.kernel_status() reports the kernel's state.",
            RuntimeWarning,
            stacklevel=4,
        )
