"""A state dict saved before the clock (commit 24ec989, tests/fixtures/make_checkpoints.py) loads into today's
Lamb and continues bit for bit: the weights the old code reached after four more calls, and its iterations."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import make_checkpoints as fixture

SAVED = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "pre_clock_checkpoints.pt"), weights_only=True)


@pytest.mark.parametrize("name", sorted(fixture.CONFIGS))
def test_a_checkpoint_from_before_the_clock_continues_bit_for_bit(name: str) -> None:
    saved = SAVED[name]
    m = fixture.model(name)
    with torch.no_grad():
        for p, w in zip(m.parameters(), saved["weights"]):
            p.copy_(w)
    opt = fixture.optimizer(m, fixture.CONFIGS[name])
    opt.load_state_dict(saved["state_dict"])
    assert opt.iterations == saved["iterations"]
    fixture.run(m, opt, saved["grads"])
    assert opt.iterations == saved["final_iterations"]
    for got, want in zip(m.parameters(), saved["final"], strict=True):
        assert torch.equal(got.detach(), want), (got - want).abs().max()
