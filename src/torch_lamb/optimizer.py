"""``torch_lamb.Lamb``: Keras 3's ``keras.optimizers.Lamb`` as a ``torch.optim.Optimizer``.

One call to :meth:`Lamb.step` is one Keras ``apply`` on the gradients in ``p.grad``. The pipeline
follows Keras's order::

    unscale (loss_scale_factor) -> accumulate -> clip -> decay -> LAMB -> EMA -> count
"""

from __future__ import annotations

import contextlib
import difflib
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _validation as check
from . import compiled_step
from .backends import IMPLEMENTATIONS, make_ready
from .backends.common import overwrite_with_averages, reset_accumulators
from .capturable import DeviceSteps
from .clipping import clip_factors
from .distributed import is_dtensor, local, no_host_reads
from .functional import LOW_PRECISION, TrustStats
from .layout import (
    ACCUMULATOR,
    ADAPT_EXCLUDED,
    AVERAGE,
    DECAY_EXCLUDED,
    MASTER,
    MOMENTUM,
    VELOCITY,
    Bucket,
    Layout,
    LayoutCache,
    TrackedState,
    read_grads,
)
from .nonfinite import NonfiniteGuard
from .plan import WEIGHT_DECAY_MODES, StepPlan, plan_step
from .schedules import LearningRateSchedule, takes_tensor_steps
from .slices import SLICES, group_slices, normalize
from .telemetry import TrustRatioTelemetry

__all__ = ["Lamb"]

_DEFAULT_LR, _DEFAULT_BETA_1 = check._Default(0.001), check._Default(0.9)
_DEFAULT_BETA_2, _DEFAULT_EPSILON = check._Default(0.999), check._Default(1e-7)
_FOLLOW_DEFAULT = "default"  # a group whose learning rate follows the optimizer's `learning_rate`
_AUTO_NAMES: dict[str, int] = {}


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


def _implementation(implementation: Any, foreach: bool | None, fused: bool | None) -> str:
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


def state_dtype(param: Tensor) -> torch.dtype:
    """Moments, averages and accumulators are float32 for float16/bfloat16 parameters."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


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
        implementation: ``"auto"`` (default, also for None): the CPU kernel (``"fused"``) where it applies,
            ``"foreach"`` elsewhere; or one of ``"fused"``, ``"foreach"``, ``"compiled"`` (two phases under
            ``torch.compile``, compiled at a bucket's first update), ``"reference"`` (one tensor at a
            time, the spec), which raises if some parameter cannot take it.
        foreach, fused: torch's spellings of the same choice (``fused=True`` is ``"fused"``,
            ``foreach=True`` is ``"foreach"``, ``foreach=False`` is ``"reference"``).
        capturable: as torch's ``capturable``: no host read anywhere in the step, so that it can be captured in
            a CUDA graph. The step counters live on the device (advanced in place each call) and what changes
            from call to call is derived from them there: bias corrections, the EMA weight, a built-in schedule's
            learning rate and its decay factor, and a 0-dim tensor ``lr`` (torch's convention: fill it between
            replays). A captured graph freezes what the host decides by call count (an accumulation micro-step
            or an update, the EMA overwrite, which parameters have gradients), the constants of the call
            (betas, epsilon, weight decay, a float ``lr``) and any learning rate evaluated on the host (a plain
            callable, a ``torch.optim.lr_scheduler``): capture one graph per distinct call
            (:mod:`torch_lamb.capturable`). ``iterations`` and ``state_dict()`` read the device counters. The
            CPU kernel does not apply.
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
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        weight_decay_mode: str = "decoupled",
        min_trust_ratio: float | None = None,
        max_trust_ratio: float | None = None,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        given_lr = _pick("learning_rate", learning_rate, "lr", lr)
        if capturable is True and isinstance(given_lr, Tensor):  # torch's convention: the step reads it on device
            check.tensor_learning_rate("learning_rate", given_lr)
        learning_rate = check.learning_rate("learning_rate", given_lr)
        if capturable is True and isinstance(given_lr, Tensor):
            learning_rate = given_lr
        if betas is not None:
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"`betas` must be a pair (beta_1, beta_2). Received: betas={betas!r}")
            if any(b is None for b in betas):
                raise ValueError(f"`betas` must hold two numbers (beta_1, beta_2). Received: betas={betas!r}")
            beta_1 = _pick("beta_1", beta_1, "betas", betas[0])
            beta_2 = _pick("beta_2", beta_2, "betas", betas[1])
        beta_1, beta_2 = check.beta("beta_1", beta_1), check.beta("beta_2", beta_2)
        epsilon = check.number("epsilon", _pick("epsilon", epsilon, "eps", eps))
        weight_decay = check.optional_nonnegative("weight_decay", weight_decay)

        options = check.options(
            clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm, use_ema=use_ema,
            ema_momentum=ema_momentum, ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor, gradient_accumulation_steps=gradient_accumulation_steps,
        )
        for key, value in options.items():
            setattr(self, key, value)
        if name is not None and not isinstance(name, str):
            raise ValueError(f"`name` must be a string or None. Received: name={name!r}")
        self.implementation = _implementation(implementation, foreach, fused)
        variant = _check_variant({
            "weight_decay_mode": weight_decay_mode, "min_trust_ratio": min_trust_ratio,
            "max_trust_ratio": max_trust_ratio, "layer_adaptation": True,
        })
        for flag, value in (("master_weights", master_weights), ("skip_nonfinite", skip_nonfinite),
                            ("capturable", capturable)):
            if not isinstance(value, bool):
                raise ValueError(f"`{flag}` must be a bool. Received: {flag}={value!r}")
        self.master_weights = master_weights
        self.skip_nonfinite = skip_nonfinite
        self.capturable = capturable
        self._guard = NonfiniteGuard() if skip_nonfinite else None
        self._steps = DeviceSteps()  # capturable: the step counters on the device

        self._learning_rate = learning_rate
        self._lr_sources: list[Any] = []
        self._hyper_sources: list[dict[str, Callable[[], float]]] = []  # per group: callable betas
        self._alias_marks: list[tuple[Any, Any, Any] | None] = []  # per group: (beta_1, beta_2, epsilon) last written
        self._decay_exclusion: tuple[frozenset[int], re.Pattern[str] | None] = (frozenset(), None)
        self._adapt_exclusion: tuple[frozenset[int], re.Pattern[str] | None] = (frozenset(), None)
        self._iterations = 0
        self._state_complete = False
        self._layouts = LayoutCache()
        self._compile_key = compiled_step.register(self)
        self._graph_params: list[Tensor] = []  # the parameters a compiled step declares it writes
        self._graph_dtensor = False  # a DTensor among them: a compiled step keeps its graph break
        self._layout_params: list[Tensor] | None = None  # the layout's list when they were last noted
        self.name = name if name is not None else _auto_name()

        initial_lr = 0.0 if callable(learning_rate) else (
            learning_rate if isinstance(learning_rate, Tensor) else float(learning_rate))
        defaults = {
            "lr": initial_lr,
            "beta_1": beta_1,
            "beta_2": beta_2,
            "epsilon": epsilon,
            "betas": (beta_1, beta_2),  # torch's spellings, read by OneCycleLR / CyclicLR
            "eps": epsilon,
            "weight_decay": weight_decay,
            **variant,
        }
        super().__init__(params, defaults)
        self.state = TrackedState(dict, self.state)
        self._note_graph_params(self._all_params())
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
            keep = getattr(self, "capturable", False) is True and isinstance(group["lr"], Tensor)
            if keep:  # torch's convention: each step reads it on the device
                check.tensor_learning_rate("lr", group["lr"])
            lr_value = check.learning_rate("lr", group["lr"])
            if keep:
                lr_value = group["lr"]
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
        if isinstance(params, set):
            raise TypeError("A param group's `params` must be an ordered collection (a list), not a set.")
        params = group["params"] = [params] if isinstance(params, Tensor) else list(params)  # generators too
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        for p in tensors:
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError("Lamb does not support complex parameters; view them as real first.")
            if isinstance(p, Tensor) and not p.is_floating_point():
                raise ValueError(f"Lamb needs floating-point parameters. Received dtype {p.dtype}.")
        if len({id(p) for p in tensors}) != len(tensors):
            raise ValueError("A param group lists the same parameter twice; each tensor may appear once.")
        _check_keys(group, self.defaults)
        group[SLICES] = group_slices(group, params, len(self.param_groups))
        sources = {}
        for key in ("beta_1", "beta_2"):  # callables stay out of checkpoints: the group holds their value
            value = group.get(key, self.defaults.get(key))
            if callable(value) and not isinstance(value, Tensor):
                sources[key] = value
                group[key] = check.resolve(key, value, high=1.0)
        super().add_param_group(group)
        added = self.param_groups[-1]
        added["betas"], added["eps"] = (added["beta_1"], added["beta_2"]), added["epsilon"]  # torch's names
        self._hyper_sources.append(sources)
        self._alias_marks.append((added["beta_1"], added["beta_2"], added["epsilon"]))
        self._lr_sources.append(source)
        self._resolve_decay_exclusion(self.param_groups[-1])
        self._resolve_adapt_exclusion(self.param_groups[-1])
        self._state_complete = False
        self._layouts.invalidate()
        if callable(source):
            self._refresh_learning_rates()
        if hasattr(self, "_learning_rate") and hasattr(self, "name"):  # added after construction
            self._ensure_state(with_masters=False)
            self._note_graph_params(self._all_params())

    # ------------------------------------------------------------------ public Keras API

    @property
    def iterations(self) -> int:
        """Updates applied so far (micro-steps // N under gradient accumulation), as in Keras."""
        if self._guard is not None:  # skip_nonfinite: applied updates live on the device (reading syncs)
            return self._guard.counter("applied_updates")
        updates = self._steps.updates(self) if self._steps.live else None
        if updates is not None:  # capturable: a replayed graph advances the device count, not the host's
            return int(updates)
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
            if source == _FOLLOW_DEFAULT:
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
        self._layouts.invalidate()
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
        self._layouts.invalidate()
        for group in self.param_groups:
            self._resolve_adapt_exclusion(group)

    def set_trust_ratio_slices(
        self,
        var_list: Iterable[Tensor] | None = None,
        var_names: Iterable[str] | None = None,
        dim: int | None = 0,
        sizes: Sequence[int] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        """Give each slice of the selected parameters its own trust ratio (an expert bank, a fused QKV).

        ``dim`` alone: one ratio per index along ``dim`` (``dim=0`` for ``[experts, in, out]`` or stacked
        layers); with ``sizes``: chunks of those sizes along ``dim`` (``[d, d, d]`` for a fused
        ``[3·d, d]`` QKV), optionally named by ``labels`` (telemetry then reports ``name.q``, else
        ``name[0]``). ``dim=None`` gives the selected parameters one ratio again. Parameters are selected
        by identity (``var_list``) or by a regex search on their names (``var_names``), as in
        :meth:`exclude_from_layer_adaptation`; each call sets the rule of the parameters it selects and
        leaves the others'. A param group may also carry it (``{"params": ..., "trust_ratio_slices": 0}``).
        ``clipnorm`` stays per tensor, as in Keras. Every parameter is checked before any changes.
        """
        if not var_list and not var_names:
            raise ValueError("set_trust_ratio_slices: give the parameters to slice (`var_list` and/or `var_names`).")
        ids, pattern = self._exclusion(var_list, var_names)
        spec = None if dim is None else {"dim": dim, "sizes": sizes, "labels": labels}
        if dim is None and (sizes is not None or labels is not None):
            raise ValueError("set_trust_ratio_slices: `sizes` and `labels` need a `dim`.")
        updated = []
        for gi, group in enumerate(self.param_groups):
            selected = _excluded(group, ids, pattern)
            specs = list(group[SLICES])
            for i, (p, chosen) in enumerate(zip(group["params"], selected)):
                if chosen:
                    specs[i] = normalize(spec, p.shape, f"parameter {_param_name(group, gi, i)!r}")
            updated.append(specs)
        if not any(any(_excluded(g, ids, pattern)) for g in self.param_groups):
            raise ValueError("set_trust_ratio_slices: `var_list` / `var_names` select no parameter of this optimizer.")
        for group, specs in zip(self.param_groups, updated):
            group[SLICES] = specs  # a new list: the layout sees the change
        self._layouts.invalidate()

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
        if not pairs:
            return
        with torch.no_grad():
            torch._foreach_copy_([self._weight(p) for p, _ in pairs], [local(a) for _, a in pairs])
            self._sync_masters([p for p, _ in pairs])
        if self.master_weights:
            self._layouts.mark(self, self._all_params())

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
        """Apply the gradients in ``p.grad``: one Keras ``apply`` call.

        Reading the gradients, planning and laying out only check (a call that raises changes
        nothing); then the backends run the plan, phase by phase. Under ``torch.compile`` (also with
        ``fullgraph=True``) the step is one op of the graph that runs this eager step
        (:mod:`torch_lamb.compiled_step`); with a closure it is a graph break instead.
        """
        if closure is None and torch.compiler.is_compiling() and not self._graph_dtensor:
            # a list kept eagerly: iterating param_groups here would guard the graph on every group value
            compiled_step.run_in_graph(self, self._graph_params)
            return None
        return self._step(closure)

    @torch.compiler.disable
    def _step(self, closure: Callable[[], Any] | None, given_grads: list[Tensor | None] | None = None) -> Any:
        """The step, always run eagerly: under ``torch.compile`` dynamo would drop the counters' updates
        (Python attribute stores in a traced frame), so a compiled step is this eager one.
        ``given_grads``: the gradients a compiled graph hands over (else ``p.grad`` is read)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._all_params()
        if given_grads is not None and len(given_grads) == len(params):
            grads, missing = given_grads, tuple([g is None for g in given_grads])
        else:
            grads, missing = read_grads(params)
        if all(missing):  # torch.optim's convention: a call without gradients is a no-op
            return loss
        if not self.capturable and self._steps.live:  # capturable was switched off: replays advanced the device
            self._iterations = self._call_count()  # count, which this call's plan must start from (a host sync)
        plan = plan_step(self)
        layout = self._layouts.get(self, params, grads, missing)
        if layout.params is not self._layout_params:  # a rebuilt layout: the one time to look at the list
            self._layout_params = layout.params
            self._note_graph_params(layout.params)
        if self.capturable:
            DeviceSteps.check(layout)
        plan.write_back(self)
        bucket_grads = [b.grads(grads) for b in layout.active]
        if not self.capturable and self._steps.live:  # capturable was switched off: the host counts again
            self._steps.release()
        with no_host_reads() if self.capturable else contextlib.nullcontext():
            if self.capturable:
                plan = self._steps.prepare(self, layout, plan)
            if self._guard is not None:
                bucket_grads, plan = self._guard.prepare(layout, bucket_grads, plan, self.capturable)
            if plan.apply:
                self._run(layout, bucket_grads, plan)
            if self.capturable:
                self._steps.finish(self, plan)
        if self._guard is not None:
            self._guard.finish(plan)
        if self.master_weights:
            self._layouts.mark(self, params)
        self._iterations += 1
        return loss

    def _run(self, layout: Layout, grads: list[list[Tensor]], plan: StepPlan) -> None:
        """The phases of one call; each backend call covers one bucket."""
        if plan.updating:
            make_ready(layout.active, grads, plan, self)  # compiles before anything is measured or written
            factors = clip_factors(layout.active, grads, plan)  # reads only
            for bucket, bucket_grads, factor in zip(layout.active, grads, factors):
                self._update_stats(bucket, bucket.backend.update(bucket, bucket_grads, plan, factor))
        else:
            for bucket, bucket_grads in zip(layout.active, grads):
                bucket.backend.accumulate(bucket, bucket_grads, plan)
        for bucket in layout.idle if plan.updating else layout.buckets:
            bucket.backend.ema(bucket, plan)
        for bucket in layout.idle:
            reset_accumulators(bucket, plan)
        if plan.overwrite:
            for bucket in layout.buckets:
                overwrite_with_averages(bucket, plan)

    def _update_stats(self, bucket: Bucket, stats: TrustStats) -> None:
        """Hook for trust-ratio telemetry (a no-op unless ``track_trust_ratios(True)``)."""
        if self._trust_recorder is not None:
            self._record_trust_stats(bucket.names, stats)

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

    def _note_graph_params(self, params: list[Tensor]) -> None:
        """Kept eagerly for a compiled step: the parameters, and whether one is a DTensor. The list object
        stays while its tensors do (a compiled graph guards on it)."""
        known = getattr(self, "_graph_params", [])
        if len(params) != len(known) or not all(map(operator.is_, params, known)):
            self._graph_params = params
            self._graph_dtensor = any(is_dtensor(p) for p in params)

    def _ensure_state(self, with_masters: bool = True, recheck: bool = False) -> None:
        """Create the slots of every parameter (Keras builds them all on the first apply); ``recheck``
        also after state was dropped (``del optimizer.state[param]`` starts that parameter afresh)."""
        if self._state_complete and not recheck:
            return
        keys = self._required_state_keys()
        for p in self._all_params():
            state = self.state[p]
            for key in keys:
                if key not in state:  # also a slot of an option switched on after construction
                    state[key] = self._new_slot(p, key)
        if self.master_weights and not with_masters:
            return  # the step completes the state
        if self.master_weights:  # also after loading a state dict saved without master weights
            for p in self._all_params():
                if p.dtype in LOW_PRECISION and MASTER not in self.state[p]:
                    self.state[p][MASTER] = p.detach().to(torch.float32, copy=True)
        self._state_complete = True

    def _new_slot(self, p: Tensor, key: str) -> Tensor:
        """Zeros, as Keras builds them; an average made after training began starts at the weights
        (from zeros, an EMA with its steady momentum would drag the weights' average toward 0)."""
        if key == AVERAGE and self._iterations > 0:
            return self._weight(p).detach().to(state_dtype(p), copy=True)
        return torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)

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
        calls = self._call_count()
        for group in sd["param_groups"]:
            group["iterations"] = calls
            group.update(counters)
            for key in (SLICES, DECAY_EXCLUDED, ADAPT_EXCLUDED):  # copies: editing the dict must not edit us
                if isinstance(group.get(key), list):
                    group[key] = list(group[key])
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
        loaded_slices: list[list[Any]] = []
        for index, saved in enumerate(groups):
            needed = ("params", "beta_1", "beta_2", "epsilon")
            missing = [k for k in needed if not isinstance(saved, dict) or k not in saved]
            if missing:
                raise ValueError(
                    f"Not a torch_lamb.Lamb state dict: param group {index} lacks {missing} (a state dict of "
                    "another optimizer, such as torch.optim.AdamW, cannot be loaded into Lamb)."
                )
        for gi, (saved, live) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(live["params"]):
                raise ValueError(
                    f"A param group of the state dict has {len(saved['params'])} parameters; "
                    f"the matching group here has {len(live['params'])}."
                )
            if SLICES in saved:  # raises on a bad spec; the checked form is what the group keeps
                loaded_slices.append(group_slices({**live, SLICES: saved[SLICES]}, live["params"], gi))
            else:  # a checkpoint from before trust-ratio slices: the live ones stay
                loaded_slices.append(list(live[SLICES]))
            ids_to_params.update(zip(saved["params"], live["params"]))
        required = self._required_state_keys()
        for pid, value in saved_state.items():
            p = ids_to_params.get(pid)
            if p is None:
                continue  # not a parameter's state: kept as it is, as torch keeps it
            if not isinstance(value, dict):
                raise ValueError(f"The state of parameter {pid!r} must be a dict of tensors. Received: {value!r}")
            missing = [k for k in required if k not in value]
            if missing:
                raise ValueError(
                    f"The state dict lacks {missing} for parameter {pid!r}: was it saved with other "
                    "`use_ema` / `gradient_accumulation_steps` settings, or by another optimizer?"
                )
            for key, tensor in value.items():
                if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                    raise ValueError(
                        f"State {key!r} of parameter {pid!r} must be a floating-point tensor. Received: {tensor!r}"
                    )
                if tensor.shape != p.shape:
                    raise ValueError(
                        f"State {key!r} of parameter {pid!r} has shape {tuple(tensor.shape)} but its parameter has "
                        f"shape {tuple(p.shape)}: the state dict is from a different model."
                    )
        iterations = int(groups[0].get("iterations", 0)) if groups else 0
        counters = {k: int(groups[0].get(k, 0)) for k in NonfiniteGuard.COUNTERS} if groups else {}
        adapt_excluded = [list(g[ADAPT_EXCLUDED]) for g in self.param_groups]
        tensor_lrs = [g["lr"] if isinstance(g["lr"], Tensor) else None for g in self.param_groups]

        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; keep float32 state for low precision.
        for pid, value in saved_state.items():
            p = ids_to_params.get(pid)
            if p is None:
                continue
            for key, tensor in value.items():
                if isinstance(tensor, Tensor):
                    self.state[p][key] = tensor.to(device=p.device, dtype=state_dtype(p), copy=True)
            if not self.master_weights or p.dtype not in LOW_PRECISION:  # a float32 parameter is its own master
                self.state[p].pop(MASTER, None)
        for group in self.param_groups:
            group.pop("iterations", None)
            for key in NonfiniteGuard.COUNTERS:
                group.pop(key, None)
        for group, specs in zip(self.param_groups, loaded_slices):
            group[SLICES] = specs
        for group, flags in zip(self.param_groups, adapt_excluded):  # checkpoints from before the variants
            group.setdefault(ADAPT_EXCLUDED, flags)
            for key in _VARIANT_KEYS:
                group.setdefault(key, self.defaults[key])
            group.setdefault("betas", (group["beta_1"], group["beta_2"]))
            group.setdefault("eps", group["epsilon"])
        self._alias_marks = [(g["beta_1"], g["beta_2"], g["epsilon"]) for g in self.param_groups]
        for group, live in zip(self.param_groups, tensor_lrs):  # a tensor lr stays the tensor a graph reads
            if live is not None:
                saved_lr = group["lr"]
                live.copy_(saved_lr) if isinstance(saved_lr, Tensor) else live.fill_(float(saved_lr))
                group["lr"] = live
        if self._guard is not None:
            self._guard.load(counters)
        n = self.gradient_accumulation_steps
        self._steps.load(iterations, iterations // n if n else iterations)
        self._iterations = iterations
        self._state_complete = False
        self._layouts.invalidate()
        if self.master_weights:  # the loaded masters hold unless a parameter changes after this call
            self._layouts.mark(self, self._all_params())

    _PICKLED = (
        "clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum",
        "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps", "name",
        "implementation", "_learning_rate", "_lr_sources", "_decay_exclusion", "_iterations", "_hyper_sources",
        "_alias_marks",
        "_adapt_exclusion", "master_weights", "skip_nonfinite", "capturable",
    )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._PICKLED})
        state["_iterations"] = self._call_count()
        if self._guard is not None:
            state["_guard_counters"] = {k: self._guard.counter(k) for k in NonfiniteGuard.COUNTERS}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        counters = state.pop("_guard_counters", None)
        super().__setstate__(state)  # torch's load_state_dict also calls this (with state and groups only)
        for key, default in (("_adapt_exclusion", (frozenset(), None)), ("master_weights", False),
                             ("skip_nonfinite", False), ("capturable", False),
                             ("_hyper_sources", [{} for _ in self.param_groups]),
                             ("_alias_marks", [None] * len(self.param_groups))):
            if not hasattr(self, key):  # pickles from before the variants
                setattr(self, key, default)
        if not isinstance(self.state, TrackedState):  # torch's load_state_dict sets a plain defaultdict
            self.state = TrackedState(dict, self.state)
        if not hasattr(self, "_layouts"):  # unpickling (not a load_state_dict)
            self._layouts = LayoutCache()
        if not hasattr(self, "_compile_key"):  # a new object: its own key for compiled steps
            self._compile_key = compiled_step.register(self)
        self._layout_params = None
        self._note_graph_params(self._all_params())
        if not hasattr(self, "_guard"):
            self._guard = NonfiniteGuard() if self.skip_nonfinite else None
            if self._guard is not None:
                self._guard.load(counters or {})
        if not hasattr(self, "_steps"):  # the device counters start again from the host counts
            self._steps = DeviceSteps()
        self._state_complete = False
        self._layouts.invalidate()

    # ------------------------------------------------------------------ helpers

    def _call_count(self) -> int:
        """Calls so far: the device count under ``capturable`` (replays of a captured graph advance it without
        Python; reading it is a host sync), else the host's."""
        calls = self._steps.call_count() if self._steps.live else None
        return self._iterations if calls is None else calls

    def _device_schedules(self) -> list[Any]:
        """Per group, the schedule that ``capturable`` evaluates on the device call counter (None: none, or one
        that only runs on the host: it is evaluated there each call)."""
        out = []
        for source in self._lr_sources:
            schedule = self._learning_rate if source == _FOLLOW_DEFAULT else source
            out.append(schedule if takes_tensor_steps(schedule) else None)
        return out

    def _default_group_lr(self) -> float:
        for group, source in zip(self.param_groups, self._lr_sources):
            if source == _FOLLOW_DEFAULT:
                return group["lr"]
        return self.defaults["lr"]

    def _evaluate_lr(self, source: Any, step: int | None = None) -> float:
        step = self._call_count() if step is None else step
        return check.resolve("learning_rate", source, step=step)

    def _scheduled_learning_rates(self, step: int | None = None) -> list[float | None]:
        """The current value of every group's scheduled learning rate (None: the group's float)."""
        default = self._learning_rate
        default_value = self._evaluate_lr(default, step) if callable(default) else None
        values: list[float | None] = []
        for source in self._lr_sources:
            if source == _FOLLOW_DEFAULT:
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


_KNOWN_GROUP_KEYS = {"params", "param_names", "betas", "eps", "initial_lr", "max_lr", "min_lr", "momentum",
                     "max_momentum", "base_momentum", "name", DECAY_EXCLUDED, ADAPT_EXCLUDED, SLICES}


def _param_name(group: dict[str, Any], group_index: int, i: int) -> str:
    names = group.get("param_names")
    return names[i] if names else f"{group_index}.{i}"


def _check_keys(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Extra group keys are kept (as torch does), but one that looks like a misspelt option is refused."""
    known = _KNOWN_GROUP_KEYS | set(defaults)
    for key in group:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if close:
                raise ValueError(f"Unknown param group key {key!r}: did you mean {close[0]!r}?")


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
