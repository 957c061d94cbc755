"""Parameter-group recipes: the usual transformer split (no decay, no adaptation for biases and norms)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["NORM_TYPES", "is_exempt", "transformer_recipe"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Module types whose parameters are normalisation scales and shifts."""


def _is_norm(module: nn.Module, norm_types: tuple[type[nn.Module], ...]) -> bool:
    # Custom norms (LlamaRMSNorm, T5LayerNorm, ...) are recognised by their class name.
    return isinstance(module, norm_types) or type(module).__name__.endswith("Norm")


def is_exempt(name: str, param: torch.Tensor, owner: nn.Module,
              norm_types: tuple[type[nn.Module], ...] = NORM_TYPES) -> bool:
    """Whether a parameter is a bias or a normalisation parameter (exempt in the transformer recipe).

    A bias is a parameter named ``bias`` (or ending in ``.bias``/``_bias``) or any parameter with
    ``ndim <= 1`` (so also scales of custom norms); a norm parameter belongs to a module of
    ``norm_types`` or to a module whose class name ends in ``Norm``.
    """
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias") or param.ndim <= 1 or _is_norm(owner, norm_types)


def transformer_recipe(
    model: nn.Module,
    *,
    norm_types: tuple[type[nn.Module], ...] = NORM_TYPES,
    exempt_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Two param groups for :class:`~torch_lamb.Lamb`: the usual LAMB recipe for transformers.

    * ``[0]``: the weight matrices (and embeddings): weight decay and the trust ratio as configured.
    * ``[1]``: biases and normalisation parameters: ``weight_decay=None`` and
      ``layer_adaptation=False`` (trust ratio 1, a plain Adam step), as in the BERT recipe.

    Only trainable parameters (``requires_grad``) are included, each once (shared parameters are
    de-duplicated); parameters are given as ``(name, tensor)`` pairs so ``var_names`` regexes of
    :meth:`Lamb.exclude_from_weight_decay` still work. ``exempt_options`` updates the second group
    (e.g. ``{"layer_adaptation": True}`` to keep the trust ratio for norms). Empty groups are left out.

    Example::

        opt = torch_lamb.Lamb(torch_lamb.transformer_recipe(model), learning_rate=1e-3, weight_decay=0.01)
    """
    owners = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), module)
    decay: list[tuple[str, torch.Tensor]] = []
    exempt: list[tuple[str, torch.Tensor]] = []
    for name, p in model.named_parameters():  # de-duplicated by torch
        if not p.requires_grad:
            continue
        (exempt if is_exempt(name, p, owners[id(p)], norm_types) else decay).append((name, p))
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay})
    if exempt:
        groups.append({"params": exempt, "weight_decay": None, "layer_adaptation": False, **(exempt_options or {})})
    return groups
