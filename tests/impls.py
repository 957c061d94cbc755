"""The one description of the backends the tests run (in the spirit of torch's ``OptimizerInfo``).

Every test that should hold on every backend takes the ``implementation`` fixture (conftest.py) or
loops over :func:`available`; none lists backend names itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from torch_lamb import kernel_status


@dataclass(frozen=True)
class Impl:
    name: str  # Lamb(implementation=name)
    needs_kernel: bool = False  # skipped where the CPU kernel cannot be built
    capturable: bool = True  # accepts capturable=True (device-tensor scalars)
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    ulps: int = 1  # float32 goldens hold to this many units in the last place (the kernel multiplies by
    # 1/bias_correction where Keras divides, so u's last bit may differ)
    fixture: bool = True  # in the `implementation` fixture; False: each new bucket shape compiles (seconds), so
    # tests/test_compiling_backends.py runs its own matrix, and the loops over available() (Keras parity) include it


IMPLS = (
    Impl("reference"),
    Impl("foreach"),
    Impl("fused", needs_kernel=True, capturable=False, ulps=4),  # float64 (and float16 without _Float16): foreach
    Impl("compiled", ulps=8, fixture=False),  # norms summed in float64, u in another order: a few ulps
    Impl("triton", ulps=8, fixture=False),  # the interpreter here (slow): the same matrix as "compiled"
)


def _skip_reason(impl: Impl) -> str | None:
    if impl.needs_kernel and not kernel_status().available:
        return f"{impl.name}: no CPU kernel ({kernel_status().reason})"
    if impl.name == "compiled":
        from torch_lamb.backends.compiled import unavailable

        reason = unavailable("cpu")
        return f"compiled: {reason}" if reason else None
    if impl.name == "triton":
        from torch_lamb.backends.triton import unavailable as triton_unavailable

        reason = triton_unavailable("cpu")
        return f"triton: {reason}" if reason else None
    return None


def skip_unless(name: str) -> None:
    """Skip the calling test, with the reason, where backend ``name`` cannot run here ("auto" always can)."""
    impl = next((i for i in IMPLS if i.name == name), None)
    reason = _skip_reason(impl) if impl is not None else None
    if reason:
        pytest.skip(reason)


def refusal(name: str, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` does not take parameters of ``dtype`` (None: it does)."""
    impl = next(i for i in IMPLS if i.name == name)
    if dtype not in impl.dtypes:
        return f"{name} does not take {dtype} parameters"
    return None


def golden_rtol(name: str) -> float:
    """The relative tolerance of a float32 golden value on backend ``name``."""
    return next(i.ulps for i in IMPLS if i.name == name) * 2.0**-23


def available(capturable: bool = False) -> list[str]:
    """The backends that run here (with ``capturable``: those that take device-tensor scalars)."""
    return [i.name for i in IMPLS if _skip_reason(i) is None and (i.capturable or not capturable)]


def params(capturable: bool = False) -> list:
    """Every backend as a pytest param, skipped with a reason where it cannot run here."""
    return [
        pytest.param(i.name, id=i.name, marks=pytest.mark.skipif(_skip_reason(i) is not None,
                                                                 reason=_skip_reason(i) or ""))
        for i in IMPLS if (i.capturable or not capturable) and i.fixture
    ]
