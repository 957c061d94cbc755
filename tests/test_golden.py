"""Golden numbers: Keras's own Lamb tests and the fixtures of keras-lamb-semantics.md (§13)."""

from __future__ import annotations

import math

import impls
import pytest
import torch

import torch_lamb
from torch_lamb import Lamb


def _param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def _assert_exact(t: torch.Tensor, expected, rtol: float = 0.0, atol: float = 0.0) -> None:
    torch.testing.assert_close(t.detach(), torch.tensor(expected, dtype=torch.float32), rtol=rtol, atol=atol)


def test_single_step(implementation):
    w = _param([1.0, 2.0, 3.0, 4.0])
    opt = Lamb([w], learning_rate=0.5, implementation=implementation)
    w.grad = torch.tensor([1.0, 6.0, 7.0, 2.0])
    opt.step()
    _assert_exact(w, [-0.369306326, 0.630693436, 1.63069355, 2.63069344], rtol=impls.golden_rtol(implementation))
    _assert_exact(opt.state[w]["momentum"], [0.1, 0.6, 0.7, 0.2], rtol=1e-7)
    _assert_exact(opt.state[w]["velocity"], [0.001, 0.036, 0.049, 0.004], rtol=1e-6)


def test_weight_decay_with_exclusions():
    var1, var2, var3 = _param(2.0), _param(2.0), _param(2.0)
    for p in (var1, var2, var3):
        p.grad = torch.tensor(0.0)
    opt1 = Lamb([var1], learning_rate=1.0, weight_decay=0.004)
    opt1.step()
    _assert_exact(var1, 1.992, rtol=1e-7)
    opt2 = Lamb([("var1", var1), ("exclude", var2)], learning_rate=1.0, weight_decay=0.004)
    opt2.exclude_from_weight_decay(var_names=["exclude"])
    opt2.step()
    opt3 = Lamb([var1, var3], learning_rate=1.0, weight_decay=0.004)
    opt3.exclude_from_weight_decay(var_list=[var3])
    opt3.step()
    assert var1.item() == pytest.approx(1.9760959, abs=1e-6)
    assert var1.item() == 1.9760957956314087  # the exact torch float32 value
    assert var2.item() == 2.0 and var3.item() == 2.0


def test_correctness_with_golden(implementation):
    x = _param([1.0] * 10)
    opt = Lamb([x], implementation=implementation)
    x.grad = torch.full((10,), 0.01)
    opt.step()
    _assert_exact(x, [0.999000013] * 10, rtol=1e-8)
    exact = [
        [0.997943759, 0.997983575, 0.997997463, 0.998004496, 0.998008788,
         0.998011649, 0.998013675, 0.998015225, 0.998016417, 0.998017371],
        [0.996918261, 0.99697715, 0.996997714, 0.997008085, 0.997014463,
         0.997018695, 0.997021675, 0.997024, 0.997025728, 0.997027159],
        [0.995903909, 0.995974839, 0.995999575, 0.996012092, 0.996019781,
         0.996024847, 0.996028483, 0.996031225, 0.99603337, 0.996035039],
        [0.994895637, 0.99497503, 0.995002747, 0.995016813, 0.995025396,
         0.995031059, 0.995035172, 0.995038211, 0.995040655, 0.995042503],
        [0.993891358, 0.993977189, 0.994007111, 0.99402231, 0.994031608,
         0.994037747, 0.994042158, 0.994045496, 0.994048119, 0.994050086],
    ]
    keras_golden = [0.999, 0.9982, 0.9974, 0.9965, 0.9955]
    for row, coarse in zip(exact, keras_golden):
        torch.testing.assert_close(x.detach(), torch.full((10,), coarse), rtol=5e-4, atol=5e-4)
        x.grad = torch.arange(0.1, 1.1, 0.1)
        opt.step()
        _assert_exact(x, row, rtol=2e-8)


def test_clipnorm_and_clipvalue_goldens():
    for kwargs, expected in (
        ({"clipnorm": 1.0}, [math.sqrt(2) / 2] * 2),
        ({"clipvalue": 1.0}, [1.0, 1.0]),
        ({"global_clipnorm": 1.0}, [0.4472136, 0.8944272]),
    ):
        grad = [50.0, 100.0] if "global_clipnorm" in kwargs else [100.0, 100.0]
        (clipped,) = _clip(*next(iter(kwargs.items())), [torch.tensor(grad)])
        torch.testing.assert_close(clipped, torch.tensor(expected), rtol=1e-6, atol=0)


def _clip(kind: str, value: float, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Keras's `_clip_gradients` with the formulas every backend uses (torch_lamb.clipping)."""
    from torch_lamb import clipping
    from torch_lamb.distributed import local_norms

    if kind == "clipvalue":
        return clipping.clip_by_value(grads, value)
    if kind == "clipnorm":
        return clipping.clip_by_norm(grads, local_norms(grads), value)
    factor = clipping.global_clip_factor(clipping.global_norm([local_norms(grads)]), value)
    return clipping.clip_by_global_norm(grads, factor)


def test_fixture_c_global_clipnorm_and_decay():
    w0, w1 = _param([[0.5, -1.0], [1.5, 2.0]]), _param([0.0, 0.0])
    opt = Lamb([("kernel", w0), ("bias", w1)], learning_rate=0.01, weight_decay=0.1, global_clipnorm=1.0)
    grads = [
        ([[0.3, -0.2], [0.1, 0.4]], [0.5, -0.5]),
        ([[-0.1, 0.2], [0.3, -0.4]], [0.05, 0.02]),
        ([[2.0, 1.0], [-1.0, 0.5]], [0.0, 0.0]),
    ]
    expected = [
        ([0.48582062, -0.98532063, 1.4848206, 1.9843206], [-0.0099999309, 0.0099999309]),
        ([0.47453934, -0.98575497, 1.4585797, 1.9837561], [-0.010096856, 0.010082272]),
        ([0.45318457, -1.0008527, 1.4589325, 1.9766178], [-0.010194643, 0.010165358]),
    ]
    for (g0, g1), (e0, e1) in zip(grads, expected):
        w0.grad, w1.grad = torch.tensor(g0), torch.tensor(g1)
        opt.step()
        _assert_exact(w0.flatten(), e0, rtol=2e-7)
        _assert_exact(w1, e1, rtol=2e-7)


def test_fixture_d_accumulation_and_ema():
    w = _param([1.0, -2.0, 0.5])
    opt = Lamb(
        [w], learning_rate=0.1, gradient_accumulation_steps=2, use_ema=True, ema_momentum=0.9,
        ema_overwrite_frequency=2,
    )
    grads = [
        [0.2, 0.4, -0.6], [0.4, 0.0, -0.2], [1.0, -1.0, 1.0], [-0.5, 0.5, 0.25], [0.1, 0.1, 0.1], [0.3, -0.3, 0.0],
    ]
    after_2 = [0.86771244, -2.1322875, 0.63228762]
    after_4 = [0.84493834, -2.1285484, 0.62618065]
    expected_w = [[1.0, -2.0, 0.5], after_2, after_2, after_4, after_4, [0.62514436, -2.0583920, 0.57017982]]
    for call, (g, ew) in enumerate(zip(grads, expected_w), start=1):
        w.grad = torch.tensor(g)
        opt.step()
        assert opt.clock.calls == call and opt.iterations == call // 2
        _assert_exact(w, ew, rtol=2e-7)
        if call < 6:
            _assert_exact(opt.state[w]["average"], ew, rtol=2e-7)
        if call == 3:
            _assert_exact(opt.state[w]["gradient_accumulator"], [1.0, -1.0, 1.0])
    ema = [0.82295895, -2.1215327, 0.62058055]
    _assert_exact(opt.state[w]["average"], ema, rtol=2e-7)
    opt.finalize_variable_values([w])
    _assert_exact(w, ema, rtol=2e-7)


def test_fixture_e_schedule_clipnorm_loss_scale_decay():
    w = _param([0.3, -0.7, 1.1, 0.0])
    opt = Lamb(
        [w], learning_rate=torch_lamb.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5), clipnorm=0.5,
        loss_scale_factor=8.0, weight_decay=0.05,
    )
    grads = [[8.0, -4.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [-16.0, 8.0, 0.0, 4.0]]
    expected = [
        [0.22164199, -0.61964202, 1.0176421, 0.0],
        [0.17327455, -0.60560799, 0.95793611, -0.041700654],
        [0.17139776, -0.61830646, 0.91832113, -0.082639873],
    ]
    for step, (g, e) in enumerate(zip(grads, expected)):
        w.grad = torch.tensor(g)
        opt.step()
        _assert_exact(w, e, rtol=5e-7, atol=1e-9)
        if step == 0:
            _assert_exact(opt.state[w]["momentum"], [0.043643575, -0.021821788, 0.010910894, 0.0], rtol=2e-7)
    assert opt.scale_loss(torch.tensor(1.0)).item() == 8.0


def test_iterations_count_every_call():
    w = _param([1.0])
    opt = Lamb([w])
    assert opt.iterations == 0
    for expected in (1, 2):
        w.grad = torch.tensor([0.5])
        opt.step()
        assert opt.iterations == expected


def test_accumulation_counters_and_mean():
    """optimizer_test.test_gradient_accumulation: N=3, unchanged for 2 calls, then the mean."""
    w = _param([1.0, 2.0])
    opt = Lamb([w], learning_rate=0.1, gradient_accumulation_steps=3)
    w_single = _param([1.0, 2.0])
    single = Lamb([w_single], learning_rate=0.1)
    grads = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]), torch.tensor([4.0, -1.0])]
    for i, g in enumerate(grads[:2]):
        w.grad = g
        opt.step()
        _assert_exact(w, [1.0, 2.0])
        _assert_exact(opt.state[w]["gradient_accumulator"], [1.0 * (i + 1), 1.0 + 3.0 * i])
    w.grad = grads[2]
    opt.step()
    assert opt.clock.calls == 3 and opt.iterations == 1
    _assert_exact(opt.state[w]["gradient_accumulator"], [0.0, 0.0])
    w_single.grad = (grads[2] + (grads[0] + grads[1])) / 3
    single.step()
    torch.testing.assert_close(w.detach(), w_single.detach(), rtol=0, atol=0)
