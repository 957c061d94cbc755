"""What used to crash the process or corrupt weights silently: each case runs in its own process.

A crash (SIGSEGV, SIGBUS, SIGABRT) fails the test instead of killing the run. Each script prints
"OK" after checking that the step was correct or raised a clear error before anything changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import impls
import pytest

from torch_lamb import kernel_status

pytestmark = pytest.mark.skipif(not kernel_status().available, reason="no C compiler for the CPU kernel")

PRELUDE = """
import torch, warnings
from torch_lamb import Lamb, kernel_status
torch.manual_seed(0)

def same(a, b):
    return torch.equal(a.detach(), b.detach())
"""


def run_case(body: str, cache: Path | None = None) -> str:
    env = dict(os.environ)
    if cache is not None:
        env["TORCH_LAMB_CACHE_DIR"] = str(cache)
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by a signal)\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().endswith("OK"), proc.stdout
    return proc.stdout


def test_resizing_a_parameter_that_has_a_master_raises_before_anything_changes() -> None:
    run_case("""
        p = torch.nn.Parameter(torch.randn(4096).bfloat16())
        opt = Lamb([p], master_weights=True)
        p.grad = torch.randn_like(p)
        opt.step()
        p.data = torch.randn(100).bfloat16()  # smaller: the master's element count must not reach it
        p.grad = torch.randn_like(p)
        before = {k: v.clone() for k, v in opt.state[p].items()}
        try:
            opt.step()
        except ValueError as err:
            assert "resized" in str(err) and "'0.0'" in str(err), err
        else:
            raise AssertionError("no error")
        assert all(same(v, before[k]) for k, v in opt.state[p].items()) and opt.iterations == 1
        del opt.state[p]  # the documented way out: the parameter starts afresh
        opt.step()
        assert torch.isfinite(p).all() and opt.state[p]["master_weight"].shape == p.shape
        print("OK")
    """)


def test_replacing_a_moments_storage_is_followed() -> None:
    run_case("""
        ps = [torch.nn.Parameter(torch.randn(50_000)) for _ in range(2)]
        ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt, opt_ref = Lamb(ps, weight_decay=0.1), Lamb(ref, weight_decay=0.1, implementation="reference")
        for step in range(3):
            for a, b in zip(ps, ref):
                a.grad = torch.full_like(a, 0.01 * (step + 1))
                b.grad = a.grad.clone()
            if step == 1:  # new storage behind the same state tensors (the old one is freed)
                for o, q in ((opt, ps[0]), (opt_ref, ref[0])):
                    o.state[q]["momentum"].data = o.state[q]["momentum"].detach().clone()
                    o.state[q]["velocity"].data = torch.zeros(50_000) + o.state[q]["velocity"]
            opt.step()
            opt_ref.step()
        for a, b in zip(ps, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        print("OK")
    """)


def test_a_truncated_or_corrupt_cached_library_is_rebuilt(tmp_path: Path) -> None:
    build = "from torch_lamb.backends import kernel_build; assert kernel_build.load_kernel() is not None; print('OK')"
    run_case(build, tmp_path)
    (library,) = tmp_path.glob("lamb_kernel_*.so")
    good = library.read_bytes()
    for damage in (good[: len(good) // 10], good[: len(good) * 9 // 10], good[:1000] + b"\0" * (len(good) - 1000)):
        library.write_bytes(damage)
        run_case("""
            p = torch.nn.Parameter(torch.randn(1000))
            p.grad = torch.ones_like(p)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # rebuilt, not fallen back
                Lamb([p], implementation="fused").step()
            assert kernel_status().available
            print("OK")
        """, tmp_path)
        assert library.read_bytes() == good or len(library.read_bytes()) == len(good)


def test_an_unusable_cache_warns_once_and_still_steps(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    out = run_case("""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                p = torch.nn.Parameter(torch.randn(100))
                p.grad = torch.ones_like(p)
                Lamb([p]).step()
        found = [str(w.message) for w in caught if "CPU kernel is unavailable" in str(w.message)]
        assert len(found) == 1 and "TORCH_LAMB_CACHE_DIR" in found[0], found
        assert not kernel_status().available
        print(kernel_status())
        print("OK")
    """, blocker / "sub")
    assert "CPU kernel off" in out


def test_a_float32_parameter_with_a_master_gets_float32_values() -> None:
    run_case("""
        model = torch.nn.Linear(64, 64).bfloat16()
        opt = Lamb(model.parameters(), master_weights=True, learning_rate=1e-2)
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-2
            opt.step()
        model.float()  # the parameters are float32 now: they are their own masters
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        opt.step()
        for p, b in zip(model.parameters(), before):
            assert p.dtype == torch.float32 and "master_weight" not in opt.state[p]
            assert (p - b).abs().max() < 0.1, (p - b).abs().max()  # a LAMB step, not garbage
            assert (p - b).abs().max() > 0
        sd = opt.state_dict()  # resuming a bf16 + master checkpoint into a float32 model
        fresh = torch.nn.Linear(64, 64)
        opt2 = Lamb(fresh.parameters(), master_weights=True)
        opt2.load_state_dict(sd)
        assert all("master_weight" not in opt2.state[p] for p in fresh.parameters())
        print("OK")
    """)


def test_weights_loaded_in_place_after_a_step_are_kept() -> None:
    run_case("""
        model = torch.nn.Linear(32, 32).bfloat16()
        opt = Lamb(model.parameters(), master_weights=True, learning_rate=1e-2)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        opt.step()
        loaded = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(loaded)  # in place: the parameter is the truth now
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # a zero step: the weights barely move
        opt.step()
        for name, p in model.named_parameters():
            assert same(opt.state[p]["master_weight"].bfloat16(), p)
            assert (p.float() - loaded[name].float()).abs().max() < 0.05
        print("OK")
    """)


def test_an_abi_mismatch_is_refused() -> None:
    from torch_lamb.backends import kernel_build

    text = kernel_build.load_kernel().lib.lamb_abi().decode()
    assert kernel_build.check_abi(text)["F_DECAY"] == 1
    import ctypes

    class Wrong(ctypes.Structure):
        _fields_ = [(n, ctypes.c_int32 if n == "flags" else t) for n, t in kernel_build.Bucket._fields_]

    with pytest.raises(kernel_build.KernelError, match="ABI mismatch"):
        kernel_build.check_abi(text, Wrong)
    with pytest.raises(kernel_build.KernelError, match="unknown to python"):
        kernel_build.check_abi(text + ";extra=4:8")


@pytest.mark.parametrize("implementation", ["fused", "triton"])  # the raw-pointer backends
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
def test_state_given_new_storage_through_a_held_reference_never_crashes(sliced: bool, implementation: str) -> None:
    """``m.data = ...`` on a reference kept across steps, without reading ``optimizer.state``: the kernel's
    cached pointers hold the old storage alive (it used to write freed memory and abort the process). The
    new storage is taken once ``optimizer.state`` is read; replaced and deleted slots are followed. The
    Triton backend's pointer tables (run here under its interpreter) hold theirs the same way."""
    impls.skip_unless(implementation)
    rows = 64 if implementation == "fused" else 8  # Triton's interpreter runs each slice's chunks in Python
    run_case(f"""
        p = torch.nn.Parameter(torch.randn({rows}, 33))
        opt = Lamb([("bank", p)], learning_rate=0.01, implementation={implementation!r})
        if {sliced}:
            opt.set_trust_ratio_slices(var_names=["bank"], dim=0)
        p.grad = torch.ones_like(p)
        opt.step()
        m = opt.state[p]["momentum"]
        p.grad = torch.ones_like(p)
        opt.step()
        m.data = torch.zeros({rows}, 33)  # the old storage is now referenced only by the optimizer's views
        for _ in range(20):
            junk = [torch.full(({rows}, 33), 7.0) for _ in range(50)]  # reuse freed blocks: a stale write hits them
            p.grad = torch.ones_like(p)
            opt.step()
            assert all(bool((j == 7.0).all()) for j in junk)
        opt.state[p]["momentum"].data = torch.zeros({rows}, 33)  # through optimizer.state: followed
        p.grad = torch.ones_like(p)
        opt.step()
        assert abs(float(dict.__getitem__(opt.state, p)["momentum"].mean()) - 0.1) < 1e-6
        opt.state[p]["velocity"] = torch.zeros({rows}, 33)  # a replaced slot: followed
        p.grad = torch.ones_like(p)
        opt.step()
        assert abs(float(dict.__getitem__(opt.state, p)["velocity"].mean()) - 0.001) < 1e-6
        del opt.state[p]  # a deleted state starts the parameter afresh
        p.grad = torch.ones_like(p)
        opt.step()
        assert abs(float(dict.__getitem__(opt.state, p)["momentum"].mean()) - 0.1) < 1e-6
        print("OK")
    """)
