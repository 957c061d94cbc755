"""The LAMB update over lists of tensors: one definition, a per-tensor reference and a foreach path.

Keras order and expression forms (``keras/src/optimizers/lamb.py``), for one bucket of tensors that
share device, dtype and hyperparameters::

    w  = w * (1 - weight_decay * lr)                   # decoupled decay, before the update
    m  = m + (g - m) * (1 - beta_1)
    v  = v + (g*g - v) * (1 - beta_2)
    u  = (m / (1 - beta_1**t)) / (sqrt(v / (1 - beta_2**t)) + epsilon)
    r  = ||w|| / ||u||  if both are > 0  else 1        # full-tensor norms, w after decay
    w  = w - (r * lr) * u

Scalars follow Keras's float32 rounding: ``1 - beta`` is formed in double then used in float32,
``beta ** t`` and ``1 - weight_decay * lr`` are float32. Low-precision tensors (float16, bfloat16)
are updated with float32 math against float32 moments.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .distributed import Reducer, full_norms

__all__ = ["LambScalars", "TrustStats", "bias_correction", "foreach_add_scalar_", "foreach_lerp_", "lamb_reference",
           "lamb_scalars", "lamb_update"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LambScalars:
    """The scalars of one update, rounded as Keras rounds them: host floats, or 0-dim device tensors.

    With ``capturable=True`` (:mod:`torch_lamb.capturable`) what changes from call to call without the
    host, ``bias_correction_*`` and a device-evaluated ``lr`` with its ``decay_factor``, is a 0-dim
    float32 device tensor derived from the device step counter (so a captured CUDA graph advances it);
    the constants of the call stay floats (kernel arguments, frozen in a graph as a cached tensor would
    be; ``adaptive_weight_decay`` must be one: torch takes ``alpha=`` as a number only).
    ``skip_nonfinite`` on the device makes ``lr``, ``one_minus_beta_*``, ``epsilon`` and ``decay_factor``
    masked 0-dim tensors (a skipped step decided without a host sync). The update functions accept either.
    """

    lr: float | Tensor
    one_minus_beta_1: float | Tensor
    one_minus_beta_2: float | Tensor
    bias_correction_1: float | Tensor  # 1 - beta_1 ** t
    bias_correction_2: float | Tensor  # 1 - beta_2 ** t
    epsilon: float | Tensor
    decay_factor: float | Tensor | None  # decoupled mode: 1 - weight_decay * lr (None when off)
    adaptive_weight_decay: float | None = None  # adaptive mode: u += weight_decay * w (None when off)
    min_trust_ratio: float | None = None  # optional bounds on the ratio (after the zero-norm rule)
    max_trust_ratio: float | None = None


@dataclass
class TrustStats:
    """Per-tensor ``||w||``, ``||u||`` and trust ratio of one update (1-D tensors, on device)."""

    weight_norm: Tensor
    update_norm: Tensor
    trust_ratio: Tensor


def foreach_lerp_(starts: list[Tensor], ends: list[Tensor], weight: float | Tensor) -> None:
    """``torch._foreach_lerp_`` with a float or a 0-dim tensor weight. torch's one-weight overload takes a
    Python number, so it would read a tensor on the host (``.item()``, a device sync, frozen in a captured
    graph); a tensor goes through the per-tensor-weights overload instead (the same formula and bits)."""
    if isinstance(weight, Tensor):
        if starts:
            torch._foreach_lerp_(starts, ends, [weight.to(starts[0].device, starts[0].dtype)] * len(starts))
    else:
        torch._foreach_lerp_(starts, ends, weight)


def foreach_add_scalar_(tensors: list[Tensor], value: float | Tensor) -> None:
    """``t += value`` for each tensor; a 0-dim tensor takes the ``Tensor`` overload (no host read, unlike
    the ``Scalar`` one that Python's overload resolution would pick for it)."""
    if isinstance(value, Tensor):
        if tensors:
            torch.ops.aten._foreach_add_.Tensor(tensors, value)
    else:
        torch._foreach_add_(tensors, value)


def f32(x: float) -> float:
    """``x`` rounded to float32 (inf beyond its range, as a float32 cast gives)."""
    try:
        return struct.unpack("f", struct.pack("f", float(x)))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _libm_powf() -> Callable[[float, float], float] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("m") or None).powf
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_float, ctypes.c_float], ctypes.c_float
    return fn


_POWF = _libm_powf()


def _pow32(base: float, exponent: float) -> float:
    """``base ** exponent`` in float32 arithmetic (libm's ``powf``, as torch's and numpy's float32 pow),
    computed on the host without a tensor."""
    if _POWF is not None:
        return float(_POWF(base, exponent))
    return f32(math.pow(base, exponent))


def _complement(beta: float | Tensor) -> float:
    """``1 - beta`` as Keras forms it: in double for a Python float, in float32 otherwise."""
    if type(beta) is float:
        return 1.0 - beta
    return f32(1.0 - f32(float(beta)))


def bias_correction(beta: float | Tensor, step: int | Tensor) -> float | Tensor:
    """``1 - beta ** t`` in float32, as Keras forms it: on the host for an int step (libm's ``powf``, as torch's
    0-dim float32 pow), or as a 0-dim float32 tensor for a float32 device step (``capturable``)."""
    base = f32(float(beta))
    if isinstance(step, Tensor):
        return 1 - torch.pow(base, step)
    return f32(1.0 - _pow32(base, f32(step)))


def lamb_scalars(
    *,
    lr: float | Tensor,
    beta_1: float | Tensor,
    beta_2: float | Tensor,
    epsilon: float,
    weight_decay: float | None,
    step: int | Tensor,
    weight_decay_mode: str = "decoupled",
    min_trust_ratio: float | None = None,
    max_trust_ratio: float | None = None,
) -> LambScalars:
    """The scalars of update number ``step`` (1-based): host floats, or, for a device ``step`` (a float32 0-dim
    tensor) and a device ``lr``, the bias corrections and the learning rate with its decay factor on the device.

    ``weight_decay_mode="decoupled"`` is Keras's decay before the update, outside the ratio;
    ``"adaptive"`` is the paper's ``u + weight_decay * w`` inside the ratio.
    """
    lr32 = lr if isinstance(lr, Tensor) else f32(lr)
    adaptive = weight_decay_mode == "adaptive"
    decay: float | Tensor | None = None
    if weight_decay is not None and not adaptive:
        decay = 1 - lr32 * f32(weight_decay) if isinstance(lr32, Tensor) else f32(1.0 - f32(f32(weight_decay) * lr32))
    return LambScalars(
        lr=lr32,
        one_minus_beta_1=_complement(beta_1),
        one_minus_beta_2=_complement(beta_2),
        bias_correction_1=bias_correction(beta_1, step),
        bias_correction_2=bias_correction(beta_2, step),
        epsilon=float(epsilon),
        decay_factor=decay,
        adaptive_weight_decay=weight_decay if adaptive and weight_decay is not None else None,
        min_trust_ratio=min_trust_ratio,
        max_trust_ratio=max_trust_ratio,
    )


def trust_ratio(
    weight_norm: Tensor,
    update_norm: Tensor,
    scalars: LambScalars | None = None,
    adapt_mask: Sequence[bool] | None = None,
) -> Tensor:
    """``||w|| / ||u||`` where both norms are > 0, else 1 (NaN norms give 1, as in Keras).

    Optional bounds clamp the ratio; tensors excluded from layer adaptation take exactly 1.
    """
    ok = (weight_norm > 0) & (update_norm > 0)
    one = torch.ones_like(weight_norm)
    ratio = torch.where(ok, weight_norm / update_norm, one)
    if scalars is not None and (scalars.min_trust_ratio is not None or scalars.max_trust_ratio is not None):
        ratio = ratio.clamp(scalars.min_trust_ratio, scalars.max_trust_ratio)
    if adapt_mask is not None and not all(adapt_mask):
        ratio = torch.where(_mask_tensor(tuple(adapt_mask), ratio.device), ratio, one)
    return ratio


@functools.lru_cache(maxsize=256)
def _mask_tensor(mask: tuple[bool, ...], device: torch.device) -> Tensor:
    """A bool tensor of ``mask`` on ``device``, built once (no host-to-device copy per step)."""
    return torch.tensor(mask, dtype=torch.bool, device=device)


def lamb_update(
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
    """One LAMB update of a bucket with ``torch._foreach_*`` ops (no host sync).

    ``decay_mask[i]``: tensor i takes weight decay; ``adapt_mask[i]`` (default all True): tensor i
    takes the trust ratio (else 1); ``reduce``: sums local squared norms across shards.
    """
    params, grads = list(params), list(grads)
    low = params[0].dtype in LOW_PRECISION
    work = [p.float() for p in params] if low else params
    if low or grads[0].dtype != momentums[0].dtype:
        grads = [g.to(momentums[0].dtype) for g in grads]

    if scalars.decay_factor is not None:
        decayed = [w for w, d in zip(work, decay_mask) if d]
        if decayed:
            torch._foreach_mul_(decayed, scalars.decay_factor)

    foreach_lerp_(momentums, grads, scalars.one_minus_beta_1)
    squares = torch._foreach_mul(grads, grads)
    foreach_lerp_(velocities, squares, scalars.one_minus_beta_2)

    updates = torch._foreach_div(momentums, scalars.bias_correction_1)
    denoms = squares  # reuse the buffer: sqrt(v / (1 - beta_2**t)) + epsilon
    torch._foreach_copy_(denoms, velocities)
    torch._foreach_div_(denoms, scalars.bias_correction_2)
    torch._foreach_sqrt_(denoms)
    foreach_add_scalar_(denoms, scalars.epsilon)
    torch._foreach_div_(updates, denoms)
    if scalars.adaptive_weight_decay is not None:
        pairs = [(u, w) for u, w, d in zip(updates, work, decay_mask) if d]
        if pairs:
            decayed_updates, decayed_weights = zip(*pairs)
            torch._foreach_add_(
                list(decayed_updates), list(decayed_weights), alpha=scalars.adaptive_weight_decay
            )

    weight_norm, update_norm = full_norms(work, updates, reduce=reduce)
    ratio = trust_ratio(weight_norm, update_norm, scalars, adapt_mask)
    torch._foreach_mul_(updates, list((ratio * scalars.lr).to(updates[0].dtype).unbind(0)))
    torch._foreach_sub_(work, updates)
    if low:
        torch._foreach_copy_(params, work)
    return TrustStats(weight_norm, update_norm, ratio)


def lamb_reference(
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
    """The same update, one tensor at a time, in Keras's literal expression forms (for tests)."""
    w_norms, u_norms, ratios = [], [], []
    work = [p.float() if p.dtype in LOW_PRECISION else p for p in params]
    adapt_mask = [True] * len(work) if adapt_mask is None else list(adapt_mask)
    for w, g, m, v, decay, adapt in zip(work, grads, momentums, velocities, decay_mask, adapt_mask):
        g = g.to(m.dtype)
        if scalars.decay_factor is not None and decay:
            w.mul_(scalars.decay_factor)
        m.copy_(m + (g - m) * scalars.one_minus_beta_1)
        v.copy_(v + (torch.square(g) - v) * scalars.one_minus_beta_2)
        m_hat = m / scalars.bias_correction_1
        u = m_hat / (torch.sqrt(v / scalars.bias_correction_2) + scalars.epsilon)
        if scalars.adaptive_weight_decay is not None and decay:
            u = u + scalars.adaptive_weight_decay * w
        whole = w if w.is_contiguous() else w.contiguous()  # a slice's view: summed as its own tensor would be
        w_norm, u_norm = (n[0] for n in full_norms([whole], [u], reduce=reduce))
        ratio = trust_ratio(w_norm, u_norm, scalars, None if adapt else [False]).reshape(())
        w.copy_(w - (ratio * scalars.lr).to(w.dtype) * u)
        w_norms.append(w_norm)
        u_norms.append(u_norm)
        ratios.append(ratio)
    for p, w in zip(params, work):
        if p is not w:
            p.copy_(w)
    return TrustStats(torch.stack(w_norms), torch.stack(u_norms), torch.stack(ratios))
