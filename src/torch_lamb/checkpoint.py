"""What a Lamb state dict holds beyond torch's, and the checks a loaded one passes before anything changes.

torch's ``Optimizer.state_dict()`` format, plus, in every param group:

* the clock's counters (``iterations``: calls; ``applied_updates``; ``finite_in_window``; ``skipped_steps``),
  also kept in the live groups (so that an engine that saves and restores param groups itself, such as
  ``ZeroRedundancyOptimizer``, carries them);
* per parameter: ``exclude_from_weight_decay``, ``exclude_from_layer_adaptation`` (bools) and
  ``trust_ratio_slices`` (normalised specs or None).

:func:`check_state_dict` checks every value a loaded state dict holds with the constructor's checks (a
negative velocity, a NaN epsilon or a missing parameter entry is refused, naming the value), so that a load
that raises changes nothing and a load that passes cannot fail at the next step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _validation as check
from .clock import COUNTERS, StepClock
from .config import COUNTER_GROUP_KEYS, VARIANT_KEYS, check_variant
from .distributed import is_dtensor, local
from .functional import LOW_PRECISION
from .rules import ADAPT_EXCLUDED, DECAY_EXCLUDED, RULE_KEYS, SLICES, checked
from .state import MASTER, VELOCITY, state_dtype

__all__ = ["COUNTER_KEYS", "Loaded", "check_state_dict", "counters_in", "restore_groups", "restore_state",
           "write_counters"]

COUNTER_KEYS = dict(zip(COUNTERS, COUNTER_GROUP_KEYS))
"""The clock's counters by their names in param groups (those of the checkpoints before the clock)."""


@dataclass(frozen=True)
class Loaded:
    """A checked state dict's parts that torch's loader does not handle."""

    ids_to_params: dict[Any, Tensor]
    rules: list[dict[str, list[Any] | None]]  # per group: the per-parameter lists it holds (None: not saved)
    counters: dict[str, int] | None  # None: a checkpoint without counters


def _where(index: int) -> str:
    return f"param group {index} of the state dict"


def check_state_dict(state_dict: Any, live_groups: Sequence[dict[str, Any]], slot_keys: Sequence[str],
                     accumulation_steps: int | None, given: set[int] | None = None) -> Loaded:
    """Check ``state_dict`` against the live groups; raise, naming the value, before anything changes. ``given``:
    the tensors the optimizer was given; a group holding others (an engine's flat partitions) keeps its rules."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list) or not isinstance(
            state_dict.get("state"), dict):
        raise ValueError("Not an optimizer state dict: it must be a dict with 'state' (a dict) and 'param_groups' "
                         f"(a list). Received: {type(state_dict).__name__}")
    groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(groups) != len(live_groups):
        raise ValueError(f"The state dict has {len(groups)} param groups; this optimizer has {len(live_groups)}.")
    ids_to_params: dict[Any, Tensor] = {}
    rules = []
    for index, (saved, live) in enumerate(zip(groups, live_groups)):
        needed = ("params", "beta_1", "beta_2", "epsilon")
        missing = [k for k in needed if not isinstance(saved, dict) or k not in saved]
        if missing:
            raise ValueError(
                f"Not a torch_lamb.Lamb state dict: {_where(index)} lacks {missing} (a state dict of another "
                "optimizer, such as torch.optim.AdamW, cannot be loaded into Lamb)."
            )
        if not isinstance(saved["params"], list) or len(saved["params"]) != len(live["params"]):
            raise ValueError(f"{_where(index)} has {len(saved['params'])} parameters; the matching group here has "
                             f"{len(live['params'])}.")
        try:
            _check_values(saved)
            swapped = given is not None and not all(id(p) in given for p in live["params"])
            rules.append(dict.fromkeys(RULE_KEYS) if swapped else _check_rules(saved, live, index))
        except (ValueError, TypeError) as err:
            raise type(err)(f"{err} ({_where(index)})") from None
        ids_to_params.update(zip(saved["params"], live["params"]))
    _check_state(saved_state, ids_to_params, slot_keys)
    return Loaded(ids_to_params, rules, _counters(groups[0] if groups else {}, accumulation_steps))


def _check_values(saved: dict[str, Any]) -> None:
    lr = saved.get("lr", 0.0)
    if not (isinstance(lr, Tensor) and lr.dim() == 0 and lr.is_floating_point()):
        check.number("lr", lr)
    for key in ("beta_1", "beta_2"):
        check.number(key, saved[key], low=0.0, high=1.0)
    check.number("epsilon", saved["epsilon"])
    check.optional_nonnegative("weight_decay", saved.get("weight_decay"))
    check_variant({k: saved.get(k, d) for k, d in zip(VARIANT_KEYS, ("decoupled", None, None, True))})


def _check_rules(saved: dict[str, Any], live: dict[str, Any], index: int) -> dict[str, list[Any] | None]:
    """The per-parameter rule lists the group saved, checked (None: a checkpoint from before that rule)."""
    return {key: checked(key, saved[key], live, index) if key in saved else None
            for key in (DECAY_EXCLUDED, ADAPT_EXCLUDED, SLICES)}


def _check_state(saved_state: dict[Any, Any], ids_to_params: dict[Any, Tensor], slot_keys: Sequence[str]) -> None:
    """Every parameter's slots: present, floating, of its parameter's shape, finite; velocities >= 0."""
    if not saved_state:
        return  # a state dict saved before any state was made: the slots are made afresh
    tensors = []
    sharded = False
    for pid, p in ids_to_params.items():
        value = saved_state.get(pid)
        if value is None and local(p).numel() == 0:
            continue  # a piece of nothing (FSDP1 gives a rank none of some parameters): its slots are made afresh
        if not isinstance(value, dict):
            raise ValueError(f"The state dict has no state for parameter {pid!r} (a dict of tensors). Received: "
                             f"{value!r}")
        missing = [k for k in slot_keys if k not in value]
        if missing:
            raise ValueError(
                f"The state dict lacks {missing} for parameter {pid!r}: was it saved with other `use_ema` / "
                "`gradient_accumulation_steps` settings, or by another optimizer?"
            )
        for key, tensor in value.items():
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise ValueError(f"State {key!r} of parameter {pid!r} must be a floating-point tensor. "
                                 f"Received: {tensor!r}")
            if tensor.shape != p.shape:
                raise ValueError(
                    f"State {key!r} of parameter {pid!r} has shape {tuple(tensor.shape)} but its parameter has "
                    f"shape {tuple(p.shape)}: the state dict is from a different model."
                )
            sharded |= is_dtensor(tensor)
            tensors.append((pid, key, local(tensor)))
    values = [(pid, key, t) for pid, key, t in tensors if t.numel()]
    bad = [f"State {key!r} of parameter {pid!r} holds inf or NaN" for pid, key, t in values
           if not bool(torch.isfinite(t.detach().abs().max()))]
    bad += [f"State {VELOCITY!r} of parameter {pid!r} holds negative values (a second moment is >= 0)"
            for pid, key, t in values if key == VELOCITY and bool((t < 0).any())]
    if _agreed_count(len(bad), sharded):
        raise ValueError(f"{bad[0] if bad else 'A shard of the state held on another rank is corrupt'}: the state "
                         "dict is corrupt.")


def _agreed_count(count: int, sharded: bool) -> int:
    """``count`` summed over the ranks when the state is sharded (DTensor): every rank then raises, or none does
    (an error on one rank would leave the others waiting in their next collective)."""
    if not sharded:
        return count
    import torch.distributed as dist

    total = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total)


def _counters(group: dict[str, Any], accumulation_steps: int | None) -> dict[str, int] | None:
    """The clock's counters a group saved (non-negative ints), or None when it saved none. A checkpoint from
    before ``applied_updates`` was always saved derives it from its calls."""
    if COUNTER_KEYS["calls"] not in group:
        return None
    values = {}
    for name, key in COUNTER_KEYS.items():
        value = group.get(key)
        if value is None and name == "updates":
            calls = values["calls"]
            value = calls // accumulation_steps if accumulation_steps else calls
        elif value is None:
            value = 0
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{key}` in the state dict's param groups must be an int >= 0. Received: {key}={value!r}")
        values[name] = value
    return values


def restore_state(state: dict[Any, dict[str, Tensor]], saved_state: dict[Any, Any], loaded: Loaded,
                  master_weights: bool) -> None:
    """The loaded slots in the state dtype (torch's loader casts floating state to the parameter's: float16
    moments would lose their range) and no master where one is not wanted (a float32 parameter is its own)."""
    for pid, value in saved_state.items():
        p = loaded.ids_to_params.get(pid)
        if p is None:
            continue
        state[p] = {k: t.to(device=p.device, dtype=state_dtype(p), copy=True) for k, t in value.items()}
        if not master_weights or p.dtype not in LOW_PRECISION:
            state[p].pop(MASTER, None)


def restore_groups(groups: list[dict[str, Any]], defaults: dict[str, Any], tensor_lrs: list[Tensor | None]) -> None:
    """Loaded groups as the live ones are: the variant options of checkpoints from before them, both spellings,
    and a tensor ``lr`` kept as the tensor a captured graph reads (filled with the loaded value)."""
    for group, live in zip(groups, tensor_lrs):
        for key in VARIANT_KEYS:
            group.setdefault(key, defaults[key])
        group["betas"], group["eps"] = (group["beta_1"], group["beta_2"]), group["epsilon"]
        if live is not None:
            saved_lr = group["lr"]
            live.copy_(saved_lr) if isinstance(saved_lr, Tensor) else live.fill_(float(saved_lr))
            group["lr"] = live


def write_counters(groups: Sequence[dict[str, Any]], clock: StepClock) -> None:
    """The clock's counters, shown in the live groups too (an engine that saves and restores groups itself carries
    them), on the host only (under ``capturable`` reading them would sync)."""
    if not clock.on_device:
        counters = {COUNTER_KEYS[k]: v for k, v in clock.counts.items()}
        for group in groups:
            group.update(counters)


def counters_in(groups: Sequence[dict[str, Any]], clock: StepClock) -> dict[str, int] | None:
    """The counters a group shows when they differ from the clock's (an edit, or an engine that restored its own
    copy of the groups, as ``ZeroRedundancyOptimizer.load_state_dict`` does), checked; else None."""
    if not groups or clock.on_device:
        return None
    shown = {k: groups[0].get(key, clock.counts[k]) for k, key in COUNTER_KEYS.items()}
    if shown == clock.counts:
        return None
    return {k: check.optional_int(COUNTER_KEYS[k], v, 0) for k, v in shown.items()}  # type: ignore[misc]
