"""``torch_lamb.Lamb``: Keras 3's ``keras.optimizers.Lamb`` as a ``torch.optim.Optimizer``.

This is the face: param groups, aliases, the Keras API, state dicts and pickling. It hands values down and
never itself: the options live in a frozen :class:`~torch_lamb.config.LambConfig`, the counters in a
:class:`~torch_lamb.clock.StepClock`, each call's scalars come from the pure :func:`~torch_lamb.plan.plan_step`
and :func:`torch_lamb.engine.run` runs them over the cached layout. The pipeline follows Keras's order::

    unscale (GradScaler's hand-off, loss_scale_factor) -> accumulate -> clip -> decay -> LAMB -> EMA -> count
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _validation as check
from . import amp, compiled_step, engine, rules
from . import config as cfg
from .checkpoint import COUNTER_KEYS, check_state_dict, counters_in, restore_groups, restore_state, write_counters
from .clock import StepClock
from .config import learning_rate as checked_lr
from .distributed import is_dtensor, no_host_reads
from .engines import constructing_engine, detect, refuse
from .layout import Layout, LayoutCache, check_state_shapes, read_grads
from .nonfinite import FiniteCopies, found_nonfinite
from .plan import plan_step
from .rules import selection as select_params
from .schedules import LearningRateSchedule, takes_tensor_steps
from .shards import Engine, Fragment
from .slices import group_slices
from .state import AVERAGE, MasterWeights, TrackedState, copy_averages, ensure_slots
from .telemetry import TrustRatioTelemetry

__all__ = ["Lamb"]

_DEFAULT_LR, _DEFAULT_BETA_1 = check._Default(0.001), check._Default(0.9)
_DEFAULT_BETA_2, _DEFAULT_EPSILON = check._Default(0.999), check._Default(1e-7)
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


class _Option:
    """An optimizer attribute backed by the config: setting it replaces the config with a checked copy."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, opt: Any, owner: type | None = None) -> Any:
        return self if opt is None else getattr(opt._config, self.name)

    def __set__(self, opt: Any, value: Any) -> None:
        opt._set_config(opt._config.replace(**{self.name: value}))


class Lamb(TrustRatioTelemetry, Optimizer):
    """LAMB (You et al. 2019) with the complete Keras 3 optimizer contract (the README's table has every argument).

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or param-group dicts; a group
            may carry any option (a per-group one overrides the optimizer's; an optimizer-wide one must equal it).
        learning_rate: float >= 0, a :class:`~torch_lamb.LearningRateSchedule` (called with the raw step counter)
            or a zero-argument callable.
        beta_1, beta_2, epsilon: Adam's moment decay rates (in [0, 1)) and epsilon (>= 0).
        weight_decay: decoupled decay ``w *= 1 - weight_decay * lr`` applied before the update.
        clipnorm, clipvalue, global_clipnorm: gradient clipping (at most one; each > 0).
        use_ema, ema_momentum, ema_overwrite_frequency: exponential moving average of the weights.
        loss_scale_factor: static loss scale; gradients are divided by it.
        gradient_accumulation_steps: apply the mean gradient every N calls (N >= 2).
        name: a label (auto-named ``lamb``, ``lamb_1``, ... when None).
        lr, betas, eps: PyTorch-style aliases of ``learning_rate``, ``(beta_1, beta_2)``, ``epsilon``.
        implementation, foreach, fused: the backend (``"auto"``: the CPU kernel, ``"compiled"`` for CUDA, else
            ``"foreach"``); an explicit choice raises where it cannot run.
        capturable: no host read in ``step()``, so that a step can be captured in a CUDA graph.
        weight_decay_mode: ``"decoupled"`` (Keras) or ``"adaptive"`` (the paper's, inside the trust ratio).
        min_trust_ratio, max_trust_ratio: optional bounds (>= 0) on the trust ratio (``max_trust_ratio=1`` is LAMBC).
        master_weights: float32 master copies of float16/bfloat16 parameters (state ``"master_weight"``).
        skip_nonfinite: a call whose gradients hold inf or NaN changes nothing.
    """

    _step_supports_amp_scaling = property(lambda self: amp.takes_hand_off(self.capturable, self._vetoes_on_device))
    clipnorm = _Option()
    clipvalue = _Option()
    global_clipnorm = _Option()
    use_ema = _Option()
    ema_momentum = _Option()
    ema_overwrite_frequency = _Option()
    loss_scale_factor = _Option()
    gradient_accumulation_steps = _Option()
    implementation = _Option()
    capturable = _Option()
    master_weights = _Option()
    skip_nonfinite = _Option()

    def __init__(
        self, params: Iterable[Any], learning_rate: Any = _DEFAULT_LR, beta_1: Any = _DEFAULT_BETA_1,
        beta_2: Any = _DEFAULT_BETA_2, epsilon: float = _DEFAULT_EPSILON, weight_decay: float | None = None,
        clipnorm: float | None = None, clipvalue: float | None = None, global_clipnorm: float | None = None,
        use_ema: bool = False, ema_momentum: float = 0.99, ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None, gradient_accumulation_steps: int | None = None,
        name: str | None = None, *, lr: Any = None, betas: tuple[Any, Any] | None = None, eps: float | None = None,
        implementation: str | None = None, foreach: bool | None = None, fused: bool | None = None,
        capturable: bool = False, weight_decay_mode: str = "decoupled", min_trust_ratio: float | None = None,
        max_trust_ratio: float | None = None, master_weights: bool = False, skip_nonfinite: bool = False,
    ) -> None:
        if isinstance(params, torch.nn.Module):
            raise TypeError("`params` must be the parameters, not the module: pass `model.named_parameters()` "
                            f"(or `model.parameters()`). Received: {type(params).__name__}")
        params, self._config = cfg.adopt_group_options(params, cfg.LambConfig.checked(
            clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm, use_ema=use_ema,
            ema_momentum=ema_momentum, ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor, gradient_accumulation_steps=gradient_accumulation_steps,
            implementation=cfg.implementation_choice(implementation, foreach, fused), capturable=capturable,
            master_weights=master_weights, skip_nonfinite=skip_nonfinite))
        learning_rate = checked_lr("learning_rate", _pick("learning_rate", learning_rate, "lr", lr), self._config)
        if betas is not None:
            if not isinstance(betas, (tuple, list)) or len(betas) != 2 or any(b is None for b in betas):
                raise ValueError(f"`betas` must be a pair of numbers (beta_1, beta_2). Received: betas={betas!r}")
            beta_1, beta_2 = _pick("beta_1", beta_1, "betas", betas[0]), _pick("beta_2", beta_2, "betas", betas[1])
        beta_1, beta_2 = check.beta("beta_1", beta_1), check.beta("beta_2", beta_2)
        epsilon = check.number("epsilon", _pick("epsilon", epsilon, "eps", eps))
        variant = cfg.check_variant({"weight_decay_mode": weight_decay_mode, "min_trust_ratio": min_trust_ratio,
                                 "max_trust_ratio": max_trust_ratio, "layer_adaptation": True})
        if name is not None and not isinstance(name, str):
            raise ValueError(f"`name` must be a string or None. Received: name={name!r}")
        self._clock = StepClock()
        self._layouts, self._masters, self._finite = LayoutCache(), MasterWeights(), FiniteCopies()
        self._learning_rate = learning_rate
        self._books = rules.GroupBooks()  # per group: where its values come from, its rules
        self._selections: dict[str, rules.Selection] = {}
        self._given: set[int] = set()  # the tensors the optimizer was given (an engine may swap them)
        self._engine: Engine | None = constructing_engine()  # a sharding engine that maps pieces to tensors
        self._shards_of = None
        self._slots_complete = False
        self._graph_key = compiled_step.register(self._graph_step)
        self.name = name if name is not None else _auto_name()
        initial_lr = 0.0 if callable(learning_rate) else (
            learning_rate if isinstance(learning_rate, Tensor) else float(learning_rate))
        super().__init__(params, {
            "lr": initial_lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "betas": (beta_1, beta_2),
            "eps": epsilon, "weight_decay": check.optional_nonnegative("weight_decay", weight_decay), **variant})
        self.state = TrackedState(dict, self.state)
        self._graph_params: list[Tensor] = []
        self._graph_dtensor = False
        self._note_graph_params(self._all_params())
        # Every slot now (Keras builds them at the first apply): torch.distributed.checkpoint then never needs
        # its dummy zero-lr step. Masters wait for the first step, so that weights loaded later are copied.
        self._ensure_slots(masters=False)

    def _set_config(self, config: cfg.LambConfig) -> None:
        self._config = config
        self._slots_complete = False
        self._layouts.invalidate()

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; ``learning_rate``, ``betas`` and ``eps`` are accepted as aliases."""
        group, source = cfg.new_group(param_group, self.defaults, self._config)
        rule = self._new_rules(group, len(self.param_groups))
        super().add_param_group(group)
        added = self.param_groups[-1]
        added["betas"], added["eps"] = (added["beta_1"], added["beta_2"]), added["epsilon"]  # torch's names
        source.mark = (added["beta_1"], added["beta_2"], added["epsilon"])
        self._books.add(added, source, rule)
        self._given.update(id(p) for p in added["params"])
        write_counters([added], self._clock)
        scheduled = self._learning_rate if source.lr == cfg.FOLLOW_DEFAULT else source.lr
        if callable(scheduled) and not isinstance(scheduled, Tensor):
            added["lr"] = cfg.evaluate("lr", scheduled, self._clock.host_calls)
        self._slots_complete = False
        self._layouts.invalidate()
        if hasattr(self, "_graph_params"):  # added after construction
            self._ensure_slots(masters=False)
            self._note_graph_params(self._all_params())

    def _new_rules(self, group: dict[str, Any], index: int) -> rules.GroupRules:
        """A new group's rules: the lists it carries (checked), else the current selections and its own
        ``trust_ratio_slices``."""
        flags = {key: rules.checked(key, group[key], group, index) if key in group else
                 self._selections.get(key, rules.Selection()).of(group, self._names([group]))
                 for key in (rules.DECAY_EXCLUDED, rules.ADAPT_EXCLUDED)}
        slices = group_slices(group, group["params"], index)
        return rules.GroupRules(flags[rules.DECAY_EXCLUDED], flags[rules.ADAPT_EXCLUDED], slices)

    # ------------------------------------------------------------------ public Keras API

    @property
    def iterations(self) -> int:
        """Updates applied so far (micro-steps // N under gradient accumulation), as in Keras."""
        return self._clock.value("updates")

    @property
    def skipped_steps(self) -> Tensor | int:
        """Calls skipped for non-finite gradients (a device tensor once counted there; needs ``skip_nonfinite``)."""
        if not self._config.skip_nonfinite:
            raise AttributeError("`skipped_steps` is counted only with `skip_nonfinite=True`.")
        return self._clock.skipped

    @property
    def clock(self) -> StepClock:
        """The optimizer's counters (:class:`~torch_lamb.clock.StepClock`): calls, updates, window, skipped."""
        return self._clock

    @property
    def learning_rate(self) -> float:
        """The current learning rate (of the optimizer-level ``learning_rate``)."""
        lr = self._learning_rate
        if callable(lr) and not isinstance(lr, Tensor):
            return cfg.evaluate("learning_rate", lr, self._clock.value("calls"))
        return next((g["lr"] for g in self.param_groups if self._books.of(g).source.lr == cfg.FOLLOW_DEFAULT),
                    self.defaults["lr"])

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if isinstance(self._learning_rate, LearningRateSchedule) and not callable(value):
            raise TypeError("This optimizer was created with a `LearningRateSchedule`; its learning rate is not "
                            "settable to a float. Assign a new schedule instead.")
        value = checked_lr("learning_rate", value, self._config)
        current = cfg.evaluate("learning_rate", value, self._clock.host_calls) if callable(value) else value
        self._learning_rate = value
        if not callable(value):
            self.defaults["lr"] = value
        for group in self.param_groups:
            if self._books.of(group).source.lr == cfg.FOLLOW_DEFAULT:
                group["lr"] = current

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss * loss_scale_factor`` (or ``loss`` when no factor is set)."""
        return loss * self.loss_scale_factor if self.loss_scale_factor is not None else loss

    def exclude_from_weight_decay(self, var_list: Iterable[Tensor] | None = None,
                                  var_names: Iterable[str] | None = None) -> None:
        """Exclude parameters from weight decay, by identity or by regex search on their names (from
        ``model.named_parameters()``). Each call replaces the previous exclusions, as in Keras."""
        self._set_selection(rules.DECAY_EXCLUDED, var_list, var_names)

    def exclude_from_layer_adaptation(self, var_list: Iterable[Tensor] | None = None,
                                      var_names: Iterable[str] | None = None) -> None:
        """Give parameters a trust ratio of exactly 1 (a plain Adam step), as TF-Addons does. Same arguments and
        replacement rule as :meth:`exclude_from_weight_decay`; the two are independent."""
        self._set_selection(rules.ADAPT_EXCLUDED, var_list, var_names)

    def set_trust_ratio_slices(self, var_list: Iterable[Tensor] | None = None, var_names: Iterable[str] | None = None,
                               dim: int | None = 0, sizes: Sequence[int] | None = None,
                               labels: Sequence[str] | None = None) -> None:
        """Give each slice of the selected parameters its own trust ratio (an expert bank, a fused QKV).

        ``dim`` alone: one ratio per index along ``dim``; with ``sizes``: chunks of those sizes along ``dim``,
        optionally named by ``labels`` (telemetry reports ``name.q``, else ``name[0]``). ``dim=None`` gives them
        one ratio again. Parameters are selected as in :meth:`exclude_from_weight_decay`; each call sets the rule
        of the parameters it selects and leaves the others'. Every parameter is checked before any changes."""
        if not var_list and not var_names:
            raise ValueError("set_trust_ratio_slices: give the parameters to slice (`var_list` and/or `var_names`).")
        if dim is None and (sizes is not None or labels is not None):
            raise ValueError("set_trust_ratio_slices: `sizes` and `labels` need a `dim`.")
        spec = None if dim is None else {"dim": dim, "sizes": sizes, "labels": labels}
        chosen = self._select(var_list, var_names)
        every = self._engine is None or not self._engine.copies_groups  # else another rank may hold them
        self._set_rules(rules.SLICES, rules.sliced(self.param_groups, self._books.rules(self.param_groups), chosen,
                                                   spec, self._names(), every))

    @torch.no_grad()
    def finalize_variable_values(self, var_list: Iterable[Tensor] | None = None) -> None:
        """Copy the moving averages into the parameters (all, or those given); under an engine, on every rank."""
        params = self._all_params() if var_list is None else list(var_list)
        pairs = [(p, a) for p in params if (a := dict.get(self.state, p, {}).get(AVERAGE)) is not None]
        if not self.use_ema or not pairs:
            return

        write = functools.partial(copy_averages, self.state, pairs)
        write() if self._engine is None else self._engine.finalize(write)
        self._masters.mark(self.state, self._all_params())

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as Keras's ``get_config``."""
        lr = self._learning_rate
        options = {k: getattr(self._config, k) for k in cfg.OPTIMIZER_WIDE if k not in ("implementation", "capturable")}
        return {"name": self.name, "learning_rate": lr if callable(lr) else self.learning_rate,
                **{k: self.defaults[k] for k in ("weight_decay", "beta_1", "beta_2", "epsilon", *cfg.VARIANT_KEYS[:3])},
                **options}

    def backends(self) -> dict[str, str]:
        """Which backend updated each parameter in the latest call (``{name: backend}``; empty before one)."""
        layout = self._layouts.layout
        names = self._names()
        return {names[id(p)]: b.backend.name for b in (layout.buckets if layout else []) for p in b.owners}

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply the gradients in ``p.grad``: one Keras ``apply`` call.

        Reading the gradients, resolving the groups, laying out and planning only check (a call that raises
        changes nothing); then :func:`torch_lamb.engine.run` runs the plan. Under ``torch.compile`` the step is
        one op of the graph that runs this eager step (:mod:`torch_lamb.compiled_step`); with a closure (or
        DTensor parameters) it is a graph break to it.
        """
        if torch.compiler.is_compiling():
            if closure is None and not self._graph_dtensor:
                return compiled_step.run_in_graph(self._graph_key, self._graph_params)
            return torch.compiler.disable(self._step)(closure)
        return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None, given_grads: list[Tensor | None] | None = None) -> Any:
        """The eager step (``given_grads``: the gradients a compiled graph hands over; else ``p.grad`` is read)."""
        loss = _call(closure)
        hand = amp.handed_over(getattr(self, "grad_scale", None), getattr(self, "found_inf", None), self.capturable)
        if hand.skip:  # GradScaler found inf/NaN: the call changes and counts nothing
            return loss
        if hand is not amp.NOTHING and self.capturable:
            amp.check_device_veto(self._vetoes_on_device())
        params = self._all_params()
        # the CPU kernel's common case: every gradient checked and its pointer read in one C++ pass
        gathered = self._layouts.gather(params) if given_grads is None else None
        grads, missing = (None, self._layouts.layout.key[0]) if gathered else read_grads(params, given_grads)
        if all(missing):  # no gradients: torch's no-op (an engine's rank joins its collectives)
            return self._join(loss)
        options = self._group_options()  # every (possibly edited) group value checked, callables evaluated
        layout, bucket_grads = self._layout(params, grads, missing, gathered)  # slots made, buckets checked
        with no_host_reads(self.capturable):
            plan = self._plan(options, layout, bucket_grads, hand)
            self._show(options)  # the first write: everything above only checks
            records = engine.run(layout.active, layout.idle, bucket_grads, plan, self.implementation == "auto",
                                 self._finite, self._engine)
            self._advance(plan)
        self._record_trust_stats(plan.call, records)
        self._after_step(params)
        return loss

    def _plan(self, options: tuple[cfg.GroupOptions, ...], layout: Layout, grads: list[list[Tensor]],
              hand: amp.HandOff) -> Any:  # the finite check reads the gradients still scaled by both
        found = found_nonfinite(layout.active, grads, (self.loss_scale_factor or 1.0) / (hand.unscale or 1.0),
                                self._clock.on_device, self._engine) if self.skip_nonfinite else None
        return plan_step(self._config, options, self._clock, found, layout.active[0].momentums[0].dtype,
                         hand.unscale, hand.veto)

    def _vetoes_on_device(self) -> bool:
        """Whether GradScaler's verdict can be a device-side veto here: nothing the host decides counts calls."""
        sources = [self._learning_rate if s.lr == cfg.FOLLOW_DEFAULT else s.lr
                   for s in self._books.sources(self.param_groups)]
        return amp.vetoes_on_device(self._config, sources, takes_tensor_steps)

    def _advance(self, plan: Any) -> None:
        if self._engine is None or self._engine.clock_ticks():  # DeepSpeed: one engine step is several calls
            plan.advance(self._clock)

    def _join(self, loss: Any) -> Any:
        """A rank with nothing to step joins its engine's collectives (ZeRO) and counts the call as they do."""
        if self._engine is not None and self._engine.global_reduce is not None:
            self._advance(engine.join(self._config, self._group_options(), self._clock, self._engine))
        return loss

    def _group_options(self) -> tuple[cfg.GroupOptions, ...]:
        self._adopt_group_edits()
        return cfg.resolve_groups(self.param_groups, self._books.sources(self.param_groups), self._learning_rate,
                              self._clock.host_calls, self._config, self.defaults, takes_tensor_steps)

    def _layout(self, params: list[Tensor], grads: list[Tensor | None] | None, missing: tuple[bool, ...],
                gathered: list[Any] | None = None) -> tuple[Layout, list[Any]]:
        """The call's buckets and their gradients, with every slot made and the master-weight rule applied; the
        clock where the step may read it (on the device under ``capturable``, or a device-side ``skip_nonfinite``)."""
        fits = gathered is not None or self._layouts.holds(params)  # the scan ran only where the layout holds
        if self._engine is None and not fits:
            self._engine = detect(params, self._given, self.state)
            self._shards_of = self._engine.shards if self._engine is not None else None
        if self._engine is not None:
            refuse(self._engine, self._config, self._books.rules(self.param_groups))
        if not (fits and self._slots_complete and len(self.state) == self._slot_count):
            self._ensure_slots(masters=True)  # new parameters, or `del opt.state[p]`: p starts afresh
        if self.master_weights and self._masters.stale(params):
            check_state_shapes(self.state, params, self._names())  # a resized parameter raises before its master moves
            self._masters.refresh(self.state, params)
            self._layouts.invalidate()
        layout = self._layouts.get(self.param_groups, self._books.rules(self.param_groups), self.state, self._config,
                                   params, grads, missing, self._names, self._shards_of, self._fragment_rule, fits,
                                   gathered)
        bucket_grads, layout.call_grads = layout.call_grads, []  # the layout keeps no gradient past the call
        self._clock.settle([b.device for b in layout.buckets], self.capturable, self.skip_nonfinite)
        return layout, bucket_grads

    def _show(self, options: tuple[cfg.GroupOptions, ...]) -> None:
        """Show this call's values in the groups, in both spellings (after every check passed)."""
        for group, source, values in zip(self.param_groups, self._books.sources(self.param_groups), options):
            if source.lr is not None and (source.lr != cfg.FOLLOW_DEFAULT or callable(self._learning_rate)):
                group["lr"] = values.lr
            group["beta_1"], group["beta_2"], group["epsilon"] = values.beta_1, values.beta_2, values.epsilon
            group["betas"], group["eps"] = (values.beta_1, values.beta_2), values.epsilon
            source.mark = (values.beta_1, values.beta_2, values.epsilon)

    def _after_step(self, params: list[Tensor]) -> None:
        write_counters(self._books.groups(), self._clock)  # also the groups an engine hid during the call
        if self.master_weights:
            self._masters.mark(self.state, params)

    def _graph_step(self, params: list[Tensor], grads: list[Tensor | None]) -> None:
        """The eager step a compiled graph's op runs: the graph normally hands over the parameters themselves;
        where it hands copies, they carry its view of the parameters in and the step's result out. Where the
        parameters changed since the graph was traced, the step reads them and their ``.grad`` as eager does."""
        mine = self._graph_params
        current = self._all_params()
        if len(current) != len(mine) or not all(map(operator.is_, current, mine)):
            self._note_graph_params(current)  # a new list: the next call retraces
            self._step(None)
            return
        copies = [(a, p) for a, p in zip(params, mine) if a.data_ptr() != p.data_ptr()]
        if copies:
            torch._foreach_copy_([p for _, p in copies], [a for a, _ in copies])
        self._masters.absorb_version_bumps(self.state, mine)
        self._step(None, grads)
        if copies:
            torch._foreach_copy_([a for a, _ in copies], [p for _, p in copies])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state dict, with the counters and the per-parameter rules in every group."""
        sd = super().state_dict()
        counters = {COUNTER_KEYS[k]: v for k, v in self._clock.values().items()}
        for group, rule in zip(sd["param_groups"], self._books.rules(self.param_groups)):
            group.update(counters)
            group.update({key: list(rule.get(key)) for key in rules.RULE_KEYS})  # copies: the dict is the caller's
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, checking every value first: a mismatch raises and changes nothing."""
        loaded = check_state_dict(state_dict, self.param_groups, self._config.slot_keys(),
                                  self.gradient_accumulation_steps, self._given)
        tensor_lrs = [g["lr"] if isinstance(g["lr"], Tensor) else None for g in self.param_groups]
        before = list(self.param_groups)
        super().load_state_dict(state_dict)
        restore_state(self.state, state_dict["state"], loaded, self.master_weights)
        restore_groups(self.param_groups, self.defaults, tensor_lrs)
        self._books.moved(before, self.param_groups)  # torch's loader made new group dicts
        self._books.set_rules(self.param_groups, [r.updated(saved) for r, saved in zip(
            self._books.rules(self.param_groups), loaded.rules)])
        for group, source in zip(self.param_groups, self._books.sources(self.param_groups)):
            source.mark = (group["beta_1"], group["beta_2"], group["epsilon"])
        self._clock.load(loaded.counters or {"calls": 0})
        write_counters(self.param_groups, self._clock)
        self._slots_complete = False
        self._layouts.invalidate()
        if self.master_weights:  # the loaded masters hold unless a parameter changes after this call
            self._masters.mark(self.state, self._all_params())

    _PICKLED = ("_config", "_learning_rate", "_selections", "name")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._PICKLED})
        state["_counts"] = self._clock.values()
        state["_group_books"] = [(b.source, b.rules) for b in map(self._books.of, self.param_groups)]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        counts = state.pop("_counts", None)
        super().__setstate__(state)  # torch's load_state_dict also calls this (with state and groups only)
        if not isinstance(self.state, TrackedState):  # torch's load_state_dict sets a plain defaultdict
            self.state = TrackedState(dict, self.state)
        if counts is not None:  # unpickling: a new object (not a load_state_dict)
            self._books, self._given, self._engine, self._shards_of = rules.GroupBooks(), set(), None, None
            for group, (source, group_rules) in zip(self.param_groups, state.pop("_group_books")):
                self._books.add(group, source, group_rules)
                self._given.update(id(p) for p in group["params"])
            self._clock = StepClock(**counts)
            self._layouts, self._masters, self._finite = LayoutCache(), MasterWeights(), FiniteCopies()
            self._graph_key = compiled_step.register(self._graph_step)
            self._graph_params, self._graph_dtensor = [], False
            self._note_graph_params(self._all_params())
        self._slots_complete = False
        self._layouts.invalidate()

    def __repr__(self) -> str:
        """One line per group (its options, not its parameter lists: a 200-tensor model prints a few lines)."""
        lines = [f"Lamb(name={self.name!r}, {self._config})"]
        for i, group in enumerate(self.param_groups):
            shown = {k: v for k, v in group.items() if k not in ("params", "param_names", *COUNTER_KEYS.values(),
                                                                 *rules.RULE_KEYS, "betas", "eps")}
            lines.append(f"  group {i}: {len(group['params'])} parameters, {shown}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ helpers

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _names(self, groups: list[dict[str, Any]] | None = None) -> dict[int, str]:
        """Each parameter's name (ZeRO copies whole groups' names over each rank's share: its own record holds)."""
        engine_names = self._engine.param_names if self._engine is not None else lambda params: None
        return rules.param_names(self.param_groups if groups is None else groups, engine_names)

    def _note_graph_params(self, params: list[Tensor]) -> None:
        """Kept eagerly for a compiled step: the parameters, and whether one is a DTensor. The list object stays
        while its tensors do (a compiled graph guards on it)."""
        if len(params) != len(self._graph_params) or not all(map(operator.is_, params, self._graph_params)):
            self._graph_params = params
            self._graph_dtensor = any(is_dtensor(p) for p in params)

    def _ensure_slots(self, masters: bool) -> None:
        params = self._all_params()
        ensure_slots(params, self.state, self._config.slot_keys(), started=self._clock.host_calls > 0,
                     masters=masters and self.master_weights)
        self._slot_count = len(self.state)
        self._slots_complete = masters or not self.master_weights

    def _adopt_group_edits(self) -> None:
        """Counters or rules a group holds that changed since the optimizer last wrote them (a user's edit, or an
        engine that restored its own copy of the groups)."""
        counters = counters_in(self.param_groups, self._clock)
        if counters is not None:
            self._clock.load(counters)
        if self._books.adopt_edits(self.param_groups, self._engine is not None and self._engine.copies_groups):
            self._layouts.invalidate()

    def _set_selection(self, key: str, var_list: Iterable[Tensor] | None, var_names: Iterable[str] | None) -> None:
        chosen = self._selections[key] = self._select(var_list, var_names)
        names = self._names()
        self._set_rules(key, [chosen.of(g, names) for g in self.param_groups])

    def _set_rules(self, key: str, per_group: list[list[Any]]) -> None:
        self._books.set_rules(self.param_groups, [r.with_(key, values) for r, values in zip(
            self._books.rules(self.param_groups), per_group)])
        self._layouts.invalidate()

    def _select(self, var_list: Iterable[Tensor] | None, var_names: Iterable[str] | None) -> rules.Selection:
        """A selection by identity may name only this optimizer's tensors, or (an engine that gives each rank a
        share of the model's, or swaps them for its own) the model's."""
        named = any(g.get("param_names") for g in self.param_groups)
        return select_params(self.param_groups, var_list, var_names, self._names(), named,
                             self._engine is None or not self._engine.copies_groups)

    def _fragment_rule(self, key: str, fragment: Fragment) -> bool:
        """Whether a selection (exclusions) holds a fragment's logical tensor, by its identity or name."""
        chosen = self._selections.get(key)
        return chosen is not None and chosen.holds(fragment.owner, fragment.name)

def _call(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value
