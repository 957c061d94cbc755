"""The ``compiled`` backend: the reference math as two pure bucket functions under ``torch.compile``.

* **Phase 1** forms each gradient (unscale, accumulate, clip), updates m and v and returns the packed
  squared sums ``[||w'||², ..., ||u||², ...]`` (summed in float64, so finite inputs never overflow).
* ``bucket.reduce`` sums them across shards, eagerly, between the phases (DTensor).
* **Phase 2** forms the trust ratios on the device, re-forms u from the new moments and writes p, its
  low-precision copy and the moving average.

Every per-step scalar (lr, the betas' complements, the bias corrections, decay, loss scale, 1/N, the
EMA weight...) reaches the graphs in one small float32 vector on the bucket's device, so a new
learning rate never recompiles; what is static (the feature set, the masks, dtypes and shapes) is
compiled in, ``fullgraph=True, dynamic=False``, lazily at a bucket's first update. Each (phase,
features, shapes, dtypes, device) gets a function of its own (a fresh code object, shared by the
buckets that match it), so that a model's buckets never share dynamo's per-function recompile limit.
On a GPU inductor lowers the phases to fused Triton kernels; on the CPU to C++.

It is opt-in (``implementation="compiled"``): the first update of each bucket compiles (seconds on a
CPU), and on the CPU the C kernel is faster.
"""

from __future__ import annotations

import array
import os
import shutil
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..bucket import Bucket, PackedGrads, packed
from ..config import LambConfig
from ..distributed import host_reads_allowed
from ..functional import LOW_PRECISION, TrustStats
from ..plan import StepPlan
from .common import TorchOpsBackend, narrowed, state_grads
from .foreach import ForeachBackend

__all__ = ["SCALARS", "CompiledBackend", "ScalarVector", "scalar_values", "trust_ratios", "unavailable"]

# the per-step scalars, by position in the vector
LR, B1C, B2C, BC1, BC2, EPS, DECAY, AWD, EMA, LOSS, ACC, CLIP, LOW, HIGH, UNSCALE = range(15)
SCALARS = ("lr", "one_minus_beta_1", "one_minus_beta_2", "bias_correction_1", "bias_correction_2", "epsilon",
          "decay_factor", "adaptive_weight_decay", "ema_weight", "loss_scale", "accumulation", "clipvalue",
          "min_trust_ratio", "max_trust_ratio", "unscale")


def unavailable(device_type: str = "cpu") -> str | None:
    """Why ``torch.compile`` cannot lower the phases for ``device_type`` here (None when it can): inductor
    needs a C++ compiler for CPU tensors and Triton for GPU ones."""
    try:
        import torch._dynamo
        import torch._inductor  # noqa: F401
    except Exception as err:  # pragma: no cover - a torch build without the compiler stack
        return f"torch.compile is unavailable ({type(err).__name__}: {err})"
    if device_type == "cpu":
        cxx = os.environ.get("CXX")
        if not any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"]):
            return "inductor needs a C++ compiler for CPU tensors ($CXX, g++, c++ or clang++); none was found"
        return None
    from torch.utils._triton import has_triton

    return None if has_triton() else f"inductor needs Triton for {device_type} tensors; it is not installed"


@dataclass(frozen=True)
class Features:
    """What a bucket's graphs compile in (a change compiles new graphs)."""

    loss_scale: bool
    unscale: str | None  # GradScaler's hand-off: "bfloat16" (rounded to it, as unscale_ writes), "float32", "float64"
    accumulate: bool
    clip: str | None  # "value", "factors" or None
    decay: tuple[bool, ...]  # decoupled decay, per entry
    adaptive: tuple[bool, ...]  # adaptive decay (u + wd * w), per entry
    adapt: tuple[bool, ...]  # takes the trust ratio, per entry
    low: bool  # (low-precision) is (updated in float32)
    bounds: tuple[bool, bool]  # min / max trust ratio
    ema: bool
    mirror: bool


def _formed(f: Features, grads: Sequence[Tensor], accs: Sequence[Tensor], factors: Tensor | None, s: Tensor,
            dtype: torch.dtype, *, consume: bool, clip: bool) -> list[Tensor]:
    """The gradients the update uses: unscaled, accumulated (the accumulators zeroed when ``consume``), clipped."""
    out = []
    for i, g in enumerate(grads):
        if f.unscale == "float64":
            g = g * s[UNSCALE].to(torch.float64)
        elif f.unscale is not None:
            g = g.to(torch.float32) * s[UNSCALE]
            g = g.to(torch.bfloat16) if f.unscale == "bfloat16" else g
        t = g.to(dtype)
        if f.loss_scale:
            t = t / s[LOSS].to(dtype)
        if f.accumulate:
            t = (accs[i] + t) / s[ACC].to(dtype)
            if consume:
                accs[i].zero_()
        if clip and f.clip == "value":
            t = torch.clamp(t, -s[CLIP].to(dtype), s[CLIP].to(dtype))
        elif clip and f.clip == "factors":
            t = t * factors[i].to(dtype)
        out.append(t)
    return out


def _update(f: Features, w: Tensor, m: Tensor, v: Tensor, i: int, s: Tensor) -> tuple[Tensor, Tensor]:
    """``w' = w * decay`` and ``u = m_hat / (sqrt(v_hat) + eps)`` (+ ``wd * w'``) of entry ``i``."""
    dtype = m.dtype
    if f.decay[i]:
        w = w * s[DECAY].to(dtype)
    u = (m / s[BC1].to(dtype)) / (torch.sqrt(v / s[BC2].to(dtype)) + s[EPS].to(dtype))
    if f.adaptive[i]:
        u = u + s[AWD].to(dtype) * w
    return w, u


def phase1(f: Features, weights: list[Tensor], grads: list[Tensor], momentums: list[Tensor], velocities: list[Tensor],
           accumulators: list[Tensor], factors: Tensor | None, s: Tensor) -> Tensor:
    """The pipeline, the moments, and the packed squared sums (float64) of w' and u."""
    dtype = momentums[0].dtype
    formed = _formed(f, grads, accumulators, factors, s, dtype, consume=True, clip=True)
    w_sums, u_sums = [], []
    for i, (p, t, m, v) in enumerate(zip(weights, formed, momentums, velocities)):
        m.copy_(m + (t - m) * s[B1C].to(dtype))  # Keras's forms: the bits of the reference backend
        v.copy_(v + (torch.square(t) - v) * s[B2C].to(dtype))
        w, u = _update(f, p.to(dtype) if f.low else p, m, v, i, s)
        w_sums.append(torch.sum(torch.square(w.to(torch.float64))))
        u_sums.append(torch.sum(torch.square(u.to(torch.float64))))
    return torch.stack(w_sums + u_sums)


def trust_ratios(sums: Tensor, n: int, bounds: tuple[bool, bool], adapt: Sequence[bool] | Tensor | None,
                 s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(||w'||, ||u||, ratio)`` per entry from the packed squared sums (float64) ``[w'², ..., u², ...]``: the
    float32 steps of :func:`~torch_lamb.functional.trust_ratio` (and of the C kernel), in float64 where a sum
    overflows float32; ``adapt``: the entries that take the ratio (a bool tuple, a bool tensor, or None: all)."""
    narrow = sums.to(torch.float32)
    overflow = torch.isinf(narrow).any() & ~torch.isinf(sums).any()
    wide_norms, narrow_norms = torch.sqrt(sums), torch.sqrt(narrow)
    norms = torch.where(overflow, wide_norms, narrow_norms.to(torch.float64))
    ratios = []
    for wn, un in ((narrow_norms[:n], narrow_norms[n:]), (wide_norms[:n], wide_norms[n:])):
        ratios.append(torch.where((wn > 0) & (un > 0), wn / un, torch.ones_like(wn)).to(torch.float32))
    ratio = torch.where(overflow, ratios[1], ratios[0])
    if bounds[0]:
        ratio = torch.maximum(ratio, s[LOW])
    if bounds[1]:
        ratio = torch.minimum(ratio, s[HIGH])
    if isinstance(adapt, Tensor):
        ratio = torch.where(adapt, ratio, torch.ones_like(ratio))
    elif adapt is not None and not all(adapt):
        ratio = torch.where(torch.tensor(adapt, device=ratio.device), ratio, torch.ones_like(ratio))
    return norms[:n], norms[n:], ratio


def phase2(f: Features, weights: list[Tensor], momentums: list[Tensor], velocities: list[Tensor],
           averages: list[Tensor], mirrors: list[Tensor], sums: Tensor, s: Tensor) -> list[Tensor]:
    """The trust ratios, then ``p = w' - ratio * lr * u``, the low-precision copy and the average; returns
    ``[||w'||, ||u||, ratio]`` (float32 unless a norm overflows it)."""
    weight_norm, update_norm, ratio = trust_ratios(sums, len(weights), f.bounds, f.adapt, s)
    scale = ratio * s[LR]
    dtype = momentums[0].dtype
    for i, (p, m, v) in enumerate(zip(weights, momentums, velocities)):
        w, u = _update(f, p.to(dtype) if f.low else p, m, v, i, s)
        new = w - scale[i].to(dtype) * u
        p.copy_(new)
        if f.mirror:
            mirrors[i].copy_(new)
        if f.ema:
            avg = averages[i]
            avg.copy_(_lerp(avg, p.to(avg.dtype) if f.low else new, s[EMA].to(avg.dtype)))
    return [weight_norm, update_norm, ratio]


def _lerp(start: Tensor, end: Tensor, weight: Tensor) -> Tensor:
    """torch's lerp formula (inductor has no fma, so the last bit may differ from eager's)."""
    return torch.where(weight.abs() < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


def grad_squares(f: Features, grads: list[Tensor], accumulators: list[Tensor], s: Tensor, dtype: torch.dtype) -> Tensor:
    """Per entry, the squared sum (float64) of the gradient the update uses, before clipping."""
    formed = _formed(f, grads, accumulators, None, s, dtype, consume=False, clip=False)
    return torch.stack([torch.sum(torch.square(t.to(torch.float64))) for t in formed])


def _template() -> Callable[..., Any]:
    body: Any = None
    features: Any = None

    def call(*args: Any) -> Any:
        return body(features, *args)

    return call


_CALL = _template()


def _own_function(body: Callable[..., Any], features: Features, tag: str) -> Callable[..., Any]:
    """``body(features, *args)`` as a function with a code object of its own: dynamo keeps graphs (and its
    recompile limit) per code object, and a ``functools.partial`` would share torch's wrapper's."""
    code = _CALL.__code__.replace(co_name=f"lamb_{body.__name__}_{tag}")
    cells = {"body": body, "features": features}
    closure = tuple(types.CellType(cells[name]) for name in code.co_freevars)
    return types.FunctionType(code, _CALL.__globals__, code.co_name, None, closure)


_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}
# inductor would otherwise fold a float32 -> bfloat16 -> float32 round trip away: the EMA of a low-precision
# parameter must follow the rounded value, as on every other backend
_OPTIONS = {"emulate_precision_casts": True}


def _options() -> dict[str, Any]:
    """Inductor options this torch knows (an older one may lack ``emulate_precision_casts``)."""
    import torch._inductor.config as inductor_config

    return {k: v for k, v in _OPTIONS.items() if hasattr(inductor_config, k)}


def compiled_graph(fn: Callable[..., Any], features: Features, signature: tuple[Any, ...]) -> Callable[..., Any]:
    """The compiled ``fn`` for these features and input shapes/dtypes/device (made once per process)."""
    key = (fn.__name__, features, signature)
    compiled = _COMPILED.get(key)
    if compiled is None:
        body = _own_function(fn, features, str(len(_COMPILED)))
        compiled = _COMPILED[key] = torch.compile(body, fullgraph=True, dynamic=False, options=_options())
    return compiled


def _signature(*lists: Sequence[Tensor]) -> tuple[Any, ...]:
    return tuple((t.shape, t.dtype, t.device, t.stride()) for ts in lists for t in ts)


class ScalarVector:
    """A bucket's per-step scalars (:data:`SCALARS`, by position) as one float32 vector on its device, so that
    kernels and graphs take every scalar as data: a new learning rate neither recompiles nor relaunches.

    Two ways to fill it. The fast one (the default) writes the host values into a host buffer and copies it
    over (no device sync; device values of a device-side guard are scattered in on the device).
    Under ``capturable`` (where the host may not read) it is assembled on the device from 0-dim tensors, with
    no host-to-device copy that a CUDA graph would capture as a frozen (or forbidden) transfer: the call's
    device values as they are, each host constant as a cached 0-dim device tensor refilled (``fill_``) only
    when its value changes, stacked into the same vector (a stable address, as a replayed graph needs).
    """

    def __init__(self) -> None:
        self.host = array.array("f", [0.0] * len(SCALARS))  # refilled each step: a CPU tensor over it
        self.host_tensor = torch.frombuffer(self.host, dtype=torch.float32)
        self.device: Tensor | None = None
        self._constants: list[Tensor] = []  # capturable: one 0-dim float32 device tensor per slot
        self._known = array.array("f", [0.0] * len(SCALARS))  # the values they hold

    def fill(self, values: dict[str, float | Tensor | None], device: torch.device) -> Tensor:
        """The step's scalars as one float32 vector on ``device`` (host values: no device sync; device values
        of a device-side guard are gathered on the device; under ``capturable``, no host-to-device copy)."""
        if not host_reads_allowed():
            return self._assemble(values, device)
        tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
        for i, k in enumerate(SCALARS):
            v = values.get(k)
            self.host[i] = 0.0 if v is None or isinstance(v, Tensor) else float(v)
        if device.type == "cpu" and not tensors:
            return self.host_tensor  # CPU graphs run before the call returns, so before the next refill
        if self.device is None or self.device.device != device:
            self.device = torch.empty(len(SCALARS), dtype=torch.float32, device=device)
        self.device.copy_(self.host_tensor, non_blocking=True)
        for k, v in tensors.items():
            self.device[SCALARS.index(k)] = v.to(device, torch.float32).reshape(())
        return self.device

    def _assemble(self, values: dict[str, float | Tensor | None], device: torch.device) -> Tensor:
        """The vector built on the device (``capturable``): one stack of 0-dim device tensors into ``self.device``."""
        if self.device is None or self.device.device != device:
            self.device = torch.empty(len(SCALARS), dtype=torch.float32, device=device)
        if not self._constants or self._constants[0].device != device:  # (fill() may have made self.device)
            self._constants = list(torch.zeros(len(SCALARS), dtype=torch.float32, device=device).unbind(0))
            self._known = array.array("f", [0.0] * len(SCALARS))
        entries = []
        for i, k in enumerate(SCALARS):
            v = values.get(k)
            if isinstance(v, Tensor):
                entries.append(v.to(device, torch.float32).reshape(()))
                continue
            self.host[i] = 0.0 if v is None else float(v)  # rounded to float32, as the vector holds it
            if self.host[i] != self._known[i]:
                self._constants[i].fill_(self.host[i])
                self._known[i] = self.host[i]
            entries.append(self._constants[i])
        return torch.stack(entries, out=self.device)


class _Graphs:
    """One bucket's compiled phases (found once per feature set) and its scalar vector."""

    def __init__(self) -> None:
        self.graphs: dict[tuple[str, tuple[Any, ...]], Callable[..., Any]] = {}  # by (phase, call flags)
        self.features: dict[tuple[Any, ...], Features] = {}  # by call flags: the bucket's masks are fixed
        self.warm: set[tuple[Any, ...]] = set()  # call flags whose update graphs have run (so are compiled)
        self.vector = ScalarVector()

    def graph(self, fn: Callable[..., Any], flags: tuple[Any, ...], *lists: Sequence[Tensor]) -> Callable[..., Any]:
        key = (fn.__name__, flags)
        compiled = self.graphs.get(key)
        if compiled is None:
            compiled = self.graphs[key] = compiled_graph(fn, self.features[flags], _signature(*lists))
        return compiled

    def scalars(self, values: dict[str, float | Tensor | None], device: torch.device) -> Tensor:
        return self.vector.fill(values, device)




def _scratch(*lists: Sequence[Tensor]) -> list[list[Tensor]]:
    """Zeros laid out as ``lists`` are (same sizes and strides; views of one base are views of one scratch
    base of its shape, as AOTAutograd lifts aliased inputs to their base; a Parameter stays one), so that a
    graph run on them is the graph the real tensors will run."""
    bases: dict[int, Tensor] = {}

    def zeros_like(t: Tensor) -> Tensor:
        return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device).zero_()

    out = []
    for ts in lists:
        row = []
        for t in ts:
            base = t._base
            if base is None:
                view = zeros_like(t)
            else:
                if id(base) not in bases:
                    bases[id(base)] = zeros_like(base)
                view = bases[id(base)].as_strided(t.size(), t.stride(), t.storage_offset())
            row.append(torch.nn.Parameter(view, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter)
                       else view)
        out.append(row)
    return out


def scalar_values(bucket: Bucket, plan: StepPlan) -> dict[str, float | Tensor | None]:
    """This call's scalars of ``bucket``, by :data:`SCALARS` name (None: the feature is off)."""
    values: dict[str, float | Tensor | None] = {}
    if plan.scalars is not None:
        s = plan.scalars[bucket.group_index]
        values.update({k: getattr(s, k) for k in SCALARS[:8]})
        values.update(min_trust_ratio=s.min_trust_ratio, max_trust_ratio=s.max_trust_ratio)
    values.update(ema_weight=plan.ema_weight, loss_scale=plan.loss_scale, accumulation=plan.accumulation,
                  clipvalue=plan.clip.value if plan.clip.kind == "value" else None, unscale=plan.unscale)
    return values


class CompiledBackend(TorchOpsBackend):
    """Any device and dtype (float32 state for low precision); 0-dim device scalars (``capturable``) too."""

    name = "compiled"

    def refuses(self, bucket: Bucket, config: LambConfig) -> str | None:
        return unavailable(bucket.device.type)

    def prepare(self, bucket: Bucket) -> _Graphs:
        return _Graphs()

    def begin(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> CompiledCall:
        return CompiledCall(bucket, grads, plan)

    def ready(self, call: CompiledCall, clipping: bool) -> None:
        call.ready(clipping)


_UNSCALED_IN = {torch.bfloat16: "bfloat16", torch.float64: "float64"}  # float16 ones stay float32 (no underflow)


def _flags(bucket: Bucket, plan: StepPlan, factors: bool) -> tuple[Any, ...]:
    """What of this call decides the graphs (a few bools), with its :class:`Features` made once per bucket (the
    masks are fixed while the layout holds, so a step never rebuilds or hashes them)."""
    s = plan.scalars[bucket.group_index] if plan.scalars is not None else None
    flags = (
        plan.loss_scale is not None, plan.accumulation is not None,
        "value" if plan.clip.kind == "value" else ("factors" if factors else None),
        s is not None and s.decay_factor is not None, s is not None and s.adaptive_weight_decay is not None,
        s is not None and s.min_trust_ratio is not None, s is not None and s.max_trust_ratio is not None,
        plan.ema_weight is not None,
        None if plan.unscale is None else _UNSCALED_IN.get(bucket.owners[0].dtype, "float32"),
    )
    graphs: _Graphs = bucket.handle
    if flags not in graphs.features:
        n = len(bucket.weights)
        decay, off = tuple(bucket.decay_mask), (False,) * n
        graphs.features[flags] = Features(
            loss_scale=flags[0], unscale=flags[8], accumulate=flags[1], clip=flags[2],
            decay=decay if flags[3] else off, adaptive=decay if flags[4] else off,
            adapt=tuple(bucket.adapt_mask) if bucket.adapt_mask is not None else (True,) * n,
            low=bucket.weights[0].dtype in LOW_PRECISION, bounds=(flags[5], flags[6]), ema=flags[7],
            mirror=bool(bucket.mirrors),
        )
    return flags


class CompiledCall:
    """One call of the compiled phases on one bucket."""

    def __init__(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> None:
        self.bucket, self.grads, self.plan = bucket, packed(grads), plan  # a graph per layout, not per stride
        self.own_dtypes = type(grads) is PackedGrads  # the layout found every gradient of its parameter's dtype

    def accumulate(self) -> None:
        ForeachBackend.accumulate(self.bucket, self.grads, self.plan)  # one add per micro-step: no graph needed

    def grad_squares(self) -> Tensor:
        bucket, plan = self.bucket, self.plan
        graphs: _Graphs = bucket.handle
        flags = _flags(bucket, plan, False)
        s = graphs.scalars(scalar_values(bucket, plan), bucket.device)
        grads, _ = state_grads(bucket, self.grads)
        fn = graphs.graph(grad_squares, flags, bucket.momentums, bucket.accumulators)
        return narrowed(fn(grads, bucket.accumulators, s, bucket.momentums[0].dtype))

    def ready(self, clipping: bool) -> None:
        """Compile this update's graphs before any bucket is written: each new one runs once on scratch zeros
        laid out as the bucket is. A compile that fails (or is interrupted) then leaves everything as it was."""
        bucket, plan = self.bucket, self.plan
        graphs: _Graphs = bucket.handle
        for p, name in zip(bucket.owners, () if self.own_dtypes else bucket.names):  # dynamo refuses those
            if p.grad is not None and p.grad.dtype != p.dtype:
                raise ValueError(f"implementation='compiled' cannot take parameter {name!r}: its .grad is "
                                 f"{p.grad.dtype} and it is {p.dtype} (torch.compile refuses that pair). Give it "
                                 "a gradient of its own dtype, or use implementation='foreach'.")
        flags = _flags(bucket, plan, clipping)
        if flags in graphs.warm:
            return
        factors = torch.ones(len(bucket.weights), device=bucket.device) if clipping else None  # scratch factors
        w, g, m, v, acc, avg, mirrors = _scratch(bucket.weights, self.grads, bucket.momentums, bucket.velocities,
                                                 bucket.accumulators, bucket.averages, bucket.mirrors)
        s = graphs.scalars(scalar_values(bucket, plan), bucket.device).clone()
        sums = graphs.graph(phase1, flags, bucket.weights, bucket.momentums, bucket.accumulators)(
            w, g, m, v, acc, factors, s)
        graphs.graph(phase2, flags, bucket.weights, bucket.momentums, bucket.averages, bucket.mirrors)(
            w, m, v, avg, mirrors, sums, s)
        if clipping:  # the clipping norms' graph
            measure = _flags(bucket, plan, False)
            graphs.graph(grad_squares, measure, bucket.momentums, bucket.accumulators)(
                state_grads(bucket, g)[0], acc, s, bucket.momentums[0].dtype)
        graphs.warm.add(flags)

    def update(self, clip_factors: Tensor | None) -> TrustStats:
        bucket, plan = self.bucket, self.plan
        graphs: _Graphs = bucket.handle
        flags = _flags(bucket, plan, clip_factors is not None)
        s = graphs.scalars(scalar_values(bucket, plan), bucket.device)
        factors = clip_factors.to(bucket.device, torch.float32) if clip_factors is not None else None
        sums = graphs.graph(phase1, flags, bucket.weights, bucket.momentums, bucket.accumulators)(
            bucket.weights, self.grads, bucket.momentums, bucket.velocities, bucket.accumulators, factors, s)
        if bucket.reduce is not None:
            sums = bucket.reduce(sums)
        weight_norm, update_norm, ratio = graphs.graph(phase2, flags, bucket.weights, bucket.momentums,
                                                       bucket.averages, bucket.mirrors)(
            bucket.weights, bucket.momentums, bucket.velocities, bucket.averages, bucket.mirrors, sums, s)
        return TrustStats(weight_norm, update_norm, ratio)
