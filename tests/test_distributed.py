"""2-rank gloo tests: FSDP2 and DDP equal the single-process run (spawned once, ~10 s)."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import _dist_worker


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_and_ddp_match_single_process(tmp_path):
    ok = tmp_path / "ok"
    os.environ["DIST_OK"] = str(ok)
    os.environ["DIST_TMP"] = str(tmp_path)
    expected = _dist_worker.single_process_dcp(str(tmp_path))  # uninterrupted run + a 1-rank checkpoint
    torch.save(expected, tmp_path / "expected.pt")
    mp.spawn(_dist_worker.worker, args=(2, f"tcp://127.0.0.1:{_port()}"), nprocs=2, join=True)
    assert ok.read_text() == "ok"
    # 2 -> 1: the 2-rank checkpoint resumed in this single process continues like the uninterrupted run
    for got, want in zip(_dist_worker.resume_single(str(tmp_path)), expected, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
