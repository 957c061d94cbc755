"""The examples run, learn, and end with the EMA weights in the model."""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_learns_with_accumulation_and_ema(capsys: pytest.CaptureFixture[str]) -> None:
    out = _load("plain_loop").main(["--steps", "60", "--accum", "3", "--log-every", "30"])
    assert out["iterations"] == 60  # 180 micro-batches, one update per 3
    assert out["raw"] < 0.5 * out["first"]
    assert out["ema"] < 0.5 * out["first"]
    assert out["ema"] != out["raw"]  # finalize_variable_values() really replaced the weights
    printed = capsys.readouterr().out
    assert "update    30" in printed and "'0.weight':" in printed


def test_plain_loop_finalize_copies_the_averages() -> None:
    import torch

    from torch_lamb import Lamb

    module = _load("plain_loop")
    x, y = module.make_data(64, 0)
    model = torch.nn.Linear(16, 1)
    opt = Lamb(model.parameters(), learning_rate=0.01, use_ema=True, gradient_accumulation_steps=2)
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    averages = [opt.state[p]["average"].clone() for p in model.parameters()]
    opt.finalize_variable_values()
    for p, a in zip(model.parameters(), averages):
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=0)


def test_hf_trainer_example(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = _load("hf_trainer").main(["--steps", "60", "--batch", "32", "--accum", "2"])
    assert out["iterations"] == 60  # the Trainer called Lamb.step once per update
    assert out["before"] < 0.7
    assert out["after"] > 0.9  # the tiny BERT learned the planted-token task
    assert out["finalized"] == 1.0  # LambCallback.on_train_end ran finalize_variable_values()
    assert out["trust_logs"] >= 3
    assert "test accuracy" in capsys.readouterr().out


def test_hf_callback_unwraps_and_finalizes() -> None:
    pytest.importorskip("transformers")
    import torch

    from torch_lamb import Lamb
    from torch_lamb.integrations.huggingface import LambCallback, unwrap_lamb

    model = torch.nn.Linear(3, 1)
    opt = Lamb(model.named_parameters(), learning_rate=0.1, use_ema=True)

    class Wrapper:  # like accelerate's AcceleratedOptimizer
        def __init__(self, inner: object) -> None:
            self.optimizer = inner

    assert unwrap_lamb(Wrapper(Wrapper(opt))) is opt
    assert unwrap_lamb(Wrapper(torch.optim.SGD(model.parameters(), lr=0.1))) is None
    cb = LambCallback(log_trust_ratios=True)
    cb.on_train_begin(None, None, None, optimizer=Wrapper(opt))
    assert opt.tracking_trust_ratios
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
    logs: dict[str, float] = {"loss": 1.0}
    cb.on_log(None, None, None, logs=logs, optimizer=Wrapper(opt))
    assert logs["trust_ratio/weight"] == pytest.approx(float(opt.last_trust_ratios()["weight"].ratio))
    cb.on_train_end(None, None, None, optimizer=Wrapper(opt))
    torch.testing.assert_close(model.weight.detach(), opt.state[model.weight]["average"], rtol=0, atol=0)


def test_torch_lamb_imports_without_transformers() -> None:
    import subprocess

    code = "import sys; sys.modules['transformers'] = None; import torch_lamb, torch_lamb.integrations; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    code = "import sys; sys.modules['transformers'] = None; import torch_lamb.integrations.huggingface"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0 and "pip install transformers" in res.stderr
