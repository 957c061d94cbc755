"""Where the CPU kernel's step loses to its memory floor: a breakdown, timed in one interleaved run.

``PYTHONPATH=src python benchmarks/profile_kernel.py [--case bert-base] [--threads 2] [--rounds 9]``

* **Python per step:** the whole ``opt.step()`` against the time spent inside the kernel's C call in the
  same calls (a timer around ``cpu_kernel.call_kernel``): the rest is planning, layout checks and the ctypes call.
* **Kernel against the floor:** the C call against ``lamb_stream`` (the floor's build: the same bytes in
  the same passes and segments, no arithmetic), and fused AdamW for scale.
* **Arithmetic:** the kernel's and the floor's C calls on one tensor that stays in this CPU's L2 (each
  thread's share at half of it), repeated, less the C call's fixed cost: ns per element when memory is not
  the limit, against the floor's ns per element from DRAM. Arithmetic (sqrt and two divides per element,
  float64 norm sums) that costs less than the DRAM floor can hide behind it; what exceeds it cannot.
* **Fixed cost per call:** a step of one 64-element tensor (Python, the ctypes call, OpenMP region entry).
* **Segment size:** the kernel re-reads a segment from cache in pass 2 and meets one barrier per segment;
  the sweep times the step at several ``SEGMENT_BYTES``.

Each figure is the median over rounds, with its min-max; rows are interleaved round by round, so a noisy
neighbour slows all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from torch_lamb import Lamb
from torch_lamb.backends import cpu_kernel
from torch_lamb.bench import BETAS, CASES, EPS, LR, WD, _cpu_model, plural

SEGMENTS_MIB = (1, 2, 4, 8, 16, 32, 128, 1024)


def _params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
        p.grad = torch.randn(s, generator=g) * 1e-3
        params.append(p)
    return params


class _KernelTimer:
    """Seconds spent inside the kernel's C calls (wraps ``cpu_kernel.call_kernel``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._real = cpu_kernel.call_kernel

    def __enter__(self) -> _KernelTimer:
        def timed(name: str, b: object, kernel: object = None) -> None:
            t0 = time.perf_counter()
            self._real(name, b, kernel)
            self.seconds += time.perf_counter() - t0

        cpu_kernel.call_kernel = timed
        return self

    def __exit__(self, *exc: object) -> None:
        cpu_kernel.call_kernel = self._real


def _median(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def _timed(fn: Callable[[], None], repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _in_c(fn: Callable[[], None], repeat: int = 1) -> float:
    """Seconds per call spent inside the kernel's C calls (no Python)."""
    with _KernelTimer() as timer:
        for _ in range(repeat):
            fn()
    return timer.seconds / repeat


def profile(case: str, rounds: int) -> dict[str, tuple[float, float, float]]:
    """Each figure's (min, median, max) over ``rounds`` interleaved rounds, in seconds unless named."""
    params = _params(CASES[case]())
    numel = sum(p.numel() for p in params)
    opt = Lamb(params, learning_rate=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    adamw = torch.optim.AdamW(_params(CASES[case]()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    floor = cpu_kernel.floor_stream(params, [p.grad for p in params])
    # in cache: each thread's share of p, g, m, v (16 B/element) at half its L2 (1 MiB of 2 here)
    cached_n = 65536 * torch.get_num_threads()
    small = _params([(cached_n,)], seed=1)
    cached = Lamb(small, learning_rate=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    cached_floor = cpu_kernel.floor_stream(small, [p.grad for p in small])
    tiny = _params([(64,)], seed=2)
    tiny_opt = Lamb(tiny, learning_rate=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for warm in (opt.step, adamw.step, cached.step, tiny_opt.step):
        warm()
    out: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        out.setdefault(key, []).append(value)

    default_segment = cpu_kernel.SEGMENT_BYTES
    for _ in range(rounds):
        with _KernelTimer() as timer:
            add("step", _timed(opt.step))
        add("kernel", timer.seconds)
        add("python", out["step"][-1] - timer.seconds)
        if floor is not None:
            add("floor", _timed(floor))
            add("cached floor ns/elem", _in_c(cached_floor, 50) / cached_n * 1e9)
        add("adamw-fused", _timed(adamw.step))
        fixed = _in_c(tiny_opt.step, 200)  # the C call's own cost (OpenMP region entry): taken off below
        add("cached kernel ns/elem", (_in_c(cached.step, 50) - fixed) / cached_n * 1e9)
        add("tiny step", _timed(tiny_opt.step, 200))
        add("tiny C call", fixed)
        for mib in SEGMENTS_MIB:
            cpu_kernel.SEGMENT_BYTES = mib << 20
            try:
                add(f"segment {mib} MiB", _timed(opt.step))
            finally:
                cpu_kernel.SEGMENT_BYTES = default_segment
    if floor is not None:
        out["dram floor ns/elem"] = [f / numel * 1e9 for f in out["floor"]]
    return {k: _median(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--case", default="bert-base", choices=sorted(CASES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if cpu_kernel.unavailable() is not None:
        print(f"no CPU kernel here: {cpu_kernel.unavailable()}")
        return 2
    r = profile(args.case, args.rounds)
    print(f"case {args.case}, {plural(args.threads, 'thread')}, {plural(args.rounds, 'round')}, {_cpu_model()}, "
          f"torch {torch.__version__}")
    step, kernel = r["step"][1], r["kernel"][1]

    def line(name: str, key: str, unit: str = "ms", scale: float = 1e3, against: float | None = None,
             label: str = "") -> None:
        lo, mid, hi = (x * scale for x in r[key])
        ratio = f"{r[key][1] / against:6.2f}x {label}" if against else ""
        print(f"  {name:<34}{mid:9.3f} {unit:<6}({lo:.3f}-{hi:.3f})  {ratio}")

    print("whole step")
    line("opt.step()", "step", against=r["adamw-fused"][1] if "adamw-fused" in r else None, label="fused AdamW")
    line("  inside the kernel's C call", "kernel", against=step, label="of the step")
    line("  Python around it", "python", against=step, label="of the step")
    line("fused AdamW", "adamw-fused")
    if "floor" in r:
        line("floor (same bytes, no arithmetic)", "floor")
        print(f"  {'kernel / floor':<34}{kernel / r['floor'][1]:9.3f}x")
        print(f"  {'step / floor':<34}{step / r['floor'][1]:9.3f}x")
    print("arithmetic (per element)")
    line("kernel, data in L2", "cached kernel ns/elem", "ns", 1.0)
    if "floor" in r:
        line("floor, data in L2", "cached floor ns/elem", "ns", 1.0)
        line("floor, data from DRAM", "dram floor ns/elem", "ns", 1.0)
        print(f"  {'kernel in L2 / DRAM floor':<34}"
              f"{r['cached kernel ns/elem'][1] / r['dram floor ns/elem'][1]:9.3f}x  "
              f"(best rounds: {r['cached kernel ns/elem'][0] / r['dram floor ns/elem'][0]:.3f}x; "
              "< 1: arithmetic can hide behind memory)")
    print("fixed cost per call")
    line("a step of 64 elements", "tiny step", "us", 1e6)
    line("  of which the C call", "tiny C call", "us", 1e6)
    print(f"segment size (SEGMENT_BYTES; default {cpu_kernel.SEGMENT_BYTES >> 20} MiB)")
    for mib in SEGMENTS_MIB:
        line(f"{mib} MiB", f"segment {mib} MiB", against=step, label="of the default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
