"""The ``triton`` backend: the C kernel's two passes as Triton kernels over a multi-tensor chunk table.

A bucket's entries are cut once per layout into chunks of :data:`CHUNK` elements; the chunk table
(each chunk's entry and start) and a pointer table per role (weights, moments, accumulators,
averages, low-precision copies) live on the device, so one launch covers every tensor of a bucket:

* **Pass 1** forms each gradient (unscale, accumulate, clip), updates m and v, and writes each
  chunk's partial sums of ``w'²`` and ``u²``, squared and summed in float64 so that finite values
  never overflow (the C kernel's float32 overflow care, with no re-sum needed).
* A small kernel adds the partials up per entry, in chunk order (deterministic, no atomics).
* ``bucket.reduce`` sums them across shards (DTensor), then the trust ratios are formed on the
  device (:func:`~torch_lamb.backends.compiled.trust_ratios`: float32 unless a norm overflows it).
* **Pass 2** re-forms u from the new moments and writes p, its low-precision copy and the average.

Every per-step scalar arrives in the bucket's float32 vector (:class:`ScalarVector`), so a new
learning rate relaunches the same compiled kernel. The feature set, the dtypes and the block sizes
are compile-time constants. A chunk's full blocks run unmasked, and a bucket whose tensors and
gradients are all 16-byte aligned (checked on the host) declares its pointers so (``ALIGNED``): the
compiler then moves them 128 bits at a time. Division and square root are IEEE-rounded (``div_rn``, ``sqrt_rn``),
floating-point contraction is off, and float32 becomes bfloat16 by round-to-nearest-even in the
kernel's own bit arithmetic, so that the results do not depend on the compiler (or on Triton's CPU
interpreter, whose bfloat16 cast truncates).

Triton runs CUDA (and ROCm) tensors; CPU tensors only under its interpreter (``TRITON_INTERPRET=1``),
which is how the tests run it on a machine without a GPU. It is opt-in (``implementation="triton"``):
``"auto"`` takes it once it is measured faster than ``"compiled"`` on a GPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._hints import install_hint
from ..bucket import Bucket
from ..config import LambConfig
from ..functional import LOW_PRECISION, TrustStats
from ..plan import StepPlan
from .common import TorchOpsBackend, narrowed
from .compiled import LR, SCALARS, ScalarVector, scalar_values, trust_ratios
from .foreach import ForeachBackend

__all__ = ["TritonBackend", "interpreted", "unavailable"]

# Elements per program, and per inner step of a program: on a GPU, chunks long enough that the table
# stays small (BERT-large: about 10,000 chunks); under the interpreter, short ones, so that the tests'
# small tensors still span several chunks and blocks.
CHUNK, BLOCK, WARPS = 32768, 2048, 8
INTERPRETED_CHUNK, INTERPRETED_BLOCK = 2048, 1024

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CLIP_CODES = {None: 0, "value": 1, "factors": 2}


def tl_float32() -> Any:
    return kernels().TYPES[torch.float32]


def interpreted() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device_type: str = "cuda") -> str | None:
    """Why the Triton kernels cannot run ``device_type`` tensors here (None when they can)."""
    try:
        import triton  # noqa: F401
    except Exception as err:
        hint = install_hint(["triton"], "triton")
        return f"Triton is not installed ({type(err).__name__}: {err}); install it with {hint}"
    if device_type == "cpu":
        return None if interpreted() else "Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
    if device_type != "cuda":
        return f"Triton does not take {device_type} tensors"
    if interpreted():  # its programs would dereference the pointer tables' device addresses on the host
        return "Triton's interpreter (TRITON_INTERPRET=1) runs CPU tensors only"
    return None


@functools.cache
def kernels() -> Any:
    """The kernels, defined at first use: ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates."""
    from . import _triton_kernels

    return _triton_kernels


class TritonBucket:
    """One bucket's chunk table, pointer tables and scalar vector, built once per layout."""

    def __init__(self, bucket: Bucket) -> None:
        device = bucket.device
        self.interpreted = device.type == "cpu"
        self.chunk = INTERPRETED_CHUNK if self.interpreted else CHUNK
        self.block = INTERPRETED_BLOCK if self.interpreted else BLOCK
        numels = [m.numel() for m in bucket.momentums]
        entries, starts = [], []
        for e, n in enumerate(numels):
            count = -(-n // self.chunk)
            entries += [e] * count
            starts += range(0, count * self.chunk, self.chunk)
        first = [0]
        for n in numels:
            first.append(first[-1] + -(-n // self.chunk))
        self.chunks = len(entries)
        self.chunk_entry = torch.tensor(entries, dtype=torch.int32, device=device)
        self.chunk_start = torch.tensor(starts, dtype=torch.int64, device=device)
        self.numels = torch.tensor(numels, dtype=torch.int64, device=device)
        self.first_chunk = torch.tensor(first, dtype=torch.int64, device=device)
        self.decay = torch.tensor(bucket.decay_mask, dtype=torch.int8, device=device)
        self.adapt = (torch.tensor(bucket.adapt_mask, dtype=torch.bool, device=device)
                      if bucket.adapt_mask is not None and not all(bucket.adapt_mask) else None)
        self.tables = {role: _table(ts, device) for role, ts in (
            ("weights", bucket.weights), ("momentums", bucket.momentums), ("velocities", bucket.velocities),
            ("accumulators", bucket.accumulators), ("averages", bucket.averages), ("mirrors", bucket.mirrors))}
        # Held: a slot given new storage through a reference kept across steps leaves its pointer stale but
        # valid until the layout notices, so a kernel never writes freed memory.
        self.storages = [t.untyped_storage() for t in bucket.written()]
        self.partials = torch.empty(2 * max(self.chunks, 1), dtype=torch.float64, device=device)
        self.sums = torch.empty(2 * len(numels), dtype=torch.float64, device=device)
        self.scale = torch.empty(len(numels), dtype=torch.float32, device=device)
        self.vector = ScalarVector()
        self.aligned = all(t.data_ptr() % 16 == 0 for t in bucket.written())  # 128-bit loads and stores
        self.grad_pointers: tuple[int, ...] = ()
        self.grad_table: Tensor | None = None
        self.grads_aligned = False
        self.warm: set[tuple[Any, ...]] = set()

    def call_grads(self, grads: list[Tensor], state_dtype: torch.dtype) -> CallGrads:
        """This call's gradients as the kernels read them: contiguous, of one dtype (the state's where their
        dtypes differ: ``p.grad.data = other`` can change one), with their pointer table (rebuilt only when
        an address changed). Made once per call (:class:`TritonCall`): its phases get the same one."""
        readable = grads
        if any([not g.is_contiguous() for g in readable]):
            readable = [g.contiguous() for g in readable]
        if any([g.dtype != readable[0].dtype for g in readable]) or readable[0].dtype not in _FLOATS:
            readable = [g.to(state_dtype) for g in readable]
        pointers = tuple([g.data_ptr() for g in readable])
        if pointers != self.grad_pointers or self.grad_table is None:
            self.grad_table = _table(readable, self.chunk_entry.device)
            self.grad_pointers = pointers
            self.grads_aligned = all(address % 16 == 0 for address in pointers)
        return CallGrads(grads, readable, self.grad_table, readable[0].dtype, self.aligned and self.grads_aligned)


@dataclass
class CallGrads:
    """One call's gradients, prepared for the kernels (see :meth:`TritonBucket.call_grads`)."""

    given: list[Tensor]  # the gradients as the bucket has them
    readable: list[Tensor]  # held: the table points into them
    table: Tensor
    dtype: torch.dtype
    aligned: bool  # every tensor of the bucket and every gradient is 16-byte aligned


def _table(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """The tensors' addresses as an int64 tensor on ``device`` (a one-element placeholder for none); to a GPU
    from pinned memory, without a sync (``torch.tensor(..., device=cuda)`` would wait for the copy)."""
    table = torch.tensor([t.data_ptr() for t in tensors] or [0], dtype=torch.int64)
    return table if device.type == "cpu" else table.pin_memory().to(device, non_blocking=True)


class TritonBackend(TorchOpsBackend):
    """CUDA tensors (CPU ones under the interpreter) of any float dtype, float32 state for low precision;
    contiguous entries only (a trust-ratio slice along a later dim is a strided view)."""

    name = "triton"

    def refuses(self, bucket: Bucket, config: LambConfig) -> str | None:
        reason = unavailable(bucket.device.type)
        if reason is not None:
            return reason
        for what, tensors in (("parameter", bucket.weights), ("parameter", bucket.mirrors),
                              ("state", bucket.momentums)):
            if tensors and tensors[0].dtype not in _FLOATS:
                return f"the Triton kernels take float32, float64, bfloat16, float16; this {what} is {tensors[0].dtype}"
        if not all(t.is_contiguous() for t in bucket.written()):
            return "the Triton kernels take contiguous tensors (a slice along a later dim is strided); use 'compiled'"
        return None

    def prepare(self, bucket: Bucket) -> TritonBucket:
        return TritonBucket(bucket)

    def begin(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> TritonCall:
        return TritonCall(bucket, grads, plan)

    def ready(self, call: TritonCall, clipping: bool) -> None:
        call.ready(clipping)


def _constants(bucket: Bucket, plan: StepPlan, factors: bool, call: CallGrads) -> dict[str, Any]:
    """The compile-time constants of this call's kernels (a change compiles new ones, once)."""
    types = kernels().TYPES
    s = plan.scalars[bucket.group_index] if plan.scalars is not None else None
    handle: TritonBucket = bucket.handle
    weights = bucket.weights[0].dtype
    return {
        "LOSS_SCALE": (plan.loss_scale is not None) + 2 * (plan.unscale is not None),
        "ACCUMULATE": plan.accumulation is not None,
        "CLIP": _CLIP_CODES["value" if plan.clip.kind == "value" else ("factors" if factors else None)],
        "DECAY": s is not None and s.decay_factor is not None,
        "ADAPTIVE": s is not None and s.adaptive_weight_decay is not None,
        "W_TYPE": types[weights],
        "S_TYPE": types[bucket.momentums[0].dtype],
        "MIRROR": bool(bucket.mirrors),
        "MIRROR_TYPE": types[bucket.mirrors[0].dtype] if bucket.mirrors else tl_float32(),
        "EMA": plan.ema_weight is not None and bool(bucket.averages),
        "EMA_ROUNDED": weights in LOW_PRECISION,  # no master: the average follows the rounded weights
        "G_TYPE": types[call.dtype],
        "ALIGNED": call.aligned,
        "CHUNK": handle.chunk,
        "BLOCK": handle.block,
    }


def _pass1(bucket: Bucket, call: CallGrads, s: Tensor, factors: Tensor | None, constants: dict[str, Any],
           measure: bool) -> Tensor:
    """Pass 1 (with ``measure``: only the formed gradients' squares) and the per-entry sums (float64)."""
    handle: TritonBucket = bucket.handle
    k = kernels()
    n = len(bucket.momentums)
    if handle.chunks:
        launch(k.lamb_pass1, handle, (handle.chunks,),
               handle.chunk_entry, handle.chunk_start, handle.numels, handle.decay, call.table,
               handle.tables["weights"], handle.tables["momentums"], handle.tables["velocities"],
               handle.tables["accumulators"], factors if factors is not None else s, s, handle.partials,
               handle.chunks, MEASURE=measure, **{key: constants[key] for key in _PASS1})
    launch(k.entry_sums, handle, (n,), handle.first_chunk, handle.partials, handle.sums, handle.chunks, n,
           BLOCK=handle.block)
    return handle.sums[:n] if measure else handle.sums


def _pass2(bucket: Bucket, scale: Tensor, s: Tensor, constants: dict[str, Any]) -> None:
    handle: TritonBucket = bucket.handle
    if handle.chunks:
        t = handle.tables
        launch(kernels().lamb_pass2, handle, (handle.chunks,),
               handle.chunk_entry, handle.chunk_start, handle.numels, handle.decay, t["weights"],
               t["momentums"], t["velocities"], t["averages"], t["mirrors"], scale, s,
               **{key: constants[key] for key in _PASS2})


class TritonCall:
    """One call of the Triton kernels on one bucket: its gradients prepared once, shared by its phases."""

    def __init__(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> None:
        self.bucket, self.plan, self.given = bucket, plan, grads
        self._grads: CallGrads | None = None

    @property
    def grads(self) -> CallGrads:
        if self._grads is None:
            self._grads = self.bucket.handle.call_grads(self.given, self.bucket.momentums[0].dtype)
        return self._grads

    def accumulate(self) -> None:
        ForeachBackend.accumulate(self.bucket, self.given, self.plan)  # one add per micro-step: one pass already

    def grad_squares(self) -> Tensor:
        bucket, plan = self.bucket, self.plan
        s = bucket.handle.vector.fill(scalar_values(bucket, plan), bucket.device)
        constants = _constants(bucket, plan, False, self.grads)
        return narrowed(_pass1(bucket, self.grads, s, None, constants, measure=True).clone())

    def ready(self, clipping: bool) -> None:
        """Compile this update's kernels before any bucket is written: one run on a scratch bucket of one
        element per role, in this bucket's dtypes (Triton compiles per dtype and constants, not per shape)."""
        bucket, plan, call = self.bucket, self.plan, self.grads
        handle: TritonBucket = bucket.handle
        constants = _constants(bucket, plan, clipping, call)
        key = tuple(constants.values())
        if key in handle.warm:
            return
        factors = torch.ones(1, dtype=torch.float32, device=bucket.device) if clipping else None  # scratch

        def one(tensors: list[Tensor]) -> list[Tensor]:
            return [torch.zeros(1, dtype=tensors[0].dtype, device=tensors[0].device)] if tensors else []

        scratch = Bucket(
            group_index=bucket.group_index, weights=one(bucket.weights), mirrors=one(bucket.mirrors),
            momentums=one(bucket.momentums), velocities=one(bucket.velocities),
            accumulators=one(bucket.accumulators), averages=one(bucket.averages), decay_mask=[True])
        scratch.handle = TritonBucket(scratch)
        scratch.handle.interpreted, scratch.handle.chunk, scratch.handle.block = (
            handle.interpreted, handle.chunk, handle.block)
        scratch_call = scratch.handle.call_grads(one(call.readable), bucket.momentums[0].dtype)
        s = handle.vector.fill(scalar_values(bucket, plan), bucket.device).clone()
        _pass1(scratch, scratch_call, s, factors, constants, measure=False)  # the real bucket's constants
        _pass2(scratch, torch.zeros(1, dtype=torch.float32, device=bucket.device), s, constants)
        if factors is not None:  # the clipping norms' variant of pass 1
            _pass1(scratch, scratch_call, s, None, _constants(bucket, plan, False, call), measure=True)
        handle.warm.add(key)

    def update(self, clip_factors: Tensor | None) -> TrustStats:
        bucket, plan, call = self.bucket, self.plan, self.grads
        handle: TritonBucket = bucket.handle
        s = handle.vector.fill(scalar_values(bucket, plan), bucket.device)
        factors = clip_factors.to(bucket.device, torch.float32).contiguous() if clip_factors is not None else None
        constants = _constants(bucket, plan, clip_factors is not None, call)
        sums = _pass1(bucket, call, s, factors, constants, measure=False)
        if bucket.reduce is not None:
            sums = bucket.reduce(sums)
        hyper = plan.scalars[bucket.group_index] if plan.scalars is not None else None
        bounds = (hyper is not None and hyper.min_trust_ratio is not None,
                  hyper is not None and hyper.max_trust_ratio is not None)
        weight_norm, update_norm, ratio = trust_ratios(sums, len(bucket.momentums), bounds, handle.adapt, s)
        torch.mul(ratio, s[LR], out=handle.scale)
        _pass2(bucket, handle.scale, s, constants)
        self._grads = None  # the call's last phase: the gradients are not held past it
        return TrustStats(weight_norm, update_norm, ratio)


_PASS1 = ("LOSS_SCALE", "ACCUMULATE", "CLIP", "DECAY", "ADAPTIVE", "G_TYPE", "W_TYPE", "S_TYPE", "ALIGNED", "CHUNK",
          "BLOCK")
_PASS2 = ("DECAY", "ADAPTIVE", "W_TYPE", "S_TYPE", "MIRROR", "MIRROR_TYPE", "EMA", "EMA_ROUNDED", "ALIGNED", "CHUNK",
          "BLOCK")


def launch(kernel: Any, handle: TritonBucket, grid: tuple[int, ...], *args: Any, **constants: Any) -> None:
    """Launch ``kernel`` with the options that keep its rounding the reference's (no FMA contraction)."""
    if handle.interpreted:
        kernel[grid](*args, **constants)
    else:
        kernel[grid](*args, **constants, num_warps=WARPS, enable_fp_fusion=False)


assert SCALARS[:15] == ("lr", "one_minus_beta_1", "one_minus_beta_2", "bias_correction_1", "bias_correction_2",
                        "epsilon", "decay_factor", "adaptive_weight_decay", "ema_weight", "loss_scale",
                        "accumulation", "clipvalue", "min_trust_ratio", "max_trust_ratio", "unscale"), \
    "kernels index SCALARS"
