"""``torch_lamb.Lamb``: Keras 3's ``keras.optimizers.Lamb`` as a ``torch.optim.Optimizer``.

One call to :meth:`Lamb.step` is one Keras ``apply`` on the gradients in ``p.grad``. The pipeline
follows Keras's order::

    unscale (loss_scale_factor) -> accumulate -> clip -> decay -> LAMB -> EMA -> count
"""

from __future__ import annotations

import array
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _validation as check
from . import fused
from .clipping import (
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    global_clip_factor,
    global_norm,
    norm_clip_factors,
)
from .distributed import Reducer, dtensor_reducer, full_norms, is_dtensor, local, reducer_key
from .ema import ema_momentum_at, ema_weight, overwrite_with_averages, should_overwrite, update_averages
from .functional import LOW_PRECISION, LambScalars, TrustStats, lamb_reference, lamb_scalars, lamb_update
from .fused import GradientPipeline, MovingAverage
from .nonfinite import NonfiniteGuard
from .schedules import LearningRateSchedule
from .telemetry import TrustRatioTelemetry

__all__ = ["Lamb"]

_DEFAULT_LR, _DEFAULT_BETA_1 = check._Default(0.001), check._Default(0.9)
_DEFAULT_BETA_2, _DEFAULT_EPSILON = check._Default(0.999), check._Default(1e-7)
_FOLLOW_DEFAULT = "default"  # a group whose learning rate follows the optimizer's `learning_rate`
# the update of the buckets the kernel does not run (``"fused"`` picks its buckets in `_build_buckets`)
_IMPLEMENTATIONS = {"fused": lamb_update, "foreach": lamb_update, "reference": lamb_reference}
_AUTO_NAMES: dict[str, int] = {}

MOMENTUM, VELOCITY, AVERAGE, ACCUMULATOR = "momentum", "velocity", "average", "gradient_accumulator"
MASTER = "master_weight"  # float32 copy of a float16/bfloat16 parameter (``master_weights=True``)
DECAY_EXCLUDED = "exclude_from_weight_decay"  # per-group list of flags, aligned with group["params"]
ADAPT_EXCLUDED = "exclude_from_layer_adaptation"  # per-group list of flags: True -> trust ratio 1
WEIGHT_DECAY_MODES = ("decoupled", "adaptive")


def _auto_name(base: str = "lamb") -> str:
    n = _AUTO_NAMES.get(base, 0)
    _AUTO_NAMES[base] = n + 1
    return base if n == 0 else f"{base}_{n}"


def _pick(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    """Merge a Keras-style argument with its PyTorch-style alias; both at once is an error."""
    if alias_value is None:
        return value
    if check.is_given(value):
        raise ValueError(f"Give either `{name}` or `{alias}`, not both.")
    return alias_value


def state_dtype(param: Tensor) -> torch.dtype:
    """Moments, averages and accumulators are float32 for float16/bfloat16 parameters."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


@dataclass
class _Bucket:
    """Parameters with gradients that share a param group, a device and a dtype.

    The layout fields are cached across steps while nothing structural changes (see
    ``Lamb._buckets``); ``grads``, ``work``, ``owned`` and ``pipeline`` are refilled every step.
    """

    group: dict[str, Any]
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    momentums: list[Tensor] = field(default_factory=list)
    velocities: list[Tensor] = field(default_factory=list)
    accumulators: list[Tensor] = field(default_factory=list)
    averages: list[Tensor] = field(default_factory=list)  # EMA slots (``use_ema``)
    decay_mask: list[bool] = field(default_factory=list)
    adapt_mask: list[bool] | None = None  # None: every tensor takes the trust ratio
    reduce: Reducer | None = None  # sums local squared norms across shards (None: whole tensors)
    names: list[str] = field(default_factory=list)
    owners: list[Tensor] = field(default_factory=list)  # the parameters themselves (keys of `state`)
    indices: list[int] = field(default_factory=list)  # their positions among all parameters, in group order
    dtensor: bool = False  # DTensor parameters: the layout is rebuilt every step (FSDP may swap locals)
    kernel: fused.KernelBucket | None = None  # the fused kernel's static view, when it covers the layout
    param_ptrs: array.array | None = None  # this step's data pointers of `params`
    work: list[Tensor] = field(default_factory=list)  # the gradients the update will use
    mirrors: list[Tensor] = field(default_factory=list)  # low-precision params copied from `params` (masters)
    owned: bool = False  # whether `work` is the optimizer's own buffer (may be clipped in place)
    pipeline: GradientPipeline | None = None  # set when the fused kernel forms the gradients itself
    upcast: bool = False  # `grads` are float32 copies of low-precision gradients


class _Layout(NamedTuple):
    """The buckets of the last step, and what must still hold for the next step to reuse them."""

    key: tuple[Any, ...]  # which params have gradients; per group, weight decay off and layer adaptation
    params: list[Tensor]  # every parameter, in group order
    shapes: list[torch.Size]  # their shapes
    buckets: list[_Bucket]
    pointers: list[array.array]  # per bucket, the data pointers of the tensors it updates


class Lamb(TrustRatioTelemetry, Optimizer):
    """LAMB (You et al. 2019) with the complete Keras 3 optimizer contract.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or param-group
            dicts; groups may override ``lr``/``learning_rate``, ``beta_1``, ``beta_2``,
            ``betas``, ``epsilon``/``eps`` and ``weight_decay``.
        learning_rate: float >= 0, a :class:`~torch_lamb.LearningRateSchedule` (called with the
            raw step counter) or a zero-argument callable.
        beta_1, beta_2: decay rates of the moments, in [0, 1); floats, 0-dim tensors or
            zero-argument callables.
        epsilon: added to ``sqrt(v_hat)``; >= 0.
        weight_decay: decoupled decay ``w *= 1 - weight_decay * lr`` applied before the update.
        clipnorm, clipvalue, global_clipnorm: gradient clipping (at most one; each > 0).
        use_ema, ema_momentum, ema_overwrite_frequency: exponential moving average of the weights.
        loss_scale_factor: static loss scale; gradients are divided by it.
        gradient_accumulation_steps: apply the mean gradient every N calls (N >= 2).
        name: a label (auto-named ``lamb``, ``lamb_1``, ... when None).
        lr, betas, eps: PyTorch-style aliases of ``learning_rate``, ``(beta_1, beta_2)``, ``epsilon``.
        implementation: None (default: ``"fused"``, which runs the compiled CPU kernel on float32 CPU
            buckets and the foreach path elsewhere), ``"foreach"`` (``torch._foreach_*`` ops only) or
            ``"reference"`` (one tensor at a time).
        weight_decay_mode: ``"decoupled"`` (Keras, default) or ``"adaptive"`` (paper, TF-Addons,
            optax: ``u + weight_decay * w`` inside the trust ratio). Groups may override it.
        min_trust_ratio, max_trust_ratio: optional bounds (>= 0) on the trust ratio, e.g.
            ``max_trust_ratio=1.0`` for LAMBC. Groups may override them, and ``layer_adaptation``
            (False: the whole group takes ratio 1).
        master_weights: keep float32 master copies of float16/bfloat16 parameters (state key
            ``"master_weight"``); the update runs on the master and the parameter is copied from it.
        skip_nonfinite: skip a call whose gradients hold inf or NaN, decided on the device without a
            host sync (the README section "Beyond Keras" gives the exact semantics).
    """

    def __init__(
        self,
        params: Iterable[Any],
        learning_rate: Any = _DEFAULT_LR,
        beta_1: Any = _DEFAULT_BETA_1,
        beta_2: Any = _DEFAULT_BETA_2,
        epsilon: float = _DEFAULT_EPSILON,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        *,
        lr: Any = None,
        betas: tuple[Any, Any] | None = None,
        eps: float | None = None,
        implementation: str | None = None,
        weight_decay_mode: str = "decoupled",
        min_trust_ratio: float | None = None,
        max_trust_ratio: float | None = None,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        learning_rate = check.learning_rate("learning_rate", _pick("learning_rate", learning_rate, "lr", lr))
        if betas is not None:
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"`betas` must be a pair (beta_1, beta_2). Received: betas={betas!r}")
            beta_1 = _pick("beta_1", beta_1, "betas", betas[0])
            beta_2 = _pick("beta_2", beta_2, "betas", betas[1])
        beta_1, beta_2 = check.beta("beta_1", beta_1), check.beta("beta_2", beta_2)
        epsilon = check.number("epsilon", _pick("epsilon", epsilon, "eps", eps))
        weight_decay = check.optional_nonnegative("weight_decay", weight_decay)

        clips = {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm}
        given = [k for k, v in clips.items() if v is not None]
        if len(given) > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
                f"Received: {', '.join(f'{k}={clips[k]!r}' for k in given)}"
            )
        self.clipnorm = check.optional_positive("clipnorm", clipnorm)
        self.clipvalue = check.optional_positive("clipvalue", clipvalue)
        self.global_clipnorm = check.optional_positive("global_clipnorm", global_clipnorm)

        if not isinstance(use_ema, bool):
            raise ValueError(f"`use_ema` must be a bool. Received: use_ema={use_ema!r}")
        self.use_ema = use_ema
        self.ema_momentum = check.number("ema_momentum", ema_momentum, low=0.0, high=1.0, high_open=False)
        if ema_overwrite_frequency is not None and (
            isinstance(ema_overwrite_frequency, bool)
            or not isinstance(ema_overwrite_frequency, int)
            or ema_overwrite_frequency < 1
        ):
            raise ValueError(
                "`ema_overwrite_frequency` must be an integer >= 1 or None. "
                f"Received: ema_overwrite_frequency={ema_overwrite_frequency!r}"
            )
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.loss_scale_factor = check.optional_positive("loss_scale_factor", loss_scale_factor)
        if gradient_accumulation_steps is not None and (
            isinstance(gradient_accumulation_steps, bool)
            or not isinstance(gradient_accumulation_steps, int)
            or gradient_accumulation_steps < 2
        ):
            raise ValueError(
                "`gradient_accumulation_steps` must be an integer >= 2 or None. "
                f"Received: gradient_accumulation_steps={gradient_accumulation_steps!r}"
            )
        self.gradient_accumulation_steps = gradient_accumulation_steps
        if name is not None and not isinstance(name, str):
            raise ValueError(f"`name` must be a string or None. Received: name={name!r}")
        implementation = implementation or "fused"
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(
                f"`implementation` must be one of {sorted(_IMPLEMENTATIONS)} or None. "
                f"Received: implementation={implementation!r}"
            )
        self.implementation = implementation
        variant = _check_variant({
            "weight_decay_mode": weight_decay_mode, "min_trust_ratio": min_trust_ratio,
            "max_trust_ratio": max_trust_ratio, "layer_adaptation": True,
        })
        for flag, value in (("master_weights", master_weights), ("skip_nonfinite", skip_nonfinite)):
            if not isinstance(value, bool):
                raise ValueError(f"`{flag}` must be a bool. Received: {flag}={value!r}")
        self.master_weights = master_weights
        self.skip_nonfinite = skip_nonfinite
        self._guard = NonfiniteGuard() if skip_nonfinite else None

        self._learning_rate = learning_rate
        self._lr_sources: list[Any] = []
        self._decay_exclusion: tuple[frozenset[int], re.Pattern[str] | None] = (frozenset(), None)
        self._adapt_exclusion: tuple[frozenset[int], re.Pattern[str] | None] = (frozenset(), None)
        self._iterations = 0
        self._state_complete = False
        self._layout: _Layout | None = None  # the cached bucket layout (see `_buckets`)
        self.name = name if name is not None else _auto_name()

        initial_lr = float(learning_rate) if not callable(learning_rate) else 0.0
        defaults = {
            "lr": initial_lr,
            "beta_1": beta_1,
            "beta_2": beta_2,
            "epsilon": epsilon,
            "weight_decay": weight_decay,
            **variant,
        }
        super().__init__(params, defaults)
        if callable(learning_rate):
            self._refresh_learning_rates()
        # Build the slots now: torch.distributed.checkpoint then never needs its dummy zero-lr step
        # (`_init_optim_state`), which would advance counters and the EMA. Master weights wait for the
        # first step, so that weights loaded into the model after construction are the ones copied.
        self._ensure_state(with_masters=False)

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; ``learning_rate``, ``betas`` and ``eps`` are accepted as aliases."""
        group = dict(param_group)
        for alias, key in (("learning_rate", "lr"), ("eps", "epsilon")):
            if alias in group:
                if key in group:
                    raise ValueError(f"A param group may give `{key}` or `{alias}`, not both.")
                group[key] = group.pop(alias)
        if "betas" in group:
            betas = group.pop("betas")
            if "beta_1" in group or "beta_2" in group:
                raise ValueError("A param group may give `betas` or `beta_1`/`beta_2`, not both.")
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"`betas` must be a pair (beta_1, beta_2). Received: betas={betas!r}")
            group["beta_1"], group["beta_2"] = betas

        source: Any = _FOLLOW_DEFAULT
        if "lr" in group:
            lr_value = check.learning_rate("lr", group["lr"])
            source = lr_value if callable(lr_value) else None
            group["lr"] = 0.0 if callable(lr_value) else lr_value
        for key in ("beta_1", "beta_2"):
            if key in group:
                group[key] = check.beta(key, group[key])
        if "epsilon" in group:
            group["epsilon"] = check.number("epsilon", group["epsilon"])
        if "weight_decay" in group:
            group["weight_decay"] = check.optional_nonnegative("weight_decay", group["weight_decay"])
        group.update(_check_variant({k: group.get(k, self.defaults.get(k)) for k in _VARIANT_KEYS}))

        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]
        for p in (p[1] if isinstance(p, tuple) else p for p in list(params)):
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError("Lamb does not support complex parameters; view them as real first.")
            if isinstance(p, Tensor) and not p.is_floating_point():
                raise ValueError(f"Lamb needs floating-point parameters. Received dtype {p.dtype}.")
        super().add_param_group(group)
        self._lr_sources.append(source)
        self._resolve_decay_exclusion(self.param_groups[-1])
        self._resolve_adapt_exclusion(self.param_groups[-1])
        self._state_complete, self._layout = False, None
        if callable(source):
            self._refresh_learning_rates()
        if hasattr(self, "_learning_rate") and hasattr(self, "name"):  # added after construction
            self._ensure_state(with_masters=False)

    # ------------------------------------------------------------------ public Keras API

    @property
    def iterations(self) -> int:
        """Updates applied so far (micro-steps // N under gradient accumulation), as in Keras."""
        if self._guard is not None:  # skip_nonfinite: applied updates live on the device (reading syncs)
            return self._guard.counter("applied_updates")
        n = self.gradient_accumulation_steps
        return self._iterations // n if n else self._iterations

    @property
    def skipped_steps(self) -> Tensor | int:
        """Calls skipped for non-finite gradients (a device tensor once stepping; needs ``skip_nonfinite``)."""
        if self._guard is None:
            raise AttributeError("`skipped_steps` is counted only with `skip_nonfinite=True`.")
        return self._guard.counts["skipped_steps"]

    @property
    def learning_rate(self) -> float:
        """The current learning rate (of the optimizer-level ``learning_rate``)."""
        return self._evaluate_lr(self._learning_rate) if callable(self._learning_rate) else (
            self._default_group_lr()
        )

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if isinstance(self._learning_rate, LearningRateSchedule) and not callable(value):
            raise TypeError(
                "This optimizer was created with a `LearningRateSchedule`; its learning rate is not "
                "settable to a float. Assign a new schedule instead."
            )
        value = check.learning_rate("learning_rate", value)
        current = self._evaluate_lr(value) if callable(value) else value  # validated before any change
        self._learning_rate = value
        if not callable(value):
            self.defaults["lr"] = value
        for group, source in zip(self.param_groups, self._lr_sources):
            if source is _FOLLOW_DEFAULT:
                group["lr"] = current

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss * loss_scale_factor`` (or ``loss`` when no factor is set)."""
        return loss * self.loss_scale_factor if self.loss_scale_factor is not None else loss

    def exclude_from_weight_decay(
        self, var_list: Iterable[Tensor] | None = None, var_names: Iterable[str] | None = None
    ) -> None:
        """Exclude parameters from weight decay, by identity or by regex search on their names.

        Each call replaces the previous exclusions, as in Keras. Names come from
        ``model.named_parameters()`` passed to the constructor.
        """
        self._decay_exclusion = self._exclusion(var_list, var_names)
        self._layout = None
        for group in self.param_groups:
            self._resolve_decay_exclusion(group)

    def exclude_from_layer_adaptation(
        self, var_list: Iterable[Tensor] | None = None, var_names: Iterable[str] | None = None
    ) -> None:
        """Give parameters a trust ratio of exactly 1 (a plain Adam step), as TF-Addons does.

        Same arguments and replacement rule as :meth:`exclude_from_weight_decay`; the two lists
        are independent (Keras has no adaptation exclusion, so nothing is excluded by default).
        """
        self._adapt_exclusion = self._exclusion(var_list, var_names)
        self._layout = None
        for group in self.param_groups:
            self._resolve_adapt_exclusion(group)

    def _exclusion(
        self, var_list: Iterable[Tensor] | None, var_names: Iterable[str] | None
    ) -> tuple[frozenset[int], re.Pattern[str] | None]:
        known = {id(p) for g in self.param_groups for p in g["params"]}
        ids = frozenset(id(v) for v in (var_list or ()))
        if not ids <= known:
            raise ValueError("`var_list` holds tensors that are not parameters of this optimizer.")
        pattern = None
        if var_names:
            names = list(var_names)
            if not all(isinstance(n, str) for n in names):
                raise ValueError(f"`var_names` must be strings (regex patterns). Received: {names!r}")
            if not any("param_names" in g for g in self.param_groups):
                raise ValueError(
                    "`var_names` needs named parameters: pass `model.named_parameters()` to Lamb."
                )
            try:
                pattern = re.compile("|".join(sorted(set(names))))
            except re.error as err:
                raise ValueError(f"`var_names` holds an invalid regex: {err}") from None
        return ids, pattern

    def finalize_variable_values(self, var_list: Iterable[Tensor] | None = None) -> None:
        """Copy the moving averages into the parameters (all of them, or those given)."""
        if not self.use_ema:
            return
        params = self._all_params() if var_list is None else list(var_list)
        pairs = [(p, self.state[p][AVERAGE]) for p in params if AVERAGE in self.state.get(p, {})]
        with torch.no_grad():
            overwrite_with_averages([self._weight(p) for p, _ in pairs], [local(a) for _, a in pairs])
            self._sync_masters([p for p, _ in pairs])

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as Keras's ``get_config``."""
        lr = self._learning_rate
        return {
            "name": self.name,
            "learning_rate": lr if callable(lr) else self._default_group_lr(),
            "weight_decay": self.defaults["weight_decay"],
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "loss_scale_factor": self.loss_scale_factor,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "beta_1": self.defaults["beta_1"],
            "beta_2": self.defaults["beta_2"],
            "epsilon": self.defaults["epsilon"],
            "weight_decay_mode": self.defaults["weight_decay_mode"],
            "min_trust_ratio": self.defaults["min_trust_ratio"],
            "max_trust_ratio": self.defaults["max_trust_ratio"],
            "master_weights": self.master_weights,
            "skip_nonfinite": self.skip_nonfinite,
        }

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply the gradients in ``p.grad``: one Keras ``apply`` call."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Everything that can fail is checked before any tensor or counter changes.
        raw_it = self._iterations
        n = self.gradient_accumulation_steps
        updating = not n or (raw_it + 1) % n == 0
        iterations = raw_it // n if n else raw_it
        params = self._all_params()
        all_grads = [p.grad for p in params]
        shapes = [p.shape for p in params]
        self._check_grads(params, all_grads, shapes)
        betas: dict[int, tuple[float, float]] = {}
        scalars = self._group_scalars(raw_it, iterations + 1, betas) if updating else None

        self._ensure_state()
        buckets = self._buckets(params, all_grads, shapes)
        guard = self._guard
        if guard is not None:  # skip_nonfinite: finite copies of the gradients, a device-side flag
            for b, grads in zip(buckets, guard.check([b.grads for b in buckets], [b.reduce for b in buckets])):
                b.grads = grads
        self._fuse(buckets, bool(n))
        for b in buckets:  # low-precision gradients go through the pipeline in float32, as in the kernel
            if b.pipeline is None and b.grads[0].dtype in LOW_PRECISION:
                b.grads, b.upcast = [g.float() for g in b.grads], True
        if n:
            for b in buckets:
                if b.pipeline is not None:  # fused: the update call reads g and acc in its own pass 1
                    if not updating:
                        b.kernel.accumulate(b.grads, self.loss_scale_factor)
                    continue
                grads = b.grads
                if self.loss_scale_factor is not None:
                    grads = torch._foreach_div(grads, self.loss_scale_factor)
                if guard is not None:
                    guard.keep(grads)
                torch._foreach_add_(b.accumulators, grads)
            if guard is not None:
                guard.count_window()
            for b in buckets if updating else ():
                if b.pipeline is not None:
                    continue
                divisor = n if guard is None else guard.window_divisor(b.params[0].device, b.accumulators[0].dtype)
                torch._foreach_div_(b.accumulators, divisor)
                b.work, b.owned = b.accumulators, True
        else:
            for b in buckets:
                if b.pipeline is not None:
                    continue
                if self.loss_scale_factor is not None:
                    b.work, b.owned = list(torch._foreach_div(b.grads, self.loss_scale_factor)), True
                else:
                    b.work, b.owned = b.grads, guard is not None or b.upcast  # our copies: clipped in place

        if updating:
            self._clip(buckets)
            update = _IMPLEMENTATIONS[self.implementation]
            if guard is not None:
                guard.begin_update(accumulating=bool(n))
            for b in buckets:
                group_scalars = scalars[id(b.group)]
                if guard is not None:
                    group_scalars = guard.scalars(group_scalars, *betas[id(b.group)], like=b.momentums[0])
                if b.pipeline is not None:  # the kernel: pipeline in pass 1, EMA in pass 2
                    weight = ema_weight(ema_momentum_at(iterations, self.ema_momentum))
                    stats = b.kernel.update(
                        b.params, b.grads, group_scalars, reduce=b.reduce, pipeline=b.pipeline,
                        average=MovingAverage(b.averages, weight) if self.use_ema else None, mirrors=b.mirrors,
                        param_ptrs=b.param_ptrs,
                    )
                else:
                    stats = update(
                        b.params, b.work, b.momentums, b.velocities, group_scalars,
                        decay_mask=b.decay_mask, adapt_mask=b.adapt_mask, reduce=b.reduce,
                    )
                    if b.mirrors:  # master weights: refresh the low-precision parameters
                        torch._foreach_copy_(b.mirrors, b.params)
                self._update_stats(b, stats)
            if n:
                self._zero_accumulators(buckets)

        if self.use_ema:
            self._update_ema(iterations, buckets, updated=updating)
        if guard is not None:
            if updating:
                guard.end_update(accumulating=bool(n))
            guard.finish()
        self._iterations = raw_it + 1
        return loss

    # ------------------------------------------------------------------ step stages

    def _check_grads(self, params: list[Tensor], grads: list[Tensor | None], shapes: list[torch.Size]) -> None:
        missing = [g is None for g in grads]
        if all(missing):
            raise ValueError("No gradients provided for any parameter.")
        if any(missing):
            params = [p for p, g in zip(params, grads) if g is not None]
            shapes = [s for s, g in zip(shapes, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if (
            not any([g.is_sparse for g in grads])
            and [g.shape for g in grads] == shapes
            and ((all([g.is_cpu for g in grads]) and all([p.is_cpu for p in params]))
                 or [g.device for g in grads] == [p.device for p in params])
        ):
            return  # the common case, checked list-wise; otherwise find the offender
        for p, g in zip(params, grads):
            if g.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients.")
            if g.shape != p.shape:
                raise RuntimeError(
                    f"A gradient's shape {tuple(g.shape)} differs from its parameter's {tuple(p.shape)}."
                )
            if g.device != p.device:
                raise RuntimeError(
                    f"A gradient is on {g.device} but its parameter is on {p.device}."
                )

    def _group_scalars(
        self, raw_it: int, step: int, betas: dict[int, tuple[float, float]] | None = None
    ) -> dict[int, LambScalars]:
        """Every group's scalars for this update (host-side; may raise, and then changes nothing).

        ``betas``, when given, receives each group's resolved ``(beta_1, beta_2)``.
        """
        lrs = self._scheduled_learning_rates(raw_it)
        out = {}
        for group, lr in zip(self.param_groups, lrs):
            beta_1 = check.resolve("beta_1", group["beta_1"], high=1.0)
            beta_2 = check.resolve("beta_2", group["beta_2"], high=1.0)
            if betas is not None:
                betas[id(group)] = (beta_1, beta_2)
            out[id(group)] = lamb_scalars(
                lr=check.number("lr", group["lr"] if lr is None else lr),
                beta_1=beta_1,
                beta_2=beta_2,
                epsilon=group["epsilon"],
                weight_decay=group["weight_decay"],
                step=step,
                weight_decay_mode=group["weight_decay_mode"],
                min_trust_ratio=group["min_trust_ratio"],
                max_trust_ratio=group["max_trust_ratio"],
            )
        for group, lr in zip(self.param_groups, lrs):
            if lr is not None:
                group["lr"] = lr
        return out

    def _buckets(self, params: list[Tensor], grads: list[Tensor | None], shapes: list[torch.Size]) -> list[_Bucket]:
        """This step's buckets: the cached layout (rebuilt when it no longer holds), with gradients.

        ``params`` is every parameter in group order, ``grads`` their ``.grad`` and ``shapes`` their shapes.
        """
        key = (
            tuple([g is None for g in grads]),
            tuple([(g["weight_decay"] is None, g["layer_adaptation"]) for g in self.param_groups]),
            self.implementation,
        )
        layout = self._layout
        pointers = None
        if layout is not None and layout.key == key and shapes == layout.shapes and all(
            map(operator.is_, layout.params, params)
        ):  # new storage (``p.data = ...``) rebuilds too; DTensor buckets always do (FSDP may swap locals)
            pointers = [array.array("q", [t.data_ptr() for t in b.params]) for b in layout.buckets]
            if any(b.dtensor for b in layout.buckets) or pointers != layout.pointers:
                pointers = None
        if pointers is None:
            buckets = self._build_buckets()
            pointers = [array.array("q", [t.data_ptr() for t in b.params]) for b in buckets]
            layout = self._layout = _Layout(key, params, shapes, buckets, pointers)
        buckets = layout.buckets
        for b, ptrs in zip(buckets, pointers):
            b.param_ptrs = ptrs  # the kernel reuses them
            b.work, b.owned, b.pipeline, b.upcast = [], False, None, False
            b.grads = [local(grads[i]) for i in b.indices] if b.dtensor else [grads[i] for i in b.indices]
        return buckets

    def _build_buckets(self) -> list[_Bucket]:
        buckets: dict[tuple[Any, ...], _Bucket] = {}
        position = -1
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            excluded = group[DECAY_EXCLUDED]
            fixed = [not group["layer_adaptation"] or e for e in group[ADAPT_EXCLUDED]]  # ratio 1
            for i, p in enumerate(group["params"]):
                position += 1
                if p.grad is None:
                    continue
                key = (gi, p.device, p.dtype, reducer_key(p))
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = _Bucket(
                        group, adapt_mask=[] if any(fixed) else None, reduce=dtensor_reducer(p), dtensor=is_dtensor(p)
                    )
                state = self.state[p]
                if MASTER in state:
                    b.params.append(local(state[MASTER]))
                    b.mirrors.append(local(p))
                else:
                    b.params.append(local(p))
                if b.adapt_mask is not None:
                    b.adapt_mask.append(not fixed[i])
                b.momentums.append(local(state[MOMENTUM]))
                b.velocities.append(local(state[VELOCITY]))
                if ACCUMULATOR in state:
                    b.accumulators.append(local(state[ACCUMULATOR]))
                if AVERAGE in state:
                    b.averages.append(local(state[AVERAGE]))
                b.decay_mask.append(group["weight_decay"] is not None and not excluded[i])
                b.names.append(names[i] if names else f"{gi}.{i}")
                b.owners.append(p)
                b.indices.append(position)
        kernel = self.implementation == "fused" and self._guard is None and fused.available()
        for b in buckets.values():
            if kernel and fused.kernel_dtype(b.params) is not None and fused.kernel_supports(
                b.momentums, b.velocities, b.accumulators, b.averages
            ) and (not b.mirrors or fused.kernel_dtype(b.mirrors) is not None) and all(
                p.shape == m.shape for p, m in zip(b.params, b.momentums)
            ):
                b.kernel = fused.KernelBucket(
                    b.momentums, b.velocities, decay_mask=b.decay_mask, adapt_mask=b.adapt_mask,
                    accumulators=b.accumulators, averages=b.averages,
                )
        return list(buckets.values())

    def _fuse(self, buckets: Sequence[_Bucket], accumulating: bool) -> None:
        """Give the buckets the fused kernel covers a gradient pipeline.

        Such a bucket's gradients are never materialised: the kernel forms them (unscale,
        accumulate, clip) inside its first pass, and updates the moving average in its second.
        """
        for b in buckets:
            if b.kernel is None or fused.kernel_dtype(b.grads) is None:
                continue
            b.pipeline = GradientPipeline(
                loss_scale=self.loss_scale_factor,
                accumulators=b.accumulators if accumulating else None,
                accumulation_steps=self.gradient_accumulation_steps if accumulating else None,
            )

    def _gradient_norms(self, b: _Bucket) -> Tensor:
        """Full norms of the bucket's gradients as the update will use them (before clipping)."""
        if b.pipeline is None:
            return full_norms(b.work, reduce=b.reduce)[0]
        squares = b.kernel.gradient_squares(b.grads, b.pipeline).to(torch.float32)
        return torch.sqrt(b.reduce(squares) if b.reduce is not None else squares)

    def _clip(self, buckets: Sequence[_Bucket]) -> None:
        if self.clipnorm is not None:
            for b in buckets:
                norms = self._gradient_norms(b)
                if b.pipeline is not None:
                    b.pipeline.clip_factors = norm_clip_factors(norms, self.clipnorm)
                else:
                    b.work = clip_by_norm(b.work, norms, self.clipnorm, inplace=b.owned)
                    b.owned = True
        elif self.global_clipnorm is not None:
            norms = [self._gradient_norms(b) for b in buckets]
            factor = global_clip_factor(global_norm(norms), self.global_clipnorm)
            for b in buckets:
                if b.pipeline is not None:
                    b.pipeline.clip_factors = factor.to(torch.float32).expand(len(b.params))
                else:
                    b.work = clip_by_global_norm(b.work, factor, inplace=b.owned)
                    b.owned = True
        elif self.clipvalue is not None:
            for b in buckets:
                if b.pipeline is not None:
                    b.pipeline.clipvalue = self.clipvalue
                else:
                    b.work = clip_by_value(b.work, self.clipvalue, inplace=b.owned)
                    b.owned = True

    def _update_stats(self, bucket: _Bucket, stats: TrustStats) -> None:
        """Hook for trust-ratio telemetry (a no-op unless ``track_trust_ratios(True)``)."""
        if self._trust_recorder is not None:
            self._record_trust_stats(bucket.names, stats)

    def _zero_accumulators(self, buckets: Sequence[_Bucket]) -> None:
        """Zero the accumulators, but those the fused kernel zeroed in its pass 1."""
        rest = _not_fused(self._all_params(), buckets)
        if rest:
            torch._foreach_zero_([local(self.state[p][ACCUMULATOR]) for p in rest])

    def _update_ema(self, iterations: int, buckets: Sequence[_Bucket], updated: bool) -> None:
        """Move the averages toward the weights; the fused kernel's buckets did it in their pass 2 when
        ``updated``, else the kernel does it here."""
        momentum = ema_momentum_at(iterations, self.ema_momentum)
        if not updated:
            for b in buckets:
                if b.pipeline is not None:
                    b.kernel.ema(b.params, ema_weight(momentum), param_ptrs=b.param_ptrs)
        params = self._all_params()
        rest = _not_fused(params, buckets)
        guard = self._guard
        if rest:
            kernel = self.implementation == "fused" and guard is None and fused.available()
            ps = [self._weight(p) for p in rest]  # the float32 master where there is one
            avgs = [local(self.state[p][AVERAGE]) for p in rest]
            for group in _by_device_dtype(ps, avgs):
                if guard is not None:
                    guard.update_averages(group[1], group[0], self.ema_momentum)
                elif kernel and fused.kernel_supports(*group):
                    fused.fused_ema(group[1], group[0], ema_weight(momentum))
                else:
                    update_averages(group[1], group[0], momentum)
        if should_overwrite(iterations, self.ema_overwrite_frequency):
            ps = [self._weight(p) for p in params]
            avgs = [local(self.state[p][AVERAGE]) for p in params]
            for group in _by_device_dtype(ps, avgs):
                (overwrite_with_averages if guard is None else guard.overwrite)(group[0], group[1])
            self._sync_masters(params)

    def _weight(self, p: Tensor) -> Tensor:
        """The tensor the update writes: the float32 master of ``p`` if it has one, else ``p`` (local)."""
        state = self.state.get(p)
        return local(state[MASTER]) if state and MASTER in state else local(p)

    def _sync_masters(self, params: Sequence[Tensor]) -> None:
        """Copy master weights into their low-precision parameters."""
        pairs = [(local(p), local(self.state[p][MASTER])) for p in params if MASTER in self.state.get(p, {})]
        if pairs:
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])

    # ------------------------------------------------------------------ state

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _ensure_state(self, with_masters: bool = True) -> None:
        """Create the slots of every parameter (Keras builds them all on the first apply)."""
        if self._state_complete:
            return
        for p in self._all_params():
            state = self.state[p]
            if MOMENTUM in state:
                continue
            dtype = state_dtype(p)
            state[MOMENTUM] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state[VELOCITY] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if self.use_ema:
                state[AVERAGE] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if self.gradient_accumulation_steps:
                state[ACCUMULATOR] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if self.master_weights and not with_masters:
            return  # the step completes the state
        if self.master_weights:  # also after loading a state dict saved without master weights
            for p in self._all_params():
                if p.dtype in LOW_PRECISION and MASTER not in self.state[p]:
                    self.state[p][MASTER] = p.detach().to(torch.float32, copy=True)
        self._state_complete = True

    def _required_state_keys(self) -> list[str]:
        keys = [MOMENTUM, VELOCITY]
        if self.use_ema:
            keys.append(AVERAGE)
        if self.gradient_accumulation_steps:
            keys.append(ACCUMULATOR)
        return keys

    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state dict; the step counter rides in every param group."""
        sd = super().state_dict()
        counters = {k: self._guard.counter(k) for k in NonfiniteGuard.COUNTERS} if self._guard else {}
        for group in sd["param_groups"]:
            group["iterations"] = self._iterations
            group.update(counters)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, checking its layout first: a mismatch raises and changes nothing."""
        groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(saved_state, dict):
            raise ValueError("Not an optimizer state dict: it needs 'state' and 'param_groups'.")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"The state dict has {len(groups)} param groups; this optimizer has {len(self.param_groups)}."
            )
        ids_to_params: dict[Any, Tensor] = {}
        for saved, live in zip(groups, self.param_groups):
            if len(saved["params"]) != len(live["params"]):
                raise ValueError(
                    f"A param group of the state dict has {len(saved['params'])} parameters; "
                    f"the matching group here has {len(live['params'])}."
                )
            ids_to_params.update(zip(saved["params"], live["params"]))
        required = self._required_state_keys()
        for pid, value in saved_state.items():
            p = ids_to_params.get(pid)
            if p is None:
                raise ValueError(f"The state dict holds state for an unknown parameter id {pid!r}.")
            missing = [k for k in required if k not in value]
            if missing:
                raise ValueError(
                    f"The state dict lacks {missing} for a parameter: was it saved with other "
                    "`use_ema` / `gradient_accumulation_steps` settings?"
                )
            for key, tensor in value.items():
                if isinstance(tensor, Tensor) and tensor.shape != p.shape:
                    raise ValueError(
                        f"State {key!r} has shape {tuple(tensor.shape)} but its parameter has "
                        f"shape {tuple(p.shape)}: the state dict is from a different model."
                    )
        iterations = int(groups[0].get("iterations", 0)) if groups else 0
        counters = {k: int(groups[0].get(k, 0)) for k in NonfiniteGuard.COUNTERS} if groups else {}
        adapt_excluded = [list(g[ADAPT_EXCLUDED]) for g in self.param_groups]

        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; keep float32 state for low precision.
        for pid, value in saved_state.items():
            p = ids_to_params[pid]
            for key, tensor in value.items():
                if isinstance(tensor, Tensor):
                    self.state[p][key] = tensor.to(device=p.device, dtype=state_dtype(p), copy=True)
            if not self.master_weights:
                self.state[p].pop(MASTER, None)
        for group in self.param_groups:
            group.pop("iterations", None)
            for key in NonfiniteGuard.COUNTERS:
                group.pop(key, None)
        for group, flags in zip(self.param_groups, adapt_excluded):  # checkpoints from before the variants
            group.setdefault(ADAPT_EXCLUDED, flags)
            for key in _VARIANT_KEYS:
                group.setdefault(key, self.defaults[key])
        if self._guard is not None:
            self._guard.load(counters)
        self._iterations = iterations
        self._state_complete, self._layout = False, None

    _PICKLED = (
        "clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum",
        "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps", "name",
        "implementation", "_learning_rate", "_lr_sources", "_decay_exclusion", "_iterations",
        "_adapt_exclusion", "master_weights", "skip_nonfinite",
    )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._PICKLED})
        if self._guard is not None:
            state["_guard_counters"] = {k: self._guard.counter(k) for k in NonfiniteGuard.COUNTERS}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        counters = state.pop("_guard_counters", None)
        super().__setstate__(state)  # torch's load_state_dict also calls this (with state and groups only)
        for key, default in (("_adapt_exclusion", (frozenset(), None)), ("master_weights", False),
                             ("skip_nonfinite", False)):
            if not hasattr(self, key):  # pickles from before the variants
                setattr(self, key, default)
        if not hasattr(self, "_guard"):  # unpickling (not a load_state_dict)
            self._guard = NonfiniteGuard() if self.skip_nonfinite else None
            if self._guard is not None:
                self._guard.load(counters or {})
        self._state_complete, self._layout = False, None

    # ------------------------------------------------------------------ helpers

    def _default_group_lr(self) -> float:
        for group, source in zip(self.param_groups, self._lr_sources):
            if source is _FOLLOW_DEFAULT:
                return group["lr"]
        return self.defaults["lr"]

    def _evaluate_lr(self, source: Any, step: int | None = None) -> float:
        step = self._iterations if step is None else step
        return check.resolve("learning_rate", source, step=step)

    def _scheduled_learning_rates(self, step: int | None = None) -> list[float | None]:
        """The current value of every group's scheduled learning rate (None: the group's float)."""
        default = self._learning_rate
        default_value = self._evaluate_lr(default, step) if callable(default) else None
        values: list[float | None] = []
        for source in self._lr_sources:
            if source is _FOLLOW_DEFAULT:
                values.append(default_value)
            elif callable(source):
                values.append(self._evaluate_lr(source, step))
            else:
                values.append(None)
        return values

    def _refresh_learning_rates(self, step: int | None = None) -> None:
        """Write the current value of every scheduled learning rate into its group's ``lr``."""
        for group, value in zip(self.param_groups, self._scheduled_learning_rates(step)):
            if value is not None:
                group["lr"] = value

    def _resolve_decay_exclusion(self, group: dict[str, Any]) -> None:
        group[DECAY_EXCLUDED] = _excluded(group, *self._decay_exclusion)

    def _resolve_adapt_exclusion(self, group: dict[str, Any]) -> None:
        group[ADAPT_EXCLUDED] = _excluded(group, *self._adapt_exclusion)


_VARIANT_KEYS = ("weight_decay_mode", "min_trust_ratio", "max_trust_ratio", "layer_adaptation")


def _check_variant(options: dict[str, Any]) -> dict[str, Any]:
    """Validate the variant options of the optimizer or of one group (all checked before any change)."""
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
    adapt = options["layer_adaptation"]
    if not isinstance(adapt, bool):
        raise ValueError(f"`layer_adaptation` must be a bool. Received: layer_adaptation={adapt!r}")
    return {"weight_decay_mode": mode, "min_trust_ratio": low, "max_trust_ratio": high, "layer_adaptation": adapt}


def _excluded(group: dict[str, Any], ids: frozenset[int], pattern: re.Pattern[str] | None) -> list[bool]:
    """Per-parameter flags of ``group``: excluded by identity or by a regex search on its name."""
    names = group.get("param_names") or [None] * len(group["params"])
    return [
        id(p) in ids or bool(pattern is not None and name is not None and pattern.search(name))
        for p, name in zip(group["params"], names)
    ]


def _not_fused(params: list[Tensor], buckets: Sequence[_Bucket]) -> list[Tensor]:
    """The parameters that no fused bucket of this step covers (none, in the common case)."""
    fused_buckets = [b for b in buckets if b.pipeline is not None]
    if sum(len(b.owners) for b in fused_buckets) == len(params):
        return []
    done = {id(p) for b in fused_buckets for p in b.owners}
    return [p for p in params if id(p) not in done]


def _by_device_dtype(params: list[Tensor], others: list[Tensor]) -> list[tuple[list[Tensor], list[Tensor]]]:
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for p, o in zip(params, others):
        g = groups.setdefault((p.device, p.dtype), ([], []))
        g[0].append(p)
        g[1].append(o)
    return list(groups.values())

