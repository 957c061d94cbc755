"""The GPU check: optimizer steps on one accelerator, timed against fused AdamW in the same rounds.

Run from the source tree (the lent GPU machine installs nothing): ``bash benchmarks/gpu_check.sh``, or
``PYTHONPATH=src python benchmarks/gpu_check.py``. For each case (BERT-base and BERT-large shapes) and
dtype (float32; bfloat16 parameters with float32 LAMB state) it times

    adamw-fused, adamw-foreach, adamw-compiled (torch's compiled-optimizer recipe: a tensor lr),
    timm-lamb (when timm is importable), lamb-foreach, lamb-foreach-capturable,
    lamb-compiled, lamb-compiled-capturable, lamb-triton, lamb-triton-capturable

interleaved round by round, and prints the median step, the ratio to fused AdamW, the fraction of the
measured device-to-device copy bandwidth the row's nominal bytes reach, and each row's first step (for the
compiled rows: the first-use compile). A budget (``--budget``, seconds) skips what no longer fits, and says
so. ``--device cpu --case tiny`` runs the same code on the CPU (the test suite does, so the script stays
runnable on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from torch_lamb import Lamb
from torch_lamb.bench import BETAS, CASES, EPS, LR, WD, load_timm_lamb

ROWS = ["adamw-fused", "adamw-foreach", "adamw-compiled", "timm-lamb", "lamb-foreach", "lamb-foreach-capturable",
        "lamb-compiled", "lamb-compiled-capturable", "lamb-triton", "lamb-triton-capturable"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, numel: int = 1 << 28) -> float:
    """Bytes per second of a device-to-device copy (read + write), the best of 5."""
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def nominal_bytes(row: str, dtype: torch.dtype) -> int:
    """Bytes per parameter a row moves: LAMB's two passes over p, g (e bytes) and float32 m, v; AdamW's one
    pass over p, g, m, v in the parameters' dtype; timm's Lamb, which also reads g again for its norms."""
    e = torch.tensor([], dtype=dtype).element_size()
    if row.startswith("adamw"):
        return 7 * e
    if row == "timm-lamb":
        return 10 * e
    return 3 * e + 28  # pass 1: p, g, m, v read, m, v written; pass 2: p, m, v read, p written


def _make(row: str, params: list[torch.Tensor]) -> Callable[[], None] | None:
    device = params[0].device
    if row.startswith("adamw"):
        if row == "adamw-fused" and device.type not in ("cuda", "cpu"):
            return None
        if row == "adamw-compiled":  # torch's recipe: a tensor lr, so that a schedule does not recompile
            opt = torch.optim.AdamW(params, lr=torch.tensor(LR, device=device), betas=BETAS, eps=EPS, weight_decay=WD)
            return torch.compile(opt.step)
        flag = {"fused": True} if row == "adamw-fused" else {"foreach": True}
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **flag).step
    if row == "timm-lamb":
        timm_lamb = load_timm_lamb()
        return None if timm_lamb is None else timm_lamb(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD).step
    impl = row.split("-")[1]
    opt = Lamb(params, learning_rate=LR, betas=BETAS, eps=EPS, weight_decay=WD, implementation=impl,
               capturable=row.endswith("-capturable"))
    return opt.step


def run(case: str, dtype: torch.dtype, device: torch.device, rounds: int, deadline: float,
        rows: list[str]) -> list[dict[str, object]]:
    shapes = CASES[case]()
    g = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device, dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(device, dtype)
        params.append(p)
    numel = sum(p.numel() for p in params)
    table = []
    for row in rows:
        if time.monotonic() > deadline:
            print(f"  {row}: skipped, the time budget is spent", flush=True)
            continue
        clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for c, p in zip(clones, params, strict=True):
            c.grad = p.grad  # read only by every row
        step = _make(row, clones)
        if step is None:
            print(f"  {row}: not available here", flush=True)
            continue
        table.append({"row": row, "step": step, "times": [], "first_s": 0.0})
    for entry in list(table):  # the first step: compiles where the row compiles
        _sync(device)
        t0 = time.perf_counter()
        try:
            entry["step"]()
        except ValueError as err:  # a backend that refuses these tensors here (triton without Triton)
            print(f"  {entry['row']}: not available here ({err})", flush=True)
            table.remove(entry)
            continue
        _sync(device)
        entry["first_s"] = time.perf_counter() - t0
    for _ in range(rounds):
        for entry in table:
            _sync(device)
            t0 = time.perf_counter()
            entry["step"]()
            _sync(device)
            entry["times"].append(time.perf_counter() - t0)
    results = []
    for entry in table:
        results.append({"row": entry["row"], "ms": statistics.median(entry["times"]) * 1e3,
                         "first_ms": entry["first_s"] * 1e3, "bytes": nominal_bytes(entry["row"], dtype) * numel})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="default: bert-base and bert-large")
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16"], help="default: both")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; what does not fit is skipped")
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (run with --device cpu --case tiny to try the script)")
        return 2
    deadline = time.monotonic() + args.budget
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    bandwidth = copy_bandwidth(device, 1 << 24 if device.type == "cpu" else 1 << 28)
    print(f"torch {torch.__version__}, triton {triton_version}, {name}; device copy {bandwidth / 1e9:.0f} GB/s")
    for case in args.case or ["bert-base", "bert-large"]:
        for dtype_name in args.dtype or ["float32", "bfloat16"]:
            dtype = getattr(torch, dtype_name)
            print(f"\ncase {case}, {dtype_name} parameters (LAMB state float32)", flush=True)
            results = run(case, dtype, device, args.rounds, deadline, args.rows.split(","))
            ref = next((r["ms"] for r in results if r["row"] == "adamw-fused"), None)
            print(f"{'row':26} {'median ms':>10} {'vs AdamW':>9} {'of copy BW':>11} {'first ms':>10}")
            for r in results:
                ratio = f"{r['ms'] / ref:.2f}x" if ref else "-"
                frac = r["bytes"] / (r["ms"] / 1e3) / bandwidth
                print(f"{r['row']:26} {r['ms']:10.2f} {ratio:>9} {frac:10.0%} {r['first_ms']:10.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
