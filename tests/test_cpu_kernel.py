"""The CPU kernel (the ``fused`` backend) against the per-tensor reference, every feature on; its loader."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch

from torch_lamb import Lamb, kernel_status
from torch_lamb.backends import cpu_kernel, kernel_build
from torch_lamb.functional import lamb_reference, lamb_scalars

pytestmark = pytest.mark.skipif(not kernel_status().available, reason="no C compiler for the CPU kernel")


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """A kernel loader that starts from nothing, with its cache in ``tmp_path`` (restored afterwards)."""
    monkeypatch.setenv("TORCH_LAMB_CACHE_DIR", str(tmp_path))
    kernel_build.reset()
    yield tmp_path
    monkeypatch.undo()
    kernel_build.reset()


def _kernel_update(ps, gs, ms, vs, sc, *, decay_mask, adapt_mask=None, reduce=None):
    return cpu_kernel.KernelBucket(ms, vs, decay_mask=decay_mask, adapt_mask=adapt_mask).update(
        ps, gs, sc, reduce=reduce)

SHAPES = [(300, 7), (0,), (5,), (40_000,), (1,), (16_385,)]


def _bucket(seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g) for s in SHAPES]
    gs = [torch.randn(s, generator=g) * 1e-2 for s in SHAPES]
    ms = [torch.randn(s, generator=g) * 1e-2 for s in SHAPES]
    vs = [torch.rand(s, generator=g) * 1e-4 for s in SHAPES]
    return [ps, gs, ms, vs]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # rtol 1e-6, with an absolute floor at 1e-6 of the tensor's scale for elementwise cancellation
    atol = 1e-6 * float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("mode", ["decoupled", "adaptive"])
@pytest.mark.parametrize("bounds", [(None, None), (0.5, 2.0)])
def test_fused_matches_reference(mode: str, bounds: tuple) -> None:
    sc = lamb_scalars(lr=1e-2, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.01, step=3,
                      weight_decay_mode=mode, min_trust_ratio=bounds[0], max_trust_ratio=bounds[1])
    dm = [True, False, True, False, True, True]
    am = [True, True, False, True, True, False]
    calls = []

    def reduce(x: torch.Tensor) -> torch.Tensor:  # a stand-in collective: two equal shards
        calls.append(x.shape)
        return 2 * x

    a, b = _bucket(), _bucket()
    s1 = _kernel_update(*a, sc, decay_mask=dm, adapt_mask=am, reduce=reduce)
    s2 = lamb_reference(*b, sc, decay_mask=dm, adapt_mask=am, reduce=reduce)
    assert calls == [torch.Size([2 * len(SHAPES)])] + [torch.Size([2])] * len(SHAPES)
    for xs, ys in zip(a, b, strict=True):
        for x, y in zip(xs, ys, strict=True):
            _close(x, y)
    for x, y in zip((s1.weight_norm, s1.update_norm, s1.trust_ratio),
                    (s2.weight_norm, s2.update_norm, s2.trust_ratio), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
    assert s1.trust_ratio[2] == 1 and s1.trust_ratio[5] == 1  # adapt mask
    assert not torch.equal(a[0][0], _bucket()[0][0])  # something moved


def test_no_decay_and_zero_norms() -> None:
    sc = lamb_scalars(lr=1e-3, beta_1=0.9, beta_2=0.99, epsilon=1e-6, weight_decay=None, step=1)
    a, b = _bucket(1), _bucket(1)
    a[0][2].zero_()
    b[0][2].zero_()  # ||w|| = 0 -> ratio 1
    s1 = _kernel_update(*a, sc, decay_mask=[False] * len(SHAPES))
    s2 = lamb_reference(*b, sc, decay_mask=[False] * len(SHAPES))
    assert s1.trust_ratio[2] == 1
    for xs, ys in zip(a, b, strict=True):
        for x, y in zip(xs, ys, strict=True):
            _close(x, y)
    torch.testing.assert_close(s1.trust_ratio, s2.trust_ratio, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["float64", "non_contiguous", "capturable"])
def test_where_the_kernel_does_not_apply_auto_and_fused_take_foreach(case) -> None:
    """torch's fused=True takes float64, strided and capturable CPU tensors; so do auto and fused here, through
    foreach, with foreach's numbers to the bit."""
    def params():
        torch.manual_seed(0)
        if case == "float64":
            return [torch.nn.Parameter(torch.randn(30, 7, dtype=torch.float64))]
        if case == "non_contiguous":
            return [torch.nn.Parameter(torch.randn(7, 30).t())]
        return [torch.nn.Parameter(torch.randn(30, 7))]

    results = {}
    for impl in ("auto", "fused", "foreach"):
        ps = params()
        opt = Lamb(ps, learning_rate=1e-2, weight_decay=0.1, implementation=impl, capturable=case == "capturable")
        for _ in range(2):
            ps[0].grad = torch.ones_like(ps[0]) * 1e-2
            opt.step()
        results[impl] = ps[0].detach()
    assert not torch.equal(results["foreach"], params()[0])
    assert torch.equal(results["auto"], results["foreach"])
    assert torch.equal(results["fused"], results["foreach"])


def test_optimizer_default_is_fused_and_matches_reference() -> None:
    torch.manual_seed(0)
    base = [torch.randn(37, 11), torch.randn(20_000), torch.randn(3)]
    grads = [[torch.randn_like(p) * 1e-2 for p in base] for _ in range(4)]
    results = {}
    for impl in (None, "reference"):
        ps = [torch.nn.Parameter(p.clone()) for p in base]
        opt = Lamb(ps, learning_rate=1e-2, weight_decay=0.01, global_clipnorm=1.0, use_ema=True,
                   loss_scale_factor=4.0, gradient_accumulation_steps=2, implementation=impl)
        assert opt.implementation == (impl or "auto")
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            opt.step()
        results[impl] = [p.detach() for p in ps] + [opt.state[p]["average"] for p in ps]
    for x, y in zip(results[None], results["reference"], strict=True):
        _close(x, y)


def test_cache_is_reused(fresh_kernel) -> None:
    assert kernel_build.load_kernel() is not None
    built = list(fresh_kernel.glob("lamb_kernel_*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    kernel_build.reset()
    assert kernel_build.load_kernel() is not None
    assert built[0].stat().st_mtime_ns == mtime
    assert sorted(p.name for p in fresh_kernel.iterdir()) == [built[0].name, built[0].name + ".sha256"]


def test_no_compiler_warns_once_takes_foreach_and_fused_raises(fresh_kernel, monkeypatch) -> None:
    monkeypatch.setattr(kernel_build, "compiler", lambda: None)
    status = kernel_status()
    assert not status.available and "compiler" in status.reason and "TORCH_LAMB_CACHE_DIR" in str(status)
    from torch_lamb.backends import reset_fallbacks

    reset_fallbacks()
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for impl in ("auto", "auto", "foreach"):
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(50))
            opt = Lamb([p], weight_decay=0.1, implementation=impl)
            p.grad = torch.ones_like(p)
            opt.step()
            results.append(p.detach())
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C compiler" in messages[0] and "$CC" in messages[0]
    assert torch.equal(results[0], results[2])
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="unavailable"):
        Lamb([p], implementation="fused").step()
    assert list(fresh_kernel.iterdir()) == []


# ------------------------------------------------------------------ the optimizer on the kernel, every feature

PIPELINE_CONFIGS = {
    "decay": {"weight_decay": 0.05},
    "loss_scale": {"loss_scale_factor": 8.0},
    "clipnorm": {"clipnorm": 0.05},
    "global_clipnorm": {"global_clipnorm": 0.1},
    "clipvalue": {"clipvalue": 4e-3},
    "ema_overwrite": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3},
    "accumulation": {"gradient_accumulation_steps": 3},
    "everything": {"weight_decay": 0.05, "global_clipnorm": 0.1, "use_ema": True, "ema_momentum": 0.9,
                   "loss_scale_factor": 4.0, "gradient_accumulation_steps": 2},
    "everything_clipvalue": {"weight_decay": 0.05, "clipvalue": 4e-3, "use_ema": True, "loss_scale_factor": 4.0,
                             "gradient_accumulation_steps": 3, "ema_overwrite_frequency": 2},
    "adaptive_bounds_clipnorm": {"weight_decay_mode": "adaptive", "weight_decay": 0.1, "min_trust_ratio": 0.5,
                                 "max_trust_ratio": 2.0, "clipnorm": 0.05, "gradient_accumulation_steps": 2},
    "large_lerp_weights": {"beta_1": 0.3, "beta_2": 0.6, "use_ema": True, "ema_momentum": 0.3},
}
OPT_SHAPES = [(300, 7), (0,), (5,), (40_000,), (1,), (16_385,), (64, 64)]


def _spy_kernel(monkeypatch) -> list[str]:
    """The kernel entry points that run (a spy on the backend's one call site)."""
    ran: list[str] = []
    real_run = cpu_kernel.call_kernel
    monkeypatch.setattr(cpu_kernel, "call_kernel",
                        lambda name, b, kernel=None: (ran.append(name), real_run(name, b, kernel)))
    return ran


def _run_optimizer(impl: str, config: dict, calls: int = 8) -> tuple[list[torch.Tensor], Lamb]:
    torch.manual_seed(0)
    named = [(f"layer{i}.{'bias' if len(s) == 1 else 'weight'}", torch.nn.Parameter(torch.randn(s)))
             for i, s in enumerate(OPT_SHAPES)]
    opt = Lamb(named, learning_rate=1e-2, implementation=impl, **config)
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.exclude_from_layer_adaptation(var_names=["layer6"])
    params = [p for _, p in named]
    gen = torch.Generator().manual_seed(1)
    for call in range(calls):
        for i, p in enumerate(params):  # layer 2's gradient comes and goes
            p.grad = None if (i == 2 and call % 3 == 1) else torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    return [p.detach() for p in params] + [t for p in params for t in opt.state[p].values()], opt


@pytest.mark.parametrize("segment_bytes", [1 << 16, cpu_kernel.SEGMENT_BYTES], ids=["many_segments", "default"])
@pytest.mark.parametrize("config", sorted(PIPELINE_CONFIGS))
def test_every_feature_runs_in_the_kernel_and_matches_reference(config, segment_bytes, monkeypatch) -> None:
    monkeypatch.setattr(cpu_kernel, "SEGMENT_BYTES", segment_bytes)
    ran = _spy_kernel(monkeypatch)
    cfg = PIPELINE_CONFIGS[config]
    got, _ = _run_optimizer("fused", cfg)
    assert "lamb_fused" in ran
    assert ("lamb_accumulate" in ran) == ("gradient_accumulation_steps" in cfg)
    assert ("lamb_grad_sums" in ran) == ("clipnorm" in cfg or "global_clipnorm" in cfg)
    assert ("lamb_ema" in ran) == ("use_ema" in cfg)  # micro-steps, and the parameter without a gradient
    want, _ = _run_optimizer("reference", cfg)
    for x, y in zip(got, want, strict=True):
        _close(x, y)
    assert not torch.equal(got[0], _run_optimizer("reference", cfg, calls=0)[0][0])  # training moved it


def test_sharded_two_pass_path_equals_segmented_path() -> None:
    """pass1 -> reduce -> pass2 (ratios in torch) gives the bits of the segmented path (ratios in C)."""
    sc = lamb_scalars(lr=1e-2, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.01, step=3,
                      min_trust_ratio=0.1, max_trust_ratio=5.0)
    outs = []
    for reduce in (None, lambda x: x):
        ps, gs, ms, vs = _bucket(4)
        accs, avgs = [g.flip(-1) * 0.5 if g.dim() else g * 0.5 for g in gs], [p.clone() for p in ps]
        kb = cpu_kernel.KernelBucket(ms, vs, decay_mask=[True, False] * 3, adapt_mask=[True] * 5 + [False],
                                     accumulators=accs, averages=avgs)
        pipe = cpu_kernel.GradientPipeline(loss_scale=2.0, accumulation_steps=2, clipvalue=1e-2)
        stats = kb.update(ps, gs, sc, reduce=reduce, pipeline=pipe, ema_weight=0.25)
        outs.append([*ps, *ms, *vs, *accs, *avgs, stats.trust_ratio, stats.weight_norm, stats.update_norm])
    for x, y in zip(*outs, strict=True):
        assert torch.equal(x, y)
    assert all(not a.any() for a in outs[0][18:24])  # the accumulators were zeroed


def test_floor_stream_moves_bytes_without_changing_parameters() -> None:
    ps, gs, _, _ = _bucket(5)
    before = [p.clone() for p in ps]
    stream = cpu_kernel.floor_stream(ps, gs)
    for _ in range(3):
        stream()
    for p, b, g, m, v in zip(ps, before, gs, *stream.scratch, strict=True):
        assert torch.equal(p, b)
        torch.testing.assert_close(m, 3 * g)  # the momentums saw every gradient: pass 1 ran over all of it
        assert torch.equal(v, -m)
    assert not hasattr(kernel_build.load_kernel().lib, "lamb_stream")  # the floor stays out of production


def test_cache_is_per_cpu(fresh_kernel, monkeypatch) -> None:
    """A cache dir shared between machines (an NFS home) keeps one build per CPU model and features."""
    for cpu in ("cpu-a avx2", "cpu-b avx2 avx512f", "cpu-a avx2"):
        kernel_build.reset()
        monkeypatch.setattr(kernel_build, "cpu_identity", lambda cpu=cpu: cpu)
        assert kernel_build.load_kernel() is not None
    assert len(list(fresh_kernel.glob("lamb_kernel_*.so"))) == 2


# ------------------------------------------------------------------ bfloat16 / float16 parameters on the kernel

LOW_CONFIGS = {  # no norm-based clipping: with ratios fixed at 1 nothing depends on how a norm is summed
    "plain": {"weight_decay": 0.05},
    "everything": {"weight_decay": 0.05, "clipvalue": 4e-3, "use_ema": True, "ema_momentum": 0.9,
                   "loss_scale_factor": 4.0, "gradient_accumulation_steps": 2, "ema_overwrite_frequency": 3},
}
LOW_DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


def _run_low(impl: str, dtype: torch.dtype, master: bool, config: dict, calls: int = 7, adapt: bool = True):
    """Parameters and per-parameter state after ``calls`` steps on bfloat16/float16 parameters."""
    if dtype == torch.float16 and not kernel_status().float16:
        pytest.skip("this compiler has no _Float16: float16 stays on the foreach path")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in OPT_SHAPES]
    opt = Lamb(params, learning_rate=1e-2, implementation=impl, master_weights=master, **config)
    if not adapt:
        opt.exclude_from_layer_adaptation(var_list=params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(calls):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype)
        opt.step()
    return [p.detach() for p in params], [dict(opt.state[p]) for p in params]




def _run_rounding_f32(dtype: torch.dtype, master: bool, config: dict, calls: int = 7):
    """The same run with float32 parameters (started from the low-precision values) and the
    low-precision gradients widened; without master weights p is rounded to ``dtype`` after each step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype).float()) for s in OPT_SHAPES]
    opt = Lamb(params, learning_rate=1e-2, **config)
    opt.exclude_from_layer_adaptation(var_list=params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(calls):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype).float()
        opt.step()
        if not master:
            with torch.no_grad():
                for p in params:
                    p.copy_(p.to(dtype))
    return [p.detach() for p in params], [dict(opt.state[p]) for p in params]


@pytest.mark.parametrize("config", sorted(LOW_CONFIGS))
@pytest.mark.parametrize("master", [False, True], ids=["plain", "master_weights"])
@LOW_DTYPES
def test_low_precision_kernel_is_the_float32_kernel_plus_rounding(dtype, master, config, monkeypatch) -> None:
    """Bit for bit: widening, float32 math, rounding p (or the master's copy) once per step.

    (Without master weights the EMA follows the rounded p, which the float32 run cannot mirror; the
    next test covers it.)"""
    ran = _spy_kernel(monkeypatch)
    cfg = LOW_CONFIGS[config] if master else {k: v for k, v in LOW_CONFIGS[config].items() if "ema" not in k}
    got_params, got_state = _run_low("fused", dtype, master, cfg, adapt=False)
    assert ran.count("lamb_fused") == 7 // cfg.get("gradient_accumulation_steps", 1)
    want_params, want_state = _run_rounding_f32(dtype, master, cfg)
    for x, y in zip(got_params, want_params, strict=True):
        assert x.dtype == dtype and torch.equal(x, y.to(dtype))
    for got, want, y in zip(got_state, want_state, want_params, strict=True):
        assert set(got) == set(want) | ({"master_weight"} if master else set())
        for key, value in want.items():  # moments, averages, accumulators: float32
            assert torch.equal(got[key], value), key
        if master:  # the float32 master is the float32 run's parameter
            assert torch.equal(got["master_weight"], y)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master_weights"])
@LOW_DTYPES
def test_low_precision_kernel_with_trust_ratios_matches_foreach(dtype, master, monkeypatch) -> None:
    """With ratios on, the norms' summation order may flip a rounding of p by one step of its dtype."""
    ran = _spy_kernel(monkeypatch)
    config = {"weight_decay": 0.05, "global_clipnorm": 0.1, "use_ema": True}
    got_params, got_state = _run_low("fused", dtype, master, config, calls=1)
    assert "lamb_fused" in ran and "lamb_grad_sums" in ran
    want_params, want_state = _run_low("foreach", dtype, master, config, calls=1)
    ulp, tiny = (2.0 ** -7, 0.0) if dtype == torch.bfloat16 else (2.0 ** -10, 2.0 ** -23)  # fp16 subnormals
    for x, y in zip(got_params, want_params, strict=True):
        torch.testing.assert_close(x.float(), y.float(), rtol=ulp, atol=tiny)
    assert sum(int((x == y).sum()) for x, y in zip(got_params, want_params, strict=True)) >= 0.999 * sum(
        x.numel() for x in got_params)
    got = [t for st in got_state for t in st.values()]
    want = [t for st in want_state for t in st.values()]
    # float32 state: moments, average, master. torch's sqrt is not always correctly rounded and its
    # norms are float32 sums, so last bits differ; without master weights the average follows p, so it
    # may differ by the step of p's dtype where p rounded the other way.
    rtol = 1e-5 if master else ulp
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(y.abs().max()) if y.numel() else 0.0)


def test_skip_nonfinite_runs_in_the_kernel_on_the_cpu(monkeypatch) -> None:
    """On the CPU the finite check is read on the host, so the guarded step is the kernel's step."""
    ran = _spy_kernel(monkeypatch)
    got, opt = _run_optimizer("fused", {"skip_nonfinite": True, "weight_decay": 0.05, "use_ema": True})
    assert ran.count("lamb_fused") == 8 and int(opt.skipped_steps) == 0
    want, _ = _run_optimizer("fused", {"weight_decay": 0.05, "use_ema": True})
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch's (and so the kernel's) thread count for a block; the suite's single thread afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_three_threads_give_the_bits_of_one_in_every_single_pass(monkeypatch) -> None:
    """Accumulation, the EMA, the global clipping norm and the finite check are single passes whose blocks
    the threads share (contiguous shares, leftovers taken by whoever finishes first); with three threads on
    this machine's cores one is often descheduled, so shares get taken over. Tensors of one block and of
    many, fewer blocks than threads in a share: the bits must be those of one thread."""
    monkeypatch.setattr(cpu_kernel, "SEGMENT_BYTES", 1 << 18)
    monkeypatch.setattr(cpu_kernel, "MIN_PER_THREAD", 1 << 10)

    def train(threads: int) -> list[torch.Tensor]:
        with _threads(threads):
            g = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (5, 70_000, 16_384, 250_001, 3)]
            opt = Lamb(params, learning_rate=0.01, weight_decay=0.01, use_ema=True, global_clipnorm=0.5,
                       gradient_accumulation_steps=2, skip_nonfinite=True, implementation="fused")
            for _ in range(6):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            return [t.detach().clone() for p in params for t in (p, *opt.state[p].values()) if t.dim() > 0]

    one, three = train(1), train(3)
    assert len(one) == 5 * 5  # each parameter, its two moments, its accumulator and its average
    for a, b in zip(one, three, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("huge", [False, True], ids=["finite_sums", "overflowed_sums"])
def test_two_threads_give_the_bits_of_one_through_segments_slots_and_re_sums(monkeypatch, huge) -> None:
    """The suite runs one thread; here two share every segment (small segments, many of them), with per-expert
    slots along dim 0 and strided slots along dim 1, and (``huge``) sums that overflow float32 and are summed
    again by one thread: each thread forms the ratios itself, so the bits must not depend on the count."""
    monkeypatch.setattr(cpu_kernel, "SEGMENT_BYTES", 1 << 18)
    monkeypatch.setattr(cpu_kernel, "MIN_PER_THREAD", 1 << 10)

    def train(threads: int) -> list[torch.Tensor]:
        with _threads(threads):
            g = torch.Generator().manual_seed(0)
            scale = 1e30 if huge else 1.0
            bank = torch.nn.Parameter(torch.randn(8, 64, 96, generator=g) * scale)
            qkv = torch.nn.Parameter(torch.randn(96, 3 * 96, generator=g))
            dense = torch.nn.Parameter(torch.randn(300_000, generator=g))
            opt = Lamb([("bank", bank), ("qkv", qkv), ("dense", dense)], learning_rate=0.01, weight_decay=0.01,
                       use_ema=True, implementation="fused")
            opt.set_trust_ratio_slices([bank], dim=0)
            opt.set_trust_ratio_slices([qkv], dim=1, sizes=[96, 96, 96])
            opt.track_trust_ratios(True)
            for _ in range(3):
                for p in (bank, qkv, dense):
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            ratios = torch.stack([r.ratio for r in opt.last_trust_ratios().values()])
            return [bank.detach().clone(), qkv.detach().clone(), dense.detach().clone(), ratios]

    one, two = train(1), train(2)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    assert torch.isfinite(one[3]).all() and one[3].numel() == 8 + 3 + 1
