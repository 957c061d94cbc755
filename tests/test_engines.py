"""Lamb under FSDP1, torch's ZeroRedundancyOptimizer and DeepSpeed ZeRO 1-3, on 2 gloo ranks: every job
trains like one process on the full batch (parameters within rtol 1e-5 after every step), Lamb's all-reduces
per step do not depend on the number of tensors, a resume through the engine's own checkpoint calls continues
the run, and what cannot be made right is refused on every rank (tests/_engine_worker.py runs them)."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import _engine_worker as w

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

DECAY = {"decay_names": ["bias"]}
ADAPTIVE = {"lr": 0.02, "weight_decay": 0.1, "weight_decay_mode": "adaptive", "epsilon": 1e-3}
COMMON = [
    dict(name="plain", lamb={"lr": 0.02, "weight_decay": 0.05}, **DECAY),
    dict(name="adaptive, bounds, exclusions", lamb={**ADAPTIVE, "min_trust_ratio": 0.05, "max_trust_ratio": 20.0},
         adapt_names=[r"\b1\."], group1={"weight_decay": 0.0}, **DECAY),
    dict(name="global_clipnorm", lamb={**ADAPTIVE, "global_clipnorm": 0.5}),
    dict(name="clipnorm", lamb={**ADAPTIVE, "clipnorm": 0.3}),
    dict(name="clipvalue", lamb={**ADAPTIVE, "clipvalue": 0.05}),
    dict(name="resume", lamb={**ADAPTIVE, "use_ema": True}, resume=True, **DECAY),
]
NOT_DEEPSPEED = [
    dict(name="ema, accumulation, loss scale, finalize",
         lamb={**ADAPTIVE, "use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3,
               "gradient_accumulation_steps": 2, "loss_scale_factor": 4.0}, finalize=True),
    dict(name="skip_nonfinite", lamb={**ADAPTIVE, "skip_nonfinite": True, "global_clipnorm": 0.5}, nan_at=1),
]
DEEPSPEED = [
    dict(name="DeepSpeed clips by 1, then Lamb by 0.5", lamb={**ADAPTIVE, "global_clipnorm": 0.5},
         ds={"gradient_clipping": 1.0}, pre_clip=1.0),
    dict(name="ema overwrite, loss scale", lamb={**ADAPTIVE, "use_ema": True, "ema_momentum": 0.9,
                                                 "ema_overwrite_frequency": 2, "loss_scale_factor": 4.0}),
    dict(name="DeepSpeed's accumulation", lamb=ADAPTIVE, accum=2, **DECAY),
]
DEEPSPEED_REFUSALS = [
    dict(name="own accumulation", lamb={"gradient_accumulation_steps": 2}, error="DeepSpeed accumulates"),
    dict(name="skip_nonfinite", lamb={"skip_nonfinite": True}, error="loss scaler"),
    dict(name="finalize", lamb={"use_ema": True}, finalize=True, error="finalize_variable_values"),
]
JOBS = {
    "fsdp1_orig": COMMON + NOT_DEEPSPEED,
    "fsdp1_flat": COMMON + NOT_DEEPSPEED,
    "zero": [*COMMON, *NOT_DEEPSPEED, dict(name="trust-ratio slices", lamb=ADAPTIVE,
                                           slices={"var_names": [r"^0\.weight"], "dim": 0})],
    "ds1": COMMON + DEEPSPEED + DEEPSPEED_REFUSALS,
    "ds2": [*COMMON, dict(name="one tensor per group, adaptive", lamb=ADAPTIVE, group1={"weight_decay": 0.3})],
    # sub-groups of at most 20 elements: 2 in group 0, 1 in group 1, each its own step() and all-reduce
    "ds3": [*COMMON, dict(name="several sub-groups", lamb=ADAPTIVE, sub_groups=20, buckets=3, **DECAY)],
}

# Lamb's all-reduces per update: per bucket one for the trust ratios' sums, one more with clipnorm or
# global_clipnorm (its squared sums), one more with skip_nonfinite (the count); under ZeRO (whole tensors) one
# per global quantity; under DeepSpeed (one step() per group) DeepSpeed's own norm serves global_clipnorm.
BUCKETS = {"fsdp1_orig": 2, "fsdp1_flat": 2, "zero": 0, "ds1": 2, "ds2": 2, "ds3": 2}


def _expected_count(engine: str, job: dict) -> int:
    cfg, buckets = job["lamb"], job.get("buckets", BUCKETS[engine])
    clip = "clipnorm" in cfg or "global_clipnorm" in cfg
    if engine == "zero":
        return int("global_clipnorm" in cfg) + int(cfg.get("skip_nonfinite", False))
    if engine.startswith("ds"):
        return buckets * (1 + int("clipnorm" in cfg))
    return buckets * (1 + clip + int(cfg.get("skip_nonfinite", False)))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(engine: str, tmp_path) -> list[list[dict]]:
    """The jobs on 2 ranks; a rank left waiting in a collective (an error on the other rank only) fails the test
    after 5 minutes instead of hanging the suite."""
    out = str(tmp_path / "results.pt")
    os.environ["DS_ACCELERATOR"] = "cpu"
    ctx = mp.start_processes(w.worker, args=(_port(), engine, JOBS[engine], out), nprocs=w.WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"{engine}: the ranks did not finish in 5 minutes (one waits in a collective the other left)")
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("engine", [
    "fsdp1_orig", "fsdp1_flat", "zero",
    *[pytest.param(e, marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed"))
      for e in ("ds1", "ds2", "ds3")],
])
def test_lamb_under_an_engine_trains_like_one_process(engine: str, tmp_path) -> None:
    ranks = _run(engine, tmp_path)
    for job, results in zip(JOBS[engine], zip(*ranks)):
        name = f"{engine} / {job['name']}"
        if "error" in job:
            for rank, result in enumerate(results):
                assert job["error"] in result.get("error", ""), (name, rank, result)
            continue
        for rank, result in enumerate(results):
            assert "error" not in result, (name, rank, result.get("trace"))
        diffs = results[0]["diffs"]
        assert len(diffs) == w.STEPS + bool(job.get("finalize")) and max(diffs) <= 1.0, (name, diffs)
        accumulation = job["lamb"].get("gradient_accumulation_steps", 1)
        want = [_expected_count(engine, job) if (s + 1) % accumulation == 0 else 0 for s in range(w.STEPS)]
        if job.get("nan_at") is not None:  # the skipped call measures and counts, then applies nothing
            want[job["nan_at"]] = int(job["lamb"].get("skip_nonfinite", False)) * (
                1 if engine == "zero" else BUCKETS[engine])
        for result in results:
            assert result["counts"] == want, (name, result["counts"], want)
        if job.get("resume"):
            assert results[0]["resume"] == 0.0, (name, results[0]["resume"])
