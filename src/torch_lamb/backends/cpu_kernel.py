"""The ``fused`` backend: the C kernel for CPU buckets, with the whole Keras pipeline in its two passes.

Pass 1 forms each gradient (unscale, accumulate, clip), updates m and v and sums ``||w||^2`` and
``||u||^2`` per tensor in double; pass 2 re-forms u from the new moments and writes p, its
low-precision copy and the moving average. Whole tensors run segment by segment, so pass 2 finds a
segment still in cache, with the trust ratios formed in C; sharded tensors run pass 1 over the
bucket, call ``bucket.reduce`` on the packed squared norms, and run pass 2.

Covered: CPU, contiguous tensors, float32 state, host (Python float) scalars; parameters and
gradients in float32, bfloat16 or float16 (where the compiler has ``_Float16``). The layout checks
every pointer this backend caches before each step (:mod:`torch_lamb.layout`).
"""

from __future__ import annotations

import array
import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..bucket import Bucket, GatheredGrads, dense
from ..config import LambConfig
from ..distributed import Reducer
from ..functional import LambScalars, TrustStats, trust_ratio
from ..plan import StepPlan
from . import kernel_build
from .common import narrowed
from .kernel_build import FIX_HINT
from .kernel_build import Bucket as _Struct

__all__ = ["FIX_HINT", "CpuKernelBackend", "GradientPipeline", "KernelBucket", "KernelTrustStats", "floor_stream",
           "unavailable"]

MIN_PER_THREAD = 1 << 16  # below ~64K elements per thread, waking OpenMP workers costs more than it saves
SEGMENT_BYTES = 8 << 20  # pass 2 re-reads a segment of this many bytes (all streams) from cache
_DTYPE_NAMES = {torch.float32: "DT_F32", torch.bfloat16: "DT_BF16", torch.float16: "DT_F16"}


def _kernel() -> kernel_build.Kernel:
    kernel = kernel_build.load_kernel()
    if kernel is None:
        raise RuntimeError(f"torch_lamb CPU kernel unavailable: {unavailable()}")
    return kernel


def unavailable() -> str | None:
    """Why the kernel cannot be used (None when it can; builds it on first call)."""
    return None if kernel_build.load_kernel() is not None else kernel_build.kernel_status().reason


def dtype_code(dtype: torch.dtype) -> int | None:
    """The kernel's code for parameters or gradients of ``dtype`` (None: not handled)."""
    name = _DTYPE_NAMES.get(dtype)
    return _kernel().constants.get(name) if name else None


@dataclass
class GradientPipeline:
    """How pass 1 forms each gradient, in Keras's order (each step optional).

    ``t = g * unscale`` (GradScaler's hand-off; rounded to a bfloat16 g's dtype); ``t = t / loss_scale``;
    ``t = (acc + t) / accumulation_steps`` (then acc is zeroed); ``t = clamp(t, -clipvalue, clipvalue)``;
    ``t = t * clip_factors[i]`` (clipnorm, global_clipnorm).
    """

    loss_scale: float | None = None
    unscale: float | None = None
    accumulation_steps: float | None = None
    clipvalue: float | None = None
    clip_factors: Tensor | None = None  # float32, one per tensor


def _ptrs(tensors: Sequence[Tensor]) -> array.array:
    return array.array("q", list(map(Tensor.data_ptr, tensors)))


def _addr(pointers: array.array | Tensor) -> int:
    return pointers.data_ptr() if isinstance(pointers, Tensor) else pointers.buffer_info()[0]


def _runs(view: Tensor) -> tuple[list[int], int] | None:
    """The contiguous runs of a strided view: their element offsets from ``view.data_ptr()`` and their common
    length (a trust-ratio slice along a dim after the first: one run per outer index); None if its innermost
    elements are not packed."""
    dims = [(size, stride) for size, stride in zip(view.shape, view.stride()) if size != 1]
    if view.numel() == 0 or not dims:
        return [0], view.numel()
    length, packed = 1, len(dims)
    while packed > 0 and dims[packed - 1][1] == length:  # the packed innermost dims form one run
        packed -= 1
        length *= dims[packed][0]
    if packed == len(dims):
        return None
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in dims[:packed]:
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride)
    return offsets.flatten().tolist(), length


def _threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // MIN_PER_THREAD))


class KernelBucket:
    """The kernel's view of one bucket: sizes, masks and state pointers, built once per layout.

    Every tensor must have the element count of the matching momentum, and every pointer must stay
    valid while the view is used: the layout re-checks them before each step.
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
        weights: Sequence[Tensor] | None = None,
        mirrors: Sequence[Tensor] = (),
    ) -> None:
        self.flags = _kernel().constants
        self.slots = len(momentums)  # ratio units: one per entry (a tensor, or a trust-ratio slice of one)
        self.runs: tuple[Tensor, Tensor, Tensor] | None = None  # strided entries: (entry, offset, stride check)
        if all(m.is_contiguous() for m in momentums):
            self.n = self.slots
            self.numels = [m.numel() for m in momentums]
        else:
            self._plan_runs(momentums)
        self.sizes = torch.tensor(self.numels, dtype=torch.int64)
        self.numel = sum(self.numels)
        self.decay_mask = torch.tensor(list(decay_mask), dtype=torch.uint8)
        self.adapt_list = None if adapt_mask is None else list(adapt_mask)
        self.adapt_mask = None if adapt_mask is None else torch.tensor(self.adapt_list, dtype=torch.uint8)
        self.tensors = (list(momentums), list(velocities), list(accumulators), list(averages))  # kept alive
        for ts in (velocities, accumulators, averages, weights or (), mirrors):
            if self.runs is not None and any(t.stride() != m.stride() for t, m in zip(ts, momentums)):
                raise ValueError("KernelBucket: strided entries must share their moments' strides.")
        self.m, self.v = self._table(momentums), self._table(velocities)
        self.acc = self._table(accumulators) if accumulators else None
        self.avg = self._table(averages) if averages else None
        # The optimizer's weights and mirrors: their pointers are read once here, since the layout
        # re-checks every one of them before each step (other lists passed to a call are read then).
        self._known = {id(ts): self._table(ts) for ts in (weights, mirrors) if ts}
        self.tensors += (weights, mirrors)
        # The storages behind every cached pointer, held: a slot given new storage through a reference kept
        # across steps (`m.data = ...` without reading `optimizer.state`) leaves these pointers stale but
        # valid, so the kernel can never write freed memory.
        self.storages = [t.untyped_storage() for ts in self.tensors if ts for t in ts]
        self.strides = [m.stride() for m in momentums] if self.runs is not None else None

    def _plan_runs(self, momentums: Sequence[Tensor]) -> None:
        """Strided entries become runs, each tagged with its entry (its slot): built once per layout."""
        entries, offsets, lengths = [], [], []
        for e, m in enumerate(momentums):
            runs = _runs(m)
            if runs is None:
                raise ValueError("KernelBucket: an entry's innermost elements are not contiguous.")
            entries += [e] * len(runs[0])
            offsets += runs[0]
            lengths += [runs[1]] * len(runs[0])
        self.group = torch.tensor(entries, dtype=torch.int64)
        self.runs = (self.group, torch.tensor(offsets, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64))
        self.n, self.numels = len(entries), lengths

    def _table(self, tensors: Sequence[Tensor]) -> array.array | Tensor:
        """The data pointers the kernel reads for ``tensors``: one per tensor, or one per run of strided entries."""
        if self.runs is None:
            return _ptrs(tensors)
        entry, offset, _ = self.runs
        starts = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
        return starts.index_select(0, entry) + offset * tensors[0].element_size()

    def _struct(self, params: Sequence[Tensor] | None, grads: Sequence[Tensor] | None,
                grad_table: array.array | Tensor | None = None) -> tuple[_Struct, list[object]]:
        """The call's struct (a pass that reads no p or no g gets None for it), and what must outlive it;
        ``grad_table``: the gradients' pointers, read once per call (:meth:`table`)."""
        b = _Struct()
        keep: list[object] = []
        if params is not None:
            keep.append(ptrs := self._pointers(params))
            b.p, b.p_dtype = _addr(ptrs), dtype_code(params[0].dtype)
        if grads is not None:
            keep.append(ptrs := grad_table if grad_table is not None else self._table(grads))
            b.g, b.g_dtype = _addr(ptrs), dtype_code(grads[0].dtype)
        b.n, b.m, b.v = self.n, _addr(self.m), _addr(self.v)
        b.sizes, b.decay_mask = self.sizes.data_ptr(), self.decay_mask.data_ptr()
        if self.runs is not None:
            b.group, b.slots = self.group.data_ptr(), self.slots
        if self.adapt_mask is not None:
            b.adapt_mask = self.adapt_mask.data_ptr()
        b.nthreads, b.unscale, b.bf16_unscale = _threads(self.numel), 1.0, 1.0
        return b, keep

    def _pointers(self, tensors: Sequence[Tensor]) -> array.array | Tensor:
        known = self._known.get(id(tensors))
        return known if known is not None else self._table(tensors)

    def table(self, tensors: Sequence[Tensor]) -> array.array | Tensor:
        """The pointers the kernel reads for ``tensors`` (a call's gradients: read once, passed to each pass)."""
        return self._table(tensors)

    def _options(self, b: _Struct, *options: tuple[str, str, float | None]) -> None:
        for flag, name, value in options:
            if value is not None:
                b.flags |= self.flags[flag]
                setattr(b, name, value)

    def _scaling(self, b: _Struct, loss_scale: float | None, unscale: float | None) -> None:
        """``unscale`` (GradScaler's) is a field every pass applies (1 without it), so that a handed-over step
        runs the code, and so the sums, of a step on unscaled gradients; the loss scale is a flag."""
        if unscale is not None:
            if b.g_dtype == self.flags["DT_BF16"]:
                b.bf16_unscale = unscale  # rounded to bfloat16 as it is widened, as unscale_ writes it
            else:
                b.unscale = unscale
        self._options(b, ("F_LOSS_SCALE", "loss_scale", loss_scale))

    def _pipeline(self, b: _Struct, keep: list[object], pipe: GradientPipeline | None) -> None:
        if pipe is None:
            return
        self._scaling(b, pipe.loss_scale, pipe.unscale)
        self._options(b, ("F_CLIPVALUE", "clipvalue", pipe.clipvalue),
                      ("F_ACCUMULATE", "accumulation_steps", pipe.accumulation_steps))
        if pipe.accumulation_steps is not None:
            if self.acc is None:
                raise ValueError("GradientPipeline: accumulation needs the bucket's accumulators.")
            b.acc = _addr(self.acc)
        if pipe.clipvalue is not None and pipe.clip_factors is not None:
            raise ValueError("GradientPipeline: give `clipvalue` or `clip_factors`, not both.")
        if pipe.clip_factors is not None:
            factors = pipe.clip_factors.to(torch.float32).expand(self.slots).contiguous()
            keep.append(factors)
            b.flags |= self.flags["F_CLIP_FACTORS"]
            b.clip_factors = factors.data_ptr()

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        scalars: LambScalars,
        *,
        reduce: Reducer | None = None,
        pipeline: GradientPipeline | None = None,
        ema_weight: float | None = None,
        mirrors: Sequence[Tensor] | None = None,
        grad_table: array.array | Tensor | None = None,
    ) -> TrustStats:
        """One LAMB update of the bucket (host scalars only); ``mirrors``: the low-precision copies of
        float32 master ``params``, rounded from them in pass 2."""
        s, n = scalars, self.slots
        b, keep = self._struct(params, grads, grad_table)
        if mirrors:
            keep.append(mirror_ptrs := self._pointers(mirrors))
            b.flags |= self.flags["F_MIRROR"]
            b.mirror, b.mirror_dtype = _addr(mirror_ptrs), dtype_code(mirrors[0].dtype)
        b.beta_1c, b.beta_2c, b.eps, b.lr = s.one_minus_beta_1, s.one_minus_beta_2, s.epsilon, s.lr
        b.bc1, b.bc2 = s.bias_correction_1, s.bias_correction_2
        self._options(b, ("F_DECAY", "decay", s.decay_factor), ("F_ADAPTIVE_DECAY", "adaptive_decay",
                      s.adaptive_weight_decay), ("F_MIN_RATIO", "min_ratio", s.min_trust_ratio),
                      ("F_MAX_RATIO", "max_ratio", s.max_trust_ratio))
        self._pipeline(b, keep, pipeline)
        if ema_weight is not None:
            if self.avg is None:
                raise ValueError("KernelBucket: the bucket was built without averages.")
            b.flags |= self.flags["F_EMA"]
            b.ema_weight = ema_weight
            b.avg = _addr(self.avg)
        sums = torch.empty(2 * n, dtype=torch.float64)
        b.sums = sums.data_ptr()
        if reduce is None:
            ratio = torch.empty(n, dtype=torch.float32)
            b.ratios = ratio.data_ptr()
            streams = 4 + bool(b.flags & self.flags["F_ACCUMULATE"]) + (ema_weight is not None)
            b.segment = max(1, SEGMENT_BYTES // (4 * streams))
            call_kernel("lamb_fused", b)
            return KernelTrustStats(sums, n, ratio)
        call_kernel("lamb_pass1", b)
        norms = torch.sqrt(reduce(narrowed(sums)))
        weight_norm, update_norm = norms[:n], norms[n:]
        ratio = trust_ratio(weight_norm, update_norm, scalars, self.adapt_list)
        scale = (ratio * s.lr).to(torch.float32).contiguous()
        b.scale = scale.data_ptr()
        call_kernel("lamb_pass2", b)
        return TrustStats(weight_norm, update_norm, ratio)

    def gradient_squares(self, grads: Sequence[Tensor], pipeline: GradientPipeline,
                         grad_table: array.array | Tensor | None = None) -> Tensor:
        """Per tensor, the sum of squares (float64) of the gradients ``pipeline`` forms, before clipping."""
        b, keep = self._struct(None, grads, grad_table)
        self._pipeline(b, keep, GradientPipeline(pipeline.loss_scale, pipeline.unscale, pipeline.accumulation_steps))
        sums = torch.empty(2 * self.slots, dtype=torch.float64)
        b.sums = sums.data_ptr()
        call_kernel("lamb_grad_sums", b)
        return sums[: self.slots]

    def accumulate(self, grads: Sequence[Tensor], loss_scale: float | None,
                   grad_table: array.array | Tensor | None = None, unscale: float | None = None) -> None:
        """``acc += g`` (``g * unscale / loss_scale`` where given), in one pass."""
        b, _keep = self._struct(None, grads, grad_table)
        b.acc = _addr(self.acc)
        self._scaling(b, loss_scale, unscale)
        call_kernel("lamb_accumulate", b)

    def count_bad(self, grads: Sequence[Tensor], limit: float,
                  grad_table: array.array | Tensor | None = None) -> Tensor:
        """Per tensor, the number of gradient elements that are NaN or at least ``limit`` in magnitude."""
        b, _keep = self._struct(None, grads, grad_table)
        sums = torch.empty(2 * self.slots, dtype=torch.float64)
        b.sums, b.limit = sums.data_ptr(), limit
        call_kernel("lamb_count_bad", b)
        return sums[: self.slots]

    def ema(self, params: Sequence[Tensor], weight: float) -> None:
        """``avg = lerp(avg, p, weight)`` over the bucket's averages, in one pass."""
        b, _keep = self._struct(params, None)
        b.avg, b.ema_weight = _addr(self.avg), weight
        call_kernel("lamb_ema", b)


class KernelTrustStats(TrustStats):
    """The fused call's statistics: its trust ratios, and its norms as the kernel's float64 squared sums,
    narrowed and square-rooted where they are first read (telemetry), so that no op runs after the kernel in
    a step that does not read them (each op there costs 50-100 us, its code cold after the kernel's stream)."""

    def __init__(self, sums: Tensor, n: int, ratio: Tensor) -> None:  # not the dataclass's: norms on demand
        self._sums, self._n, self.trust_ratio = sums, n, ratio
        self._norms: Tensor | None = None

    def _all_norms(self) -> Tensor:
        if self._norms is None:
            self._norms = torch.sqrt(narrowed(self._sums))
        return self._norms

    @property  # type: ignore[override]
    def weight_norm(self) -> Tensor:
        return self._all_norms()[: self._n]

    @property  # type: ignore[override]
    def update_norm(self) -> Tensor:
        return self._all_norms()[self._n:]


def call_kernel(name: str, b: _Struct, kernel: kernel_build.Kernel | None = None) -> None:
    if getattr((kernel or _kernel()).lib, name)(ctypes.byref(b)) != 0:
        raise MemoryError(f"torch_lamb CPU kernel: allocation failed in {name}")


def floor_stream(params: Sequence[Tensor], grads: Sequence[Tensor]):
    """The benchmark's floor: a callable that moves the update's bytes in its passes and segments, with
    no arithmetic, on scratch state (from the floor's own build of the kernel; None without one)."""
    kernel = kernel_build.load_kernel(floor=True)
    if kernel is None:
        return None
    scratch = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    view = KernelBucket(*scratch, decay_mask=[False] * len(params))

    def stream() -> None:
        b, _keep = view._struct(params, grads)
        sums, ratios = torch.empty(2 * view.n, dtype=torch.float64), torch.empty(view.n, dtype=torch.float32)
        b.sums, b.ratios, b.segment = sums.data_ptr(), ratios.data_ptr(), max(1, SEGMENT_BYTES // 16)
        call_kernel("lamb_stream", b, kernel)

    stream.scratch = scratch  # type: ignore[attr-defined]
    return stream


class CpuKernelBackend:
    """The ``fused`` backend: one :class:`KernelBucket` per bucket, host scalars, CPU tensors."""

    name = "fused"

    def refuses(self, bucket: Bucket, config: LambConfig) -> str | None:
        if bucket.device.type != "cpu":
            return "the fused kernel runs on CPU tensors only"
        if config.capturable:
            return "capturable=True needs device-tensor scalars, which the CPU kernel does not take"
        reason = unavailable()
        if reason is not None:
            return f"the CPU kernel is unavailable ({reason})"
        state = [*bucket.momentums, *bucket.velocities, *bucket.accumulators, *bucket.averages]
        if any(t.dtype != torch.float32 for t in state):
            return f"the CPU kernel keeps float32 state; this bucket's state is {bucket.momentums[0].dtype}"
        for what, tensors in (("parameter", bucket.weights), ("parameter", bucket.mirrors)):
            if tensors and dtype_code(tensors[0].dtype) is None:
                return f"the CPU kernel has no {tensors[0].dtype} {what}s (float16 needs a compiler with _Float16)"
        if not all(t.is_contiguous() for t in bucket.bases):
            return "the CPU kernel needs contiguous parameters and state"
        strided = [t for t in bucket.written() if not t.is_contiguous()]  # trust-ratio slices after dim 0
        if strided and (any(_runs(t) is None for t in bucket.momentums)
                        or any(w.stride() != m.stride() for w, m in zip(bucket.weights, bucket.momentums))):
            return "the CPU kernel cannot split these trust-ratio slices into contiguous runs"
        if any(w.numel() != m.numel() for w, m in zip(bucket.weights, bucket.momentums)):
            return "a parameter and its state differ in size"
        return None

    def prepare(self, bucket: Bucket) -> KernelBucket:
        return KernelBucket(
            bucket.momentums, bucket.velocities, decay_mask=bucket.decay_mask, adapt_mask=bucket.adapt_mask,
            accumulators=bucket.accumulators, averages=bucket.averages, weights=bucket.weights,
            mirrors=bucket.mirrors,
        )

    def begin(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> KernelCall:
        return KernelCall(bucket, grads, plan)

    def ready(self, call: KernelCall, clipping: bool) -> None:
        return None

    def ema(self, bucket: Bucket, plan: StepPlan) -> None:
        if plan.ema_weight is not None:
            bucket.handle.ema(bucket.weights, plan.ema_weight)

    def bad_gradients(self, bucket: Bucket, grads: list[Tensor], limit: float) -> Tensor:
        call = KernelCall(bucket, grads, None)
        return (bucket.handle.count_bad(call.readable, limit, call.table) > 0).sum().to(torch.float32)


def _readable(bucket: Bucket, grads: list[Tensor]) -> list[Tensor]:
    """Gradients the kernel can read as raw arrays of the parameters' dtype: the packed ones as they are, and
    packed copies of the others (stride 0, transposed, sliced, or of another dtype: ``p.grad.data = other``)."""
    dtype = bucket.mirrors[0].dtype if bucket.mirrors else bucket.weights[0].dtype
    strides = bucket.handle.strides
    if strides is None:
        return dense(grads, dtype)[0]
    # strided trust-ratio slices: each gradient must share its moment's strides
    if all([g.stride() == st and g.dtype is dtype for g, st in zip(grads, strides)]):
        return grads
    return [g if g.stride() == st and g.dtype is dtype else torch.empty_strided(g.shape, st, dtype=dtype).copy_(g)
            for g, st in zip(grads, strides)]


class KernelCall:
    """One call of the kernel on one bucket: the gradients made readable and their pointers read once, shared by
    the call's passes."""

    def __init__(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan | None) -> None:
        self.bucket, self.plan = bucket, plan
        if isinstance(grads, GatheredGrads):  # the gradient scan read their pointers
            self.readable, self.table = grads, grads.table
            return
        self.readable = _readable(bucket, grads)
        self.table = bucket.handle.table(self.readable)

    def accumulate(self) -> None:
        assert self.plan is not None
        self.bucket.handle.accumulate(self.readable, self.plan.loss_scale, self.table, self.plan.unscale)

    def grad_squares(self) -> Tensor:
        assert self.plan is not None
        pipeline = GradientPipeline(self.plan.loss_scale, self.plan.unscale, self.plan.accumulation)
        return narrowed(self.bucket.handle.gradient_squares(self.readable, pipeline, self.table))

    def update(self, clip_factors: Tensor | None) -> TrustStats:
        plan, bucket = self.plan, self.bucket
        assert plan is not None and plan.scalars is not None
        pipeline = GradientPipeline(
            loss_scale=plan.loss_scale, unscale=plan.unscale, accumulation_steps=plan.accumulation,
            clipvalue=plan.clip.value if plan.clip.kind == "value" else None, clip_factors=clip_factors,
        )
        return bucket.handle.update(
            bucket.weights, self.readable, plan.scalars[bucket.group_index], reduce=bucket.reduce,
            pipeline=pipeline, ema_weight=plan.ema_weight, mirrors=bucket.mirrors, grad_table=self.table,
        )
