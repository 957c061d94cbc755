"""Every option of :class:`~torch_lamb.Lamb`, checked in one place.

* :class:`LambConfig` holds the optimizer-wide options (clipping, EMA, loss scale, accumulation, the
  backend choice and the opt-in modes). It is frozen: the optimizer's attributes (``opt.clipnorm = 1.0``)
  replace it with a checked copy, so a value that is read at a step was checked when it was set.
* :class:`GroupOptions` is one param group's values for one call: the group's entries (which users and
  schedulers edit between steps) checked with the same checks as the constructor, callables evaluated.
* A param group may carry any constructor option (torch's convention, which ``ZeroRedundancyOptimizer``
  relies on): a per-group option overrides the optimizer's; an optimizer-wide one is accepted when it
  equals the optimizer's value and refused, by name, when it differs. Nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from . import _validation as check

__all__ = ["COUNTER_GROUP_KEYS", "IMPLEMENTATIONS", "WEIGHT_DECAY_MODES", "ClipSpec", "GroupOptions", "LambConfig",
           "adopt_group_options", "check_group_keys", "implementation_choice", "normalize_group", "resolve_group"]

IMPLEMENTATIONS = ("auto", "reference", "foreach", "fused", "compiled", "triton")
WEIGHT_DECAY_MODES = ("decoupled", "adaptive")
VARIANT_KEYS = ("weight_decay_mode", "min_trust_ratio", "max_trust_ratio", "layer_adaptation")
FOLLOW_DEFAULT = "default"  # a group whose learning rate follows the optimizer's `learning_rate`


@dataclass(frozen=True)
class ClipSpec:
    """Keras's gradient clipping of this call: at most one kind."""

    kind: str | None = None  # None, "value", "norm" (per tensor) or "global"
    value: float = 0.0


@dataclass(frozen=True)
class LambConfig:
    """The optimizer-wide options, checked (build with :meth:`checked`, change with :meth:`replace`)."""

    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None
    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: int | None = None
    loss_scale_factor: float | None = None
    gradient_accumulation_steps: int | None = None
    implementation: str = "auto"
    capturable: bool = False
    master_weights: bool = False
    skip_nonfinite: bool = False

    @classmethod
    def checked(cls, **values: Any) -> LambConfig:
        """A config from constructor values; raises naming the argument and its accepted range."""
        clips = {k: values.get(k) for k in ("clipnorm", "clipvalue", "global_clipnorm") if values.get(k) is not None}
        if len(clips) > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
                f"Received: {', '.join(f'{k}={v!r}' for k, v in clips.items())}"
            )
        out: dict[str, Any] = {k: check.optional_positive(k, values.get(k))
                               for k in ("clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor")}
        out["ema_momentum"] = check.number("ema_momentum", values.get("ema_momentum", 0.99), low=0.0, high=1.0,
                                           high_open=False)
        out["ema_overwrite_frequency"] = check.optional_int(
            "ema_overwrite_frequency", values.get("ema_overwrite_frequency"), 1)
        out["gradient_accumulation_steps"] = check.optional_int(
            "gradient_accumulation_steps", values.get("gradient_accumulation_steps"), 2)
        for flag in ("use_ema", "capturable", "master_weights", "skip_nonfinite"):
            out[flag] = check.flag(flag, values.get(flag, False))
        implementation = values.get("implementation", "auto")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"`implementation` must be one of {list(IMPLEMENTATIONS)} or None. "
                             f"Received: implementation={implementation!r}")
        out["implementation"] = implementation
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"Unknown option(s): {sorted(unknown)}")
        return cls(**out)

    def replace(self, **changes: Any) -> LambConfig:
        """A checked copy with ``changes`` (the old config stays in force if a change is refused)."""
        return self.checked(**{**dataclasses.asdict(self), **changes})

    @property
    def clip(self) -> ClipSpec:
        if self.clipvalue is not None:
            return ClipSpec("value", self.clipvalue)
        if self.clipnorm is not None:
            return ClipSpec("norm", self.clipnorm)
        if self.global_clipnorm is not None:
            return ClipSpec("global", self.global_clipnorm)
        return ClipSpec()

    def slot_keys(self) -> tuple[str, ...]:
        """The state slots every parameter needs under this config (Keras builds them all)."""
        return ("momentum", "velocity", *(("average",) if self.use_ema else ()),
                *(("gradient_accumulator",) if self.gradient_accumulation_steps else ()))


OPTIMIZER_WIDE = tuple(f.name for f in dataclasses.fields(LambConfig))


def adopt_group_options(params: Any, config: LambConfig) -> tuple[Any, LambConfig]:
    """torch's convention: an optimizer-wide option that every param group carries, with one value, is the
    optimizer's where the constructor left it at its default (torch's tests and ``ZeroRedundancyOptimizer``
    build groups so). Groups that disagree, or carry it only in part, are refused later, by name."""
    if isinstance(params, Iterator):
        params = list(params)  # a generator is read once, as torch does
    if not params or not all(isinstance(g, dict) for g in params):
        return params, config
    changes = {}
    for field in dataclasses.fields(LambConfig):
        values = [g[field.name] for g in params if field.name in g]
        if len(values) < len(params) or not _same((getattr(config, field.name),), (field.default,)):
            continue
        if not all(_same((v,), (values[0],)) for v in values):
            raise ValueError(f"`{field.name}` is an optimizer-wide option: the param groups may carry it only with "
                             f"one value. Received: {', '.join(f'{field.name}={v!r}' for v in values)} in "
                             f"param groups {list(range(len(values)))}")
        changes[field.name] = values[0]
    return params, (config.replace(**changes) if changes else config)


def implementation_choice(implementation: Any, foreach: bool | None, fused: bool | None) -> str:
    """One backend choice from ``implementation`` and torch's ``foreach=`` / ``fused=`` spellings of it."""
    for flag, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"`{flag}` must be a bool or None. Received: {flag}={value!r}")
    if foreach and fused:
        raise ValueError("`fused` and `foreach` cannot both be True.")
    if implementation is not None and (not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS):
        raise ValueError(
            f"`implementation` must be one of {list(IMPLEMENTATIONS)} or None. "
            f"Received: implementation={implementation!r}"
        )
    flags = "fused" if fused else "foreach" if foreach else "reference" if foreach is False else (
        "foreach" if fused is False else None)
    if implementation is not None and flags is not None and flags != implementation:
        raise ValueError(f"implementation={implementation!r} contradicts foreach={foreach!r}, fused={fused!r}.")
    return implementation or flags or "auto"


# ---------------------------------------------------------------------------------------------- param groups


@dataclass(frozen=True)
class GroupOptions:
    """One param group's checked values for this call (callables and schedules evaluated).

    ``lr`` is a 0-dim tensor only under ``capturable`` (torch's convention: the step reads it on the device,
    never on the host); ``schedule`` is the built-in schedule that ``capturable`` evaluates on the device step
    counter instead of ``lr`` (None: ``lr`` is the value).
    """

    lr: float | Tensor
    beta_1: float
    beta_2: float
    epsilon: float
    weight_decay: float | None
    weight_decay_mode: str
    min_trust_ratio: float | None
    max_trust_ratio: float | None
    schedule: Any = None


def check_variant(options: dict[str, Any]) -> dict[str, Any]:
    """The variant options of the optimizer or of one group, checked (all before any change)."""
    mode = options["weight_decay_mode"]
    if mode not in WEIGHT_DECAY_MODES:
        raise ValueError(
            f"`weight_decay_mode` must be one of {list(WEIGHT_DECAY_MODES)}. Received: weight_decay_mode={mode!r}"
        )
    low = check.optional_nonnegative("min_trust_ratio", options["min_trust_ratio"])
    high = check.optional_nonnegative("max_trust_ratio", options["max_trust_ratio"])
    if low is not None and high is not None and low > high:
        raise ValueError(
            "`min_trust_ratio` must be <= `max_trust_ratio`. "
            f"Received: min_trust_ratio={low!r}, max_trust_ratio={high!r}"
        )
    return {"weight_decay_mode": mode, "min_trust_ratio": low, "max_trust_ratio": high,
            "layer_adaptation": check.flag("layer_adaptation", options["layer_adaptation"])}


def normalize_group(group: dict[str, Any]) -> dict[str, Any]:
    """A new group dict with the aliases resolved: ``learning_rate`` -> ``lr``, ``eps`` -> ``epsilon`` and
    ``betas`` -> ``beta_1``/``beta_2`` (both spellings of one value are an error)."""
    group = dict(group)
    for alias, key in (("learning_rate", "lr"), ("eps", "epsilon")):
        if alias in group:
            if key in group and group[key] is not group[alias] and not _same((group[key],), (group[alias],)):
                raise ValueError(f"A param group may give `{key}` or `{alias}`, not both.")
            group[key] = group.pop(alias)
    if "betas" in group:
        betas = group.pop("betas")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"`betas` must be a pair (beta_1, beta_2). Received: betas={betas!r}")
        for key, value in zip(("beta_1", "beta_2"), betas):
            if key in group and not _same((group[key],), (value,)):
                raise ValueError("A param group may give `betas` or `beta_1`/`beta_2`, not both.")
            group[key] = value
    return group


COUNTER_GROUP_KEYS = ("iterations", "applied_updates", "finite_in_window", "skipped_steps")
"""The step counters as a param group shows them (written after each call, read from old checkpoints)."""

_TORCH_GROUP_KEYS = {*COUNTER_GROUP_KEYS, "params", "param_names", "initial_lr", "max_lr", "min_lr", "momentum",
                     "max_momentum", "base_momentum", "name", "foreach", "fused", "betas", "eps", "learning_rate",
                     "exclude_from_weight_decay", "exclude_from_layer_adaptation", "trust_ratio_slices"}


def check_group_keys(group: dict[str, Any], defaults: dict[str, Any], config: LambConfig) -> None:
    """Extra group keys are kept (as torch does), but one that looks like a misspelt option is refused, and an
    optimizer-wide option may appear only with the optimizer's own value (it cannot differ per group)."""
    known = _TORCH_GROUP_KEYS | set(defaults) | set(OPTIMIZER_WIDE)
    for key, value in group.items():
        if key in OPTIMIZER_WIDE:
            own = getattr(config, key)
            if not _same((value,), (own,)):
                raise ValueError(
                    f"`{key}` is an optimizer-wide option: a param group may carry it only with the optimizer's "
                    f"value ({key}={own!r}). Received: {key}={value!r} in a param group; set the optimizer's "
                    f"`{key}` instead."
                )
        elif key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if close:
                raise ValueError(f"Unknown param group key {key!r}: did you mean {close[0]!r}?")


def live_values(group: dict[str, Any], mark: tuple[Any, Any, Any] | None,
                sources: dict[str, Callable[[], Any]]) -> tuple[Any, Any, Any]:
    """``(beta_1, beta_2, epsilon)`` for this call, whichever spelling was edited since the last write.

    torch's schedulers (``OneCycleLR``, ``CyclicLR``) read and write ``betas``; users may write
    ``beta_1``/``beta_2``/``epsilon`` or ``eps``. Both spellings changed, to different values, is an error.
    """
    canonical = (group["beta_1"], group["beta_2"], group["epsilon"])
    betas = group.get("betas", canonical[:2])
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"`betas` must be a pair (beta_1, beta_2). Received: betas={betas!r}")
    alias = (betas[0], betas[1], group.get("eps", canonical[2]))
    if mark is None or _same(alias, mark) or _same(alias, canonical):
        chosen = canonical
    elif _same(canonical, mark):
        chosen = alias
    else:
        raise ValueError(
            f"`betas`/`eps` {alias[:2]}, {alias[2]} and `beta_1`/`beta_2`/`epsilon` {canonical} were both "
            "changed, to different values: set one spelling."
        )
    values = dict(zip(("beta_1", "beta_2", "epsilon"), chosen))
    values.update(sources)
    return values["beta_1"], values["beta_2"], values["epsilon"]


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return all(x is y or (not callable(x) and not callable(y) and not isinstance(x, Tensor)
                          and not isinstance(y, Tensor) and bool(x == y)) for x, y in zip(a, b))


def resolve_group(group: dict[str, Any], index: int, lr: Any, live: tuple[Any, Any, Any], config: LambConfig,
                  defaults: dict[str, Any], schedule: Any = None) -> GroupOptions:
    """Check a group's (possibly edited) values with the constructor's checks and evaluate its callables;
    errors name the group. ``lr``: the group's scheduled value (None: its ``lr`` entry). Under ``capturable``
    a 0-dim tensor ``lr`` stays a tensor, checked without reading its value."""
    try:
        check_group_keys(group, defaults, config)
        beta_1, beta_2, epsilon = live
        variant = check_variant({k: group[k] for k in VARIANT_KEYS})
        if lr is None and config.capturable and isinstance(group["lr"], Tensor):
            lr_value: float | Tensor = check.tensor_learning_rate("lr", group["lr"], group["params"])
        else:
            lr_value = check.number("lr", group["lr"] if lr is None else lr)
        return GroupOptions(
            lr=lr_value,
            beta_1=check.resolve("beta_1", beta_1, high=1.0),  # float32 rounding below 1 (check.number)
            beta_2=check.resolve("beta_2", beta_2, high=1.0),
            epsilon=check.number("epsilon", epsilon),
            weight_decay=check.optional_nonnegative("weight_decay", group["weight_decay"]),
            weight_decay_mode=variant["weight_decay_mode"],
            min_trust_ratio=variant["min_trust_ratio"],
            max_trust_ratio=variant["max_trust_ratio"],
            schedule=schedule,
        )
    except (ValueError, TypeError) as err:
        raise type(err)(f"{err} (param group {index})") from None


@dataclass
class GroupSources:
    """Where a group's values come from, kept beside it: its learning rate (``FOLLOW_DEFAULT``: the optimizer's
    ``learning_rate``; None: the group's own ``lr`` entry; else a schedule or callable), its callable betas
    (their values are written into the group, which stays checkpointable) and the ``(beta_1, beta_2,
    epsilon)`` last written (to tell which spelling a user or scheduler edited)."""

    lr: Any = FOLLOW_DEFAULT
    betas: dict[str, Callable[[], Any]] = dataclasses.field(default_factory=dict)
    mark: tuple[Any, Any, Any] | None = None


def evaluate(name: str, source: Any, step: int) -> float:
    """A learning-rate source's value at call ``step`` (a schedule takes the step; a callable none)."""
    return check.resolve(name, source, step=step)


def resolve_groups(groups: list[dict[str, Any]], sources: list[GroupSources], learning_rate: Any, step: int,
                   config: LambConfig, defaults: dict[str, Any],
                   device_schedule: Callable[[Any], bool]) -> tuple[GroupOptions, ...]:
    """Every group's checked values for call ``step`` (raises, naming the group, before anything changes).
    ``device_schedule(schedule)``: whether ``capturable`` evaluates that schedule on the device step counter."""
    default = evaluate("learning_rate", learning_rate, step) if callable(learning_rate) else None
    out = []
    for index, (group, source) in enumerate(zip(groups, sources)):
        schedule = learning_rate if source.lr == FOLLOW_DEFAULT else source.lr
        lr = default if source.lr == FOLLOW_DEFAULT else (evaluate("lr", source.lr, step) if callable(source.lr)
                                                           else None)
        on_device = schedule if config.capturable and callable(schedule) and device_schedule(schedule) else None
        out.append(resolve_group(group, index, lr, live_values(group, source.mark, source.betas), config,
                                 defaults, on_device))
    return tuple(out)


def learning_rate(name: str, value: Any, config: LambConfig) -> Any:
    """A learning rate: a number >= 0, a schedule or callable, or (``capturable``) a 0-dim tensor the step reads
    on the device (torch's convention)."""
    if config.capturable and isinstance(value, Tensor):
        check.tensor_learning_rate(name, value)
        return value  # the user's tensor (a scheduler may write it in place); the step reads a 0-dim view
    return check.learning_rate(name, value)


def new_group(param_group: dict[str, Any], defaults: dict[str, Any], config: LambConfig
              ) -> tuple[dict[str, Any], GroupSources]:
    """A group for ``add_param_group``, checked with the constructor's checks (aliases resolved, its parameters
    real floating-point tensors listed once, callables evaluated into its values), and where its values come
    from."""
    group = normalize_group(param_group)
    source = GroupSources()
    if "lr" in group:
        value = learning_rate("lr", group["lr"], config)
        source.lr = value if callable(value) and not isinstance(value, Tensor) else None
        group["lr"] = 0.0 if source.lr is not None else value
    for key in ("beta_1", "beta_2"):
        if key in group:
            group[key] = check.beta(key, group[key])
    if "epsilon" in group:
        group["epsilon"] = check.number("epsilon", group["epsilon"])
    if "weight_decay" in group:
        group["weight_decay"] = check.optional_nonnegative("weight_decay", group["weight_decay"])
    group.update(check_variant({k: group.get(k, defaults.get(k)) for k in VARIANT_KEYS}))
    params = group["params"]
    if isinstance(params, set):
        raise TypeError("A param group's `params` must be an ordered collection (a list), not a set.")
    params = group["params"] = [params] if isinstance(params, Tensor) else list(params)  # generators too
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    for p in tensors:
        if not isinstance(p, Tensor):
            raise TypeError(f"A param group's `params` must hold tensors. Received: {type(p).__name__}")
        if p.is_complex() or not p.is_floating_point():
            raise ValueError(f"Lamb needs real floating-point parameters (view complex ones as real). "
                             f"Received dtype {p.dtype}.")
    if len({id(p) for p in tensors}) != len(tensors):  # torch warns (github.com/pytorch/pytorch/issues/40967)
        warnings.warn("optimizer contains a parameter group with duplicate parameters; Lamb keeps the first "
                      "listing of each (one state and one update per tensor, where torch updates it twice).",
                      UserWarning, stacklevel=4)
        seen: set[int] = set()
        group["params"] = [p for p, t in zip(params, tensors) if not (id(t) in seen or seen.add(id(t)))]
    check_group_keys(group, defaults, config)
    for key in ("beta_1", "beta_2"):  # callables stay out of checkpoints: the group holds their value
        value = group.get(key, defaults.get(key))
        if callable(value) and not isinstance(value, Tensor):
            source.betas[key] = value
            group[key] = check.resolve(key, value, high=1.0)
    return group, source
