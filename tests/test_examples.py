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


def test_moe_experts_learns_with_one_trust_ratio_per_expert(capsys: pytest.CaptureFixture[str]) -> None:
    out = _load("moe_experts").main(["--experts", "4", "--dim", "8", "--hidden", "16", "--steps", "120"])
    assert out["last"] < 0.1 * out["first"]  # the loss fell by more than 10x (about 50x with seed 0)
    ratios = out["ratios"]
    for bank in ("w_in", "w_out"):  # one ratio per expert per bank, nothing for the bank as a whole
        assert [n for n in ratios if n.startswith(f"experts.{bank}")] == [f"experts.{bank}[{k}]" for k in range(4)]
        per_expert = [ratios[f"experts.{bank}[{k}]"] for k in range(4)]
        assert all(r > 0 for r in per_expert)
        assert max(per_expert) > 1.1 * min(per_expert)  # the experts got different step sizes
    assert set(ratios) == {"router.weight", "router.bias"} | {f"experts.{b}[{k}]" for b in ("w_in", "w_out")
                                                               for k in range(4)}
    assert sum(out["load"]) == 256 * 2  # top-2: every token of the last batch went to two experts
    printed = capsys.readouterr().out
    assert "trust ratios of the last step, per expert" in printed and "x lower" in printed


def test_moe_experts_grouped_forward_matches_a_loop_over_experts() -> None:
    import torch

    module = _load("moe_experts")
    torch.manual_seed(0)
    for top_k in (1, 2):
        moe = module.MoE(experts=5, dim=6, hidden=7, top_k=top_k)
        x = torch.randn(40, 6)
        out, load = moe(x)
        gates, chosen = moe.router(x).softmax(-1).topk(top_k, dim=-1)
        gates = gates / gates.sum(-1, keepdim=True)
        want = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for g, e in zip(gates[n], chosen[n]):
                hidden = torch.nn.functional.gelu(x[n] @ moe.experts["w_in"][e])
                want[n] += g * (hidden @ moe.experts["w_out"][e])
        torch.testing.assert_close(out, want)
        assert load.tolist() == torch.bincount(chosen.reshape(-1), minlength=5).tolist()


def _torchrun(script: Path, *args: str) -> str:
    """``torchrun --nproc-per-node 2 script args`` as its users launch it; returns rank 0's output."""
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([torchrun, "--nproc-per-node", "2", str(script), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("script, args, engine", [
    ("fsdp1_train", (), "FSDP1 (use_orig_params)"),
    ("fsdp1_train", ("--flat",), "FSDP1 (FlatParameters)"),
    ("zero_train", (), "ZeroRedundancyOptimizer"),
])
def test_engine_examples_train_and_resume_exactly(script: str, args: tuple[str, ...], engine: str) -> None:
    printed = _torchrun(EXAMPLES / f"{script}.py", "--steps", "8", *args)
    line = next(s for s in printed.splitlines() if s.startswith(engine))
    loss, resumed = (float(part.rsplit("loss ", 1)[1]) for part in line.split(";"))
    assert "8 updates" in line and loss == resumed  # the run resumed from its checkpoint continues exactly


def test_deepspeed_example_trains_and_resumes_exactly() -> None:
    pytest.importorskip("deepspeed")
    printed = _torchrun(Path(__file__).parent / "_ds_example.py", "--stage", "2", "--steps", "6")
    line = next(s for s in printed.splitlines() if s.startswith("DeepSpeed ZeRO-2"))
    loss, resumed = (float(part.rsplit("loss ", 1)[1]) for part in line.split(";"))
    assert "6 Lamb updates" in line and loss == resumed
