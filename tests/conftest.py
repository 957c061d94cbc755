"""Shared test setup: Keras runs on the torch backend (it is the numerical oracle); the backend table."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU the Triton backend's kernels run CPU tensors under Triton's interpreter, which must be on
# before triton is imported (it decorates its own language functions then); device nodes tell, without torch.
if not any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/kfd")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import impls
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(params=impls.params())
def implementation(request: pytest.FixtureRequest) -> str:
    """Each backend of the table in tests/impls.py."""
    return request.param


@pytest.fixture(scope="session", autouse=True)
def gradient_scan_built() -> None:
    """Build the gradient scan (about 20 s, cached) before any test: then every test process, subprocesses
    included, finds it loaded or in the cache, rather than each starting a background build of its own."""
    from torch_lamb.backends import grad_scan

    grad_scan.wait(timeout=600)
