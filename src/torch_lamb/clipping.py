"""Gradient clipping over lists of tensors, with Keras's formulas.

Each function returns the clipped gradients. With ``inplace=False`` the inputs (typically
``p.grad``) are left untouched and the result lives in fresh buffers; with ``inplace=True`` the
inputs are overwritten (used on the optimizer's own working buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["clip_by_global_norm", "clip_by_norm", "clip_by_value", "global_clip_factor",
           "global_norm", "norm_clip_factors", "scale_by_factors"]


def scale_by_factors(grads: list[Tensor], factors: Tensor, *, inplace: bool = False) -> list[Tensor]:
    """``g_i * factors[i]`` (a 1-D tensor of per-tensor factors, or one 0-dim factor for all)."""
    factors = factors.to(grads[0].dtype)
    factors = [factors] * len(grads) if factors.dim() == 0 else list(factors.unbind(0))
    if inplace:
        torch._foreach_mul_(grads, factors)
        return grads
    return list(torch._foreach_mul(grads, factors))


def clip_by_value(grads: Sequence[Tensor], clipvalue: float, *, inplace: bool = False) -> list[Tensor]:
    """Clamp every element to ``[-clipvalue, clipvalue]``."""
    grads = list(grads)
    if not grads:
        return grads
    if inplace:
        torch._foreach_clamp_min_(grads, -clipvalue)
    else:
        grads = list(torch._foreach_clamp_min(grads, -clipvalue))
    torch._foreach_clamp_max_(grads, clipvalue)
    return grads


def clip_by_norm(
    grads: Sequence[Tensor], norms: Tensor, clipnorm: float, *, inplace: bool = False
) -> list[Tensor]:
    """Per tensor: ``g * clipnorm / max(||g||, clipnorm)`` given the tensors' full norms."""
    grads = list(grads)
    if not grads:
        return grads
    return scale_by_factors(grads, norm_clip_factors(norms, clipnorm), inplace=inplace)


def norm_clip_factors(norms: Tensor, clipnorm: float) -> Tensor:
    """Per tensor, Keras's ``clipnorm / max(||g||, clipnorm)`` (the factor :func:`clip_by_norm` applies)."""
    return clipnorm / torch.clamp_min(norms, clipnorm)


def global_norm(norms: Sequence[Tensor], reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``sqrt(sum ||g_i||^2)`` from per-tensor norms (1-D tensors, possibly on several devices); ``reduce`` sums the
    squared total over ranks whose tensors are others (a rank with none adds 0)."""
    device = norms[0].device if norms else torch.device("cpu")  # summed in float64: no overflow
    squares = [torch.sum(torch.square(n.to(device, torch.float64))) for n in norms]
    total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64, device=device)
    if reduce is not None:
        total = reduce(total.reshape(1)).reshape(())
    return torch.sqrt(total)


def global_clip_factor(norm: Tensor, clipnorm: float) -> Tensor:
    """Keras's ``clipnorm * min(1/n, 1/clipnorm) + (n - n)``: 1 when n = 0, NaN when n is not finite."""
    return clipnorm * torch.minimum(1.0 / norm, torch.full_like(norm, 1.0 / clipnorm)) + (norm - norm)


def clip_by_global_norm(
    grads: Sequence[Tensor], factor: Tensor, *, inplace: bool = False
) -> list[Tensor]:
    """Scale every tensor by the global clip factor from :func:`global_clip_factor`."""
    grads = list(grads)
    if not grads:
        return grads
    return scale_by_factors(grads, factor.to(grads[0].device), inplace=inplace)
