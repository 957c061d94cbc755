"""The gradient scan: one C++ pass that checks every gradient for the CPU kernel and reads its pointer.

It must serve the common case (every step after the first, counted by ``grad_scan.status()``) with the bits of
the ordinary path, which reads and checks the gradients in Python; and it must hand everything else to that
path (stride-0, strided, converted or missing gradients, parameters given new storage or resized in place).
A check the scan missed would make the kernel read or write past a buffer, so those cases run in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torch_lamb import Lamb
from torch_lamb.backends import grad_scan

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def scan_built() -> None:
    status = grad_scan.wait(timeout=600)
    if not status.available:
        pytest.skip(f"the gradient scan cannot be built here: {status.reason}")


@pytest.fixture(autouse=True)
def scan_enabled_after() -> None:
    yield
    grad_scan.set_enabled(True)


def _train(scan: bool, shapes: list[tuple[int, ...]], steps: int = 5, dtype: torch.dtype = torch.float32,
           groups: bool = False, inf_at: int | None = None, **cfg) -> tuple[list[torch.Tensor], int]:
    """Parameters and state after ``steps`` steps with the scan on or off; and how many steps it served."""
    grad_scan.set_enabled(scan)
    before = grad_scan.status().passed
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    given = [{"params": params[::2]}, {"params": params[1::2], "lr": 0.003}] if groups else params
    opt = Lamb(given, lr=0.01, weight_decay=0.01, **cfg)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        if step == inf_at:
            params[1].grad[0] = float("inf")
        opt.step()
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in params] + state, grad_scan.status().passed - before


SHAPES = [(3, 4), (5,), (7, 2), (1,), (300,), (2, 3, 5)]
CONFIGS = {
    "plain": {},
    "clipnorm": {"clipnorm": 0.1},
    "global_clipnorm": {"global_clipnorm": 0.1},
    "clipvalue": {"clipvalue": 0.01},
    "ema_overwrite": {"use_ema": True, "ema_overwrite_frequency": 2},
    "accumulation": {"gradient_accumulation_steps": 2},
    "skip_nonfinite": {"skip_nonfinite": True, "inf_at": 2},
    "loss_scale": {"loss_scale_factor": 8.0},
    "two_groups": {"groups": True, "clipnorm": 0.5},
    "bf16_masters": {"dtype": torch.bfloat16, "master_weights": True},
    "bf16": {"dtype": torch.bfloat16},
    "adaptive_bounds": {"weight_decay_mode": "adaptive", "max_trust_ratio": 1.0},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_scan_serves_every_step_after_the_first_with_the_ordinary_bits(scan_built: None, name: str) -> None:
    cfg = dict(CONFIGS[name])
    got, served = _train(True, SHAPES, **cfg)
    want, unserved = _train(False, SHAPES, **cfg)
    assert served == 4 and unserved == 0  # the first step builds the layout through the ordinary path
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_disabled_scan_serves_nothing_and_says_why(scan_built: None) -> None:
    grad_scan.set_enabled(False)
    assert grad_scan.scanner() is None
    status = grad_scan.status()
    assert not status.available and "disabled" in status.reason


def test_grad_scaler_hand_off_takes_the_scan_with_the_ordinary_bits(scan_built: None) -> None:
    def run(scan: bool) -> tuple[list[torch.Tensor], int]:
        grad_scan.set_enabled(scan)
        before = grad_scan.status().passed
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = Lamb(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=1000.0, growth_factor=3.0, backoff_factor=0.25,
                                      growth_interval=1)
        for step in range(5):
            x = torch.randn(4, 6)
            loss = model(x).pow(2).sum() * (float("inf") if step == 2 else 1.0)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return [p.detach().clone() for p in model.parameters()], grad_scan.status().passed - before

    (got, served), (want, _) = run(True), run(False)
    assert served >= 3  # every step after the first, but the one GradScaler skips
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


_DECLINED = textwrap.dedent(
    """
    import sys
    import torch
    from torch_lamb import Lamb
    from torch_lamb.backends import grad_scan

    assert grad_scan.wait(timeout=600).available
    big = 1 << 20  # a misread would run far past any buffer

    def run(scan, odd):
        grad_scan.set_enabled(scan)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(big)), torch.nn.Parameter(torch.randn(6, 5)),
                  torch.nn.Parameter(torch.randn(5))]
        opt = Lamb(params, lr=0.05, weight_decay=0.1, clipnorm=0.5)
        out = []
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape)
            if step == 2:
                try:
                    odd(params)
                except Exception as err:  # an odd input that torch itself refuses is not a case
                    raise SystemExit(f"setup failed: {err}")
            declined = grad_scan.status().declined
            try:
                opt.step()
                out.append("ok")
            except Exception as err:
                out.append(f"{type(err).__name__}: {str(err)[:60]}")
            if step == 2 and scan and grad_scan.status().declined == declined and out[-1] == "ok":
                out.append("served")
        return out, [p.detach().clone() for p in params]

    def stride0(ps): ps[0].grad = torch.tensor(0.25).expand(big)
    def transposed(ps): ps[1].grad = torch.randn(5, 6).t()
    def every_other(ps): ps[2].grad = torch.randn(10)[::2]
    def other_dtype(ps):
        ps[1].grad_dtype = None
        ps[1].grad = torch.randn(6, 5, dtype=torch.float64)
    def dtype_swapped_in(ps): ps[1].grad.data = torch.randn(6, 5, dtype=torch.bfloat16)
    def missing(ps): ps[1].grad = None
    def new_storage(ps): ps[0].data = ps[0].data.clone()
    def shrunk(ps):
        ps[0].data = ps[0].data[:10]
        ps[0].grad = torch.randn(10)
    def reshaped(ps):
        ps[1].data = ps[1].data.view(5, 6)
        ps[1].grad = torch.randn(5, 6)
    def sparse(ps): ps[2].grad = torch.randn(5).to_sparse()
    def offset_view(ps): ps[2].grad = torch.randn(8)[3:]  # packed, at an offset: taken as it is

    for name in sys.argv[1:]:
        print(name, flush=True)  # a crash names the case it was in
        case = globals()[name]
        (log_on, on), (log_off, off) = run(True, case), run(False, case)
        assert [x for x in log_on if x != "served"] == log_off, (name, log_on, log_off)
        assert ("served" in log_on) == (case is offset_view), (name, log_on)
        assert all(torch.equal(a, b) for a, b in zip(on, off)), f"{name}: different numbers"
        print(name, "same", log_off, flush=True)
    """
)
DECLINED = ["stride0", "transposed", "every_other", "other_dtype", "dtype_swapped_in", "missing", "new_storage",
            "shrunk", "reshaped", "sparse", "offset_view"]


def test_scan_hands_what_it_does_not_take_to_the_ordinary_path(scan_built: None) -> None:
    """Each odd gradient or parameter at call 3: the same log (steps, or the same error) and bits with the scan
    on and off, and only the packed gradient at an offset served by the scan (one process for all the cases)."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", _DECLINED, *DECLINED], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    for name in DECLINED:
        assert f"{name} same" in result.stdout, result.stdout
    assert """shrunk same ['ok', 'ok', "ValueError: State 'momentum' of parameter '0.0'""" in result.stdout


def test_a_resized_parameter_is_refused_by_name_on_both_paths(scan_built: None) -> None:
    """A parameter shrunk in place keeps its data pointer: the layout once reused it, and the kernel read its
    old size from the new, smaller gradient. Both paths now refuse it before anything changes."""
    for scan in (True, False):
        grad_scan.set_enabled(scan)
        params = [torch.nn.Parameter(torch.randn(1000)) for _ in range(2)]
        opt = Lamb(params, lr=0.01)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        opt.step()
        params[0].data = params[0].data[:10]
        params[0].grad = torch.randn(10)
        before = [p.detach().clone() for p in params]
        with pytest.raises(ValueError, match=r"State 'momentum' of parameter '0.0' has shape \(1000,\)"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, params))


_SLOW_COMPILER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from torch_lamb import Lamb
    from torch_lamb.backends import grad_scan

    params = [torch.nn.Parameter(torch.randn(50)) for _ in range(3)]
    opt = Lamb(params, lr=0.01)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    print("during:", grad_scan.status().reason)
    status = grad_scan.wait(timeout=60)
    print("after:", status.reason, status.passed)
    """
)


def test_the_step_never_waits_for_the_build_and_a_failed_build_leaves_the_ordinary_path(tmp_path: Path) -> None:
    compiler = tmp_path / "slow-c++"
    compiler.write_text("#!/bin/sh\nsleep 1\necho 'no headers here' >&2\nexit 1\n")
    compiler.chmod(0o755)
    env = {**os.environ, "CXX": str(compiler), "TORCH_LAMB_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", _SLOW_COMPILER], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "during: building" in result.stdout
    assert "failed (exit status 1): no headers here" in result.stdout and result.stdout.rstrip().endswith(" 0")


def test_a_process_that_exits_during_the_build_stops_its_compiler(tmp_path: Path) -> None:
    """A short run must not leave a compiler working on after it (nor a half-written file in the cache)."""
    compiler = tmp_path / "slow-c++"
    compiler.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'pid'}\nsleep 60\nexit 1\n")
    compiler.chmod(0o755)
    script = _SLOW_COMPILER.split("status = grad_scan.wait")[0] + "time.sleep(0.3)\n"
    env = {**os.environ, "CXX": str(compiler), "TORCH_LAMB_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "during: building" in result.stdout, result.stdout + result.stderr[-2000:]
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not list((tmp_path / "cache").glob("tmp*")), list((tmp_path / "cache").iterdir())  # mkstemp names
