"""``torch.compile(optimizer.step)`` runs the same step as eager (counters, schedules, accumulation, EMA)."""

from __future__ import annotations

import pytest
import torch

from torch_lamb import CosineDecay, Lamb


def _run(implementation: str, compiled: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300))
    opt = Lamb([p], learning_rate=CosineDecay(0.01, 10), weight_decay=0.01, use_ema=True, ema_overwrite_frequency=3,
               gradient_accumulation_steps=2, global_clipnorm=1.0, implementation=implementation)
    step = torch.compile(opt.step) if compiled else opt.step
    for i in range(8):
        p.grad = torch.sin(torch.arange(300.0) * (i + 1)) * 0.1
        step()
    return p.detach().clone(), opt.state[p]["average"].clone(), opt.iterations


@pytest.mark.parametrize("implementation", ["foreach", "auto"])
def test_compiled_step_equals_eager(implementation):
    torch._dynamo.reset()
    eager, compiled = _run(implementation, False), _run(implementation, True)
    assert compiled[2] == eager[2] == 4  # dynamo drops attribute stores in traced frames: not in ours
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
