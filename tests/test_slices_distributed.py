"""Per-slice trust ratios under gloo: FSDP2 on 2 ranks, a 2x2 DTensor mesh on 4 ranks, DCP 4 -> 2 -> 1.

Each test spawns its ranks once (bodies in tests/_slice_dist_worker.py); a rank that hangs fails the test
after SPAWN_TIMEOUT seconds instead of hanging the suite.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import _slice_dist_worker as w

SPAWN_TIMEOUT = 150.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, ok: str, *args) -> None:
    """Run ``fn(rank, world, init_method, ok, *args)`` on ``world`` processes; each must write ``ok.<rank>``."""
    ctx = mp.start_processes(
        fn, args=(world, f"tcp://127.0.0.1:{_port()}", ok, *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            pytest.fail(f"{fn.__name__} on {world} ranks did not finish within {SPAWN_TIMEOUT:.0f} s (a deadlock?)")
    for rank in range(world):
        with open(f"{ok}.{rank}") as f:
            assert f.read() == "ok"


def test_fsdp2_expert_bank_and_qkv_match_single_process(tmp_path):
    spawn(w.fsdp_worker, 2, str(tmp_path / "ok"))


def test_2x2_mesh_placements_and_dcp_resume_4_to_2_to_1(tmp_path):
    spawn(w.mesh_worker, 4, str(tmp_path / "ok4"), str(tmp_path))  # checks, then a 4-rank checkpoint
    spawn(w.resume_worker, 2, str(tmp_path / "ok2"), str(tmp_path))  # 4 -> 2 (FSDP2)
    w.resume_single(str(tmp_path))  # 4 -> 1


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_plain_tensor_then_replicated_dtensor(tmp_path, implementation):
    """Both have no reducer; they used to share a bucket whose first tensor decided whether gradients are
    unwrapped (foreach raised, the CPU kernel crashed the process). A spawned process, so a crash fails it."""
    import impls

    if implementation not in impls.available():
        pytest.skip(f"no {implementation} backend")
    spawn(w.mixed_bucket_worker, 1, str(tmp_path / "ok"), implementation)


@pytest.mark.parametrize("save_slices, load_slices", [(True, False), (False, True), (True, True)],
                         ids=["sliced-into-unsliced", "unsliced-into-sliced", "sliced-into-sliced"])
def test_dcp_loads_the_checkpoints_slices_whatever_the_live_ones(tmp_path, save_slices, load_slices):
    """The specs are tuples, one DCP leaf per group: a checkpoint loads whatever the loading optimizer slices
    (DCP used to flatten a list of dicts into per-spec keys, so the structures had to match)."""
    got = w.dcp_round_trip(str(tmp_path), save_slices, load_slices)
    assert got == [(0, (2, 4), None) if save_slices else None, None, None, None]


def test_dcp_checkpoint_from_before_slices_needs_a_partial_load(tmp_path):
    """A checkpoint written before the key existed lacks it: DCP refuses it (as for any new group key), and
    a partial load keeps the live slices. (DCP raises a CheckpointException, a BaseException.)"""
    with pytest.raises(BaseException, match=r"Missing key in checkpoint state_dict: optim\.param_groups\.0\.trust"):
        w.dcp_round_trip(str(tmp_path / "strict"), False, True, drop_key=True)
    got = w.dcp_round_trip(str(tmp_path / "partial"), False, True, drop_key=True, partial=True)
    assert got == [(0, (2, 4), None), None, None, None]
