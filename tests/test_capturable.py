"""``capturable=True``: the device step counter and the per-step scalars derived from it (torch_lamb.capturable).

A captured CUDA graph is emulated on the CPU by :class:`Graph`: it records the aten ops of one ``step()`` (a
``TorchDispatchMode`` that refuses any host read) and replays them on the same tensors, as a CUDA graph
replays its kernels on the same memory, without running Python. Whatever the host computed is frozen in it,
as in a real graph (tests/test_gpu.py captures real ones).
"""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Callable
from typing import Any

import impls
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torch_lamb import Lamb
from torch_lamb.distributed import no_host_reads
from torch_lamb.functional import f32
from torch_lamb.schedules import (
    CosineDecay,
    CosineDecayRestarts,
    ExponentialDecay,
    InverseTimeDecay,
    LearningRateSchedule,
    PiecewiseConstantDecay,
    PolynomialDecay,
    takes_tensor_steps,
)

CAPTURABLE = impls.params(capturable=True)
aten = torch.ops.aten
_HOST_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
               aten.nonzero.default, aten.masked_select.default, aten.lift_fresh.default}  # lift_fresh: torch.tensor


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


class Graph(TorchDispatchMode):
    """Records the ops of the calls made within it; :meth:`replay` runs them again on the same tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            raise AssertionError(f"a host read in a capturable step: {func}")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def replay(self) -> None:
        """Each op again, its results written into the tensors it returned when recorded (their memory)."""
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                fresh = func(*args, **kwargs)
                if func.is_view:
                    continue  # a view of memory that the ops write: nothing to copy
                for old, new in zip(_tensors(out), _tensors(fresh)):
                    if old is not new:
                        old.copy_(new)


SHAPES = [(6, 5), (5,), (3, 2, 2)]


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(calls: int, dtype: torch.dtype = torch.float32, bad: tuple[int, ...] = ()) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for call in range(calls):
        grads = [(torch.randn(s, generator=g) * 0.1).to(dtype) for s in SHAPES]
        if call in bad:
            grads[0][1, 2] = float("nan")
        out.append(grads)
    return out


def _snapshot(params: list[torch.Tensor], opt: Lamb) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params] + [t.clone() for p in params for _, t in sorted(opt.state[p].items())]


def _assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"tensor {i} differs: max {(a - b).abs().max()}"


def _train(opt: Lamb, params: list[torch.Tensor], grads: list[list[torch.Tensor]],
           wrap: Callable[[], Any] = contextlib.nullcontext) -> None:
    for call_grads in grads:
        for p, g in zip(params, call_grads):
            p.grad = g.clone()
        with wrap():
            opt.step()


def _run(cfg: dict[str, Any], impl: str, capturable: bool, calls: int = 6, wrap=contextlib.nullcontext,
         dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], Lamb]:
    params = _params(dtype)
    opt = Lamb(params, implementation=impl, capturable=capturable, **_fresh(cfg))
    _train(opt, params, _grads(calls, dtype), wrap)
    return _snapshot(params, opt), opt


def _fresh(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` with its own schedule objects (each optimizer gets its own)."""
    return copy.deepcopy(cfg)


CONFIGS = {
    "float_lr": {"learning_rate": 0.01},
    "exponential_decay": {"learning_rate": ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5), "weight_decay": 0.1},
    "cosine_warmup": {"learning_rate": CosineDecay(0.0, 4, alpha=0.1, warmup_target=0.05, warmup_steps=2),
                      "weight_decay": 0.1},
    "adaptive_decay_bounds": {"learning_rate": 0.01, "weight_decay": 0.1, "weight_decay_mode": "adaptive",
                              "min_trust_ratio": 0.5, "max_trust_ratio": 2.0},
    "ema_overwrite": {"learning_rate": 0.01, "use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 2},
    "clipnorm": {"learning_rate": 0.02, "clipnorm": 0.05},
    "global_clipnorm_loss_scale": {"learning_rate": 0.02, "global_clipnorm": 0.1, "loss_scale_factor": 8.0},
    "clipvalue": {"learning_rate": 0.02, "clipvalue": 0.05},
    "accumulation": {"learning_rate": InverseTimeDecay(0.05, 2, 0.5), "gradient_accumulation_steps": 2,
                     "weight_decay": 0.05, "use_ema": True},
    "skip_nonfinite": {"learning_rate": PolynomialDecay(0.05, 4, cycle=True), "skip_nonfinite": True,
                       "use_ema": True, "weight_decay": 0.05},
}


# ------------------------------------------------------------------ capturable vs the host-scalar step


@pytest.mark.parametrize("implementation", CAPTURABLE)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_capturable_equals_the_host_scalar_step(config, implementation):
    """Bit for bit the step with host scalars once the norms take the same path (capturable sums float32 norms
    in float64: the host may not check them), and within 1e-6 of the plain step; the same ``iterations``."""
    cfg = CONFIGS[config]
    got, opt = _run(cfg, implementation, capturable=True)
    same_norms, ref = _run(cfg, implementation, capturable=False, wrap=no_host_reads)
    plain, _ = _run(cfg, implementation, capturable=False)
    _assert_same_bits(got, same_norms)
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert opt.iterations == ref.iterations and opt.clock.on_device


@pytest.mark.parametrize("implementation", CAPTURABLE)
def test_low_precision_with_master_weights(implementation):
    cfg = {"learning_rate": CosineDecay(0.05, 5), "weight_decay": 0.05, "use_ema": True, "master_weights": True}
    got, _ = _run(cfg, implementation, capturable=True, dtype=torch.bfloat16)
    want, _ = _run(cfg, implementation, capturable=False, wrap=no_host_reads, dtype=torch.bfloat16)
    _assert_same_bits(got, want)


def test_the_compiled_backend_assembles_its_scalars_on_the_device(monkeypatch):
    """The compiled backend's scalar vector: stacked from device tensors and cached constants (its host buffer,
    the fast path's H2D source, is never used), with no host read, and the host-scalar step's bits."""
    impls.skip_unless("compiled")
    cfg = {"learning_rate": CosineDecay(0.05, 4, warmup_target=0.1, warmup_steps=2), "weight_decay": 0.1,
           "use_ema": True, "gradient_accumulation_steps": 2, "global_clipnorm": 0.1, "loss_scale_factor": 4.0}
    params = _params()
    opt = Lamb(params, implementation="compiled", capturable=True, **_fresh(cfg))
    grads = _grads(6)
    _train(opt, params, grads[:2])  # a window: the graphs are compiled
    from torch_lamb.backends.compiled import ScalarVector

    real_fill = ScalarVector.fill

    def device_fill(vector, values, device):  # the vector is assembled on the device, never from the host buffer
        vector.host_tensor = None  # any use of the host buffer raises
        return real_fill(vector, values, device)

    monkeypatch.setattr(ScalarVector, "fill", device_fill)
    _refuse_host_reads(monkeypatch)
    _train(opt, params, grads[2:])
    monkeypatch.undo()
    want, ref = _run(cfg, "compiled", capturable=False, wrap=no_host_reads)
    _assert_same_bits(_snapshot(params, opt), want)
    assert opt.iterations == ref.iterations == 3


# ------------------------------------------------------------------ no host reads; replay


def _refuse_host_reads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("host read in step()")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "tensor", refuse)  # host values reach the device by fill kernels, never copies
    monkeypatch.setattr(torch, "as_tensor", refuse)


@pytest.mark.parametrize("implementation", CAPTURABLE)
@pytest.mark.parametrize("guard", [False, True], ids=["plain", "skip_nonfinite"])
def test_a_capturable_step_never_reads_the_host(monkeypatch, implementation, guard):
    """Schedule, EMA with overwrite, accumulation (and the guard): no ``.item()``, ``bool(t)``... in Python, no
    ``_local_scalar_dense`` below it (torch's one-weight ``_foreach_lerp_`` would read a tensor weight so); and
    a call replayed without Python still advances the schedule, bias correction and EMA weight."""
    cfg = {"learning_rate": CosineDecay(0.05, 6), "use_ema": True, "ema_overwrite_frequency": 2,
           "gradient_accumulation_steps": 2, "weight_decay": 0.05, "loss_scale_factor": 2.0, "skip_nonfinite": guard}
    params = _params()
    opt = Lamb(params, implementation=implementation, capturable=True, **_fresh(cfg))
    grads = _grads(12)
    _train(opt, params, grads[:2])  # the layout is built; the counters live on the device
    _refuse_host_reads(monkeypatch)
    graphs = []
    for call_grads in grads[2:6]:  # one graph per distinct call: the window's phases x the overwrite period
        for p, g in zip(params, call_grads):
            p.grad.copy_(g)  # static gradients, as a graph needs
        with Graph() as graph:
            opt.step()
        graphs.append(graph)
    for call, call_grads in enumerate(grads[6:]):
        for p, g in zip(params, call_grads):
            p.grad.copy_(g)
        graphs[call % 4].replay()
    monkeypatch.undo()
    want, ref = _run(cfg, implementation, capturable=True, calls=12)
    _assert_same_bits(_snapshot(params, opt), want)
    assert opt.iterations == ref.iterations == 6 and opt.state_dict()["param_groups"][0]["iterations"] == 12


REPLAYED = {
    "schedule_clip_loss_scale": ({"learning_rate": ExponentialDecay(0.05, 2, 0.7), "weight_decay": 0.1,
                                  "global_clipnorm": 0.1, "loss_scale_factor": 4.0}, 1, 1),
    "ema_warmup_in_a_window": ({"learning_rate": 0.02, "use_ema": True, "ema_momentum": 0.9, "weight_decay": 0.05,
                                "gradient_accumulation_steps": 3}, 1, 3),  # replays of the first window's calls
    "restarts_adaptive_bounds": ({"learning_rate": CosineDecayRestarts(0.05, 2), "weight_decay": 0.1,
                                  "weight_decay_mode": "adaptive", "max_trust_ratio": 1.5, "clipnorm": 0.05}, 1, 1),
    "accumulation_piecewise": ({"learning_rate": PiecewiseConstantDecay([3, 6], [0.05, 0.02, 0.01]),
                                "gradient_accumulation_steps": 2, "use_ema": True}, 2, 2),
    "skip_nonfinite_accumulation": ({"learning_rate": 0.02, "skip_nonfinite": True, "gradient_accumulation_steps": 2,
                                     "use_ema": True, "ema_overwrite_frequency": 1}, 2, 2),
}


@pytest.mark.parametrize("implementation", CAPTURABLE)
@pytest.mark.parametrize("config", sorted(REPLAYED))
def test_replayed_calls_equal_eager_calls(config, implementation):
    """Calls recorded once (one per phase of the window) and replayed without Python give the eager calls' bits:
    the schedule, bias correction, EMA weight and the guard's counts advance on the device (a non-finite
    gradient during the replays is skipped there too). As on CUDA, a warm-up call makes the state and the
    counters before the capture (made during one, a replay would make them again)."""
    cfg, warmup, period = REPLAYED[config]
    bad = (9,) if cfg.get("skip_nonfinite") else ()
    grads = _grads(12, bad=bad)
    params = _params()
    opt = Lamb(params, implementation=implementation, capturable=True, **_fresh(cfg))
    _train(opt, params, grads[:warmup])
    graphs = []
    for call_grads in grads[warmup:warmup + period]:
        for p, g in zip(params, call_grads):
            p.grad.copy_(g)  # static gradients, as a graph needs
        with Graph() as graph:
            opt.step()
        graphs.append(graph)
    for call, call_grads in enumerate(grads[warmup + period:]):
        for p, g in zip(params, call_grads):
            p.grad.copy_(g)
        graphs[call % period].replay()
    eager = _params()
    ref = Lamb(eager, implementation=implementation, capturable=True, **_fresh(cfg))
    _train(ref, eager, grads)
    _assert_same_bits(_snapshot(params, opt), _snapshot(eager, ref))
    assert opt.iterations == ref.iterations
    if cfg.get("skip_nonfinite"):
        assert int(opt.skipped_steps) == int(ref.skipped_steps) == 1


def test_a_tensor_learning_rate_is_read_on_the_device():
    """torch's capturable convention: a 0-dim tensor ``lr`` in a param group, filled between replays, is what the
    replayed step uses (with its decay factor); the host never reads it."""
    lrs = [0.02, 0.015, 0.01, 0.03, 0.005, 0.02]
    grads = _grads(len(lrs))
    params = _params()
    lr = torch.tensor(lrs[0])
    opt = Lamb([{"params": params[:2], "lr": lr}, {"params": params[2:]}], learning_rate=0.01, weight_decay=0.1,
               capturable=True)
    assert opt.param_groups[0]["lr"] is lr
    _train(opt, params, grads[:1])
    lr.fill_(lrs[1])
    for p, g in zip(params, grads[1]):
        p.grad.copy_(g)
    with Graph() as graph:
        opt.step()
    for value, call_grads in zip(lrs[2:], grads[2:]):
        lr.fill_(value)
        for p, g in zip(params, call_grads):
            p.grad.copy_(g)
        graph.replay()
    eager = _params()
    ref = Lamb([{"params": eager[:2]}, {"params": eager[2:]}], learning_rate=0.01, weight_decay=0.1, capturable=True)
    for value, call_grads in zip(lrs, grads):
        ref.param_groups[0]["lr"] = value
        _train(ref, eager, [call_grads])
    _assert_same_bits(_snapshot(params, opt), _snapshot(eager, ref))


# ------------------------------------------------------------------ counters: iterations, resume, pickling


@pytest.mark.parametrize("implementation", CAPTURABLE)
@pytest.mark.parametrize("guard", [False, True], ids=["plain", "skip_nonfinite"])
def test_resume_mid_training_is_bit_exact(implementation, guard):
    """A state dict saved mid-window (device counters read once, outside the step) resumes bit for bit."""
    cfg = {"learning_rate": CosineDecay(0.05, 8, warmup_target=0.08, warmup_steps=2), "weight_decay": 0.05,
           "use_ema": True, "gradient_accumulation_steps": 2, "skip_nonfinite": guard}
    grads = _grads(9, bad=(4,) if guard else ())
    params_a = _params()
    opt_a = Lamb(params_a, implementation=implementation, capturable=True, **_fresh(cfg))
    _train(opt_a, params_a, grads)

    params_b = _params()
    opt_b = Lamb(params_b, implementation=implementation, capturable=True, **_fresh(cfg))
    _train(opt_b, params_b, grads[:5])
    sd = opt_b.state_dict()
    assert sd["param_groups"][0]["iterations"] == 5
    params_c = [torch.nn.Parameter(p.detach().clone()) for p in params_b]
    opt_c = Lamb(params_c, implementation=implementation, capturable=True, **_fresh(cfg))
    opt_c.load_state_dict(sd)
    _train(opt_c, params_c, grads[5:])
    _assert_same_bits(_snapshot(params_c, opt_c), _snapshot(params_a, opt_a))
    assert opt_c.iterations == opt_a.iterations == 4


def test_state_dict_and_pickle_count_the_replayed_calls():
    """Replays advance the device counters only; ``iterations``, ``state_dict()`` and a pickle read those, so a
    checkpoint taken after replays resumes where the replays left off (bias correction, schedule, EMA)."""
    cfg = {"learning_rate": ExponentialDecay(0.05, 3, 0.5), "use_ema": True, "weight_decay": 0.05}
    grads = _grads(8)
    params = _params()
    opt = Lamb(params, capturable=True, implementation="foreach", **_fresh(cfg))
    _train(opt, params, grads[:1])
    for p, g in zip(params, grads[1]):
        p.grad.copy_(g)
    with Graph() as graph:
        opt.step()
    for call_grads in grads[2:5]:
        for p, g in zip(params, call_grads):
            p.grad.copy_(g)
        graph.replay()
    assert opt.clock.host_calls == 2 and opt.iterations == 5  # the host's count stopped at the capture
    sd = opt.state_dict()
    assert sd["param_groups"][0]["iterations"] == 5
    for restored in (pickle.loads(pickle.dumps(opt)), None):
        params_c = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt_c = Lamb(params_c, capturable=True, implementation="foreach", **_fresh(cfg))
        if restored is None:
            opt_c.load_state_dict(sd)
        else:
            assert restored.clock.calls == 5 and restored.iterations == 5
            opt_c.load_state_dict(restored.state_dict())
        _train(opt_c, params_c, grads[5:])
        eager = _params()
        ref = Lamb(eager, capturable=True, implementation="foreach", **_fresh(cfg))
        _train(ref, eager, grads)
        _assert_same_bits(_snapshot(params_c, opt_c), _snapshot(eager, ref))


def test_load_state_dict_refills_the_device_counters_in_place():
    params = _params()
    opt = Lamb(params, capturable=True, use_ema=True)
    _train(opt, params, _grads(3))
    counter = opt.clock.calls
    sd = copy.deepcopy(opt.state_dict())
    _train(opt, params, _grads(2))
    opt.load_state_dict(sd)
    assert opt.clock.calls is counter and int(counter) == 3 and opt.iterations == 3


def test_switching_capturable_off_hands_the_count_back_to_the_host():
    params = _params()
    opt = Lamb(params, capturable=True)
    grads = _grads(4)
    _train(opt, params, grads[:1])
    for p, g in zip(params, grads[1]):
        p.grad.copy_(g)
    with Graph() as graph:
        opt.step()
    for p, g in zip(params, grads[2]):
        p.grad.copy_(g)
    graph.replay()
    opt.capturable = False
    assert opt.iterations == 3  # the device's count, before the next step hands it back
    _train(opt, params, grads[3:])
    assert not opt.clock.on_device and opt.clock.calls == 4 and opt.iterations == 4
    eager = _params()  # the step after the switch starts from the replayed count (bias correction of update 4)
    ref = Lamb(eager, capturable=True)
    _train(ref, eager, grads[:3])
    ref.capturable = False
    _train(ref, eager, grads[3:])
    _assert_same_bits(_snapshot(params, opt), _snapshot(eager, ref))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("lr", [torch.tensor([0.01, 0.02]), torch.tensor(1), torch.tensor(0.01, requires_grad=True)],
                         ids=["two-element", "integer", "requires_grad"])
def test_a_bad_tensor_learning_rate_raises_before_any_change(lr):
    with pytest.raises(ValueError, match=r"Tensor lr must be 1-element: .*floating-point tensor"):
        Lamb([{"params": _params(), "lr": lr}], capturable=True)
    params = _params()
    opt = Lamb(params, capturable=True, weight_decay=0.1)
    _train(opt, params, _grads(1))
    before = _snapshot(params, opt)
    opt.param_groups[0]["lr"] = lr
    for p, g in zip(params, _grads(2)[1]):
        p.grad.copy_(g)
    with pytest.raises(ValueError, match="param group 0"):
        opt.step()
    _assert_same_bits(_snapshot(params, opt), before)
    assert opt.iterations == 1 and int(opt.clock.calls) == 1


def test_the_constructor_takes_a_tensor_learning_rate_under_capturable():
    """``lr=tensor`` is every group's default (one tensor, as torch shares it); a state dict round trip keeps the
    live tensor (a captured graph reads it) and loads the saved value into it."""
    lr = torch.tensor(0.02)
    params = _params()
    opt = Lamb([{"params": params[:1]}, {"params": params[1:], "lr": 0.01}], lr=lr, capturable=True)
    assert opt.param_groups[0]["lr"] is lr and opt.param_groups[1]["lr"] == 0.01
    _train(opt, params, _grads(2))
    sd = copy.deepcopy(opt.state_dict())
    lr.fill_(0.5)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        Lamb(_params(), lr=torch.tensor([0.02, 0.01]), capturable=True)


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_a_one_element_tensor_learning_rate_of_any_shape_is_read_in_place(shape):
    """torch takes a tensor lr of any one-element shape; a scheduler's in-place write reaches the step."""
    results = []
    for lr in (torch.tensor(0.02), torch.tensor(0.02).reshape(shape)):
        params = _params()
        opt = Lamb(params, lr=lr, capturable=True, weight_decay=0.1)
        _train(opt, params, _grads(2))
        lr.fill_(0.005)
        _train(opt, params, _grads(2))
        assert opt.param_groups[0]["lr"] is lr
        results.append(_snapshot(params, opt))
    _assert_same_bits(results[1], results[0])


def test_parameters_on_two_devices_raise_before_any_change():
    """The counters live on one device: a layout over two (here cpu and meta) is refused, nothing changed."""
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))]
    opt = Lamb(params, capturable=True)
    for p in params:
        p.grad = torch.ones_like(p)
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="one device"):
        opt.step()
    assert torch.equal(params[0], before) and not opt.clock.on_device and opt.clock.calls == 0


def test_a_tensor_learning_rate_without_capturable_is_read_on_the_host():
    """Without ``capturable`` a tensor lr is a number, as before (it becomes a float)."""
    opt = Lamb([{"params": _params(), "lr": torch.tensor(0.01)}])
    assert isinstance(opt.param_groups[0]["lr"], float)


# ------------------------------------------------------------------ schedules on a tensor step


SCHEDULES = [
    ExponentialDecay(0.1, 3, 0.7), ExponentialDecay(0.1, 3, 0.7, staircase=True),
    PiecewiseConstantDecay([3, 7.5], [0.1, 0.05, 0.01]), PolynomialDecay(0.1, 7, 0.001, power=0.5),
    PolynomialDecay(0.1, 7, 0.001, power=2.0, cycle=True), InverseTimeDecay(0.1, 4, 0.5),
    InverseTimeDecay(0.1, 4, 0.5, staircase=True), CosineDecay(0.1, 20, alpha=0.1),
    CosineDecay(0.0, 20, warmup_target=0.1, warmup_steps=5), CosineDecay(0.01, 20, warmup_target=0.1),
    CosineDecayRestarts(0.1, 5), CosineDecayRestarts(0.1, 5, t_mul=1.0, m_mul=0.5),
    CosineDecayRestarts(0.1, 3, t_mul=1.5, m_mul=0.8, alpha=0.05),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_a_schedule_on_a_tensor_step_is_its_float_value(schedule):
    """The float64 torch formula gives the host's double (so the same float32 learning rate), step by step."""
    assert takes_tensor_steps(schedule)
    steps = range(80)
    host = [schedule(step) for step in steps]
    device = torch.stack([schedule(torch.tensor(step)) for step in steps])
    assert device.dtype == torch.float64
    assert [f32(x) for x in host] == device.float().tolist()
    assert host == pytest.approx(device.tolist(), rel=1e-15, abs=0)


def test_only_schedules_that_say_so_take_tensor_steps():
    class Custom(LearningRateSchedule):
        def __call__(self, step):
            return 0.1 / (1 + step)

    class Subclass(CosineDecay):  # inherits the built-in __call__
        pass

    class Overriding(CosineDecay):  # its own __call__: unknown until it says so
        def __call__(self, step):
            return 0.01

    class Declared(Custom):
        tensor_steps = True

        def __call__(self, step):
            return 0.1 / (1 + step)

    assert not takes_tensor_steps(Custom()) and not takes_tensor_steps(Overriding(0.1, 2))
    assert takes_tensor_steps(Subclass(0.1, 2)) and takes_tensor_steps(Declared())
    assert not takes_tensor_steps(lambda step: 0.1) and not takes_tensor_steps(0.1)


def test_a_host_schedule_is_evaluated_on_the_host_each_call():
    """A schedule that only runs on the host (or a plain callable) still gives the eager step its value each call
    (a captured graph freezes it: documented)."""
    def host(step: int) -> float:
        return 0.02 / (1 + step)

    got, _ = _run({"learning_rate": host, "weight_decay": 0.1}, "foreach", capturable=True)
    want, _ = _run({"learning_rate": host, "weight_decay": 0.1}, "foreach", capturable=False, wrap=no_host_reads)
    _assert_same_bits(got, want)
