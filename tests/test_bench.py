"""Smoke test of the benchmark: it runs and reports positive numbers (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from torch_lamb import bench


def test_bench_json_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--case", "tiny", "--rounds", "2", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threads"] == 1
    (case,) = report["cases"]
    assert case["case"] == "tiny" and case["params"] == 64 * 64 + 64 + 1000
    names = [r["name"] for r in case["rows"]]
    assert {"lamb-fused", "lamb-foreach", "lamb-fused-all", "adamw-fused", "floor"} <= set(names)
    for row in case["rows"]:
        for key in ("median_ms", "gb_per_s", "first_step_ms", "ratio_vs_adamw_fused"):
            assert row[key] > 0, (row["name"], key)
        if row["name"] != "floor":
            assert row["state_mb"] > 0
    assert case["peak_rss_mb"] > 0
    ratios = {r["name"]: r["ratio_vs_adamw_fused"] for r in case["rows"]}
    assert ratios["adamw-fused"] == 1.0
    floor = {r["name"]: r["ratio_vs_floor"] for r in case["rows"]}
    assert floor["floor"] == pytest.approx(1.0) and all(v > 0 for v in floor.values())
    for row in case["rows"]:  # min <= median <= max of the per-round ratios; AdamW (the floor) against itself is 1
        for key in ("ratio_spread", "floor_spread"):
            low, mid, high = row[key]
            assert 0 < low <= mid <= high, (row["name"], key)
    by_name = {r["name"]: r for r in case["rows"]}
    assert by_name["adamw-fused"]["ratio_spread"] == [1.0, 1.0, 1.0]
    assert by_name["floor"]["floor_spread"] == pytest.approx([1.0, 1.0, 1.0])
    assert report["cpu"] and report["threads"] == 1
    assert report["import"] is None  # timed only without --case (or with --import-rounds)
    (scaler,) = [c for c in case["scaler_vs_plain"] if c["row"] == "lamb-fused-scaler"]
    low, mid, high = scaler["ratio_spread"]
    assert scaler["vs"] == "lamb-fused" and scaler["ratio"] > 0 and 0 < low <= mid <= high


def test_bench_times_the_import_in_fresh_interpreters(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--case", "tiny", "--rounds", "1", "--rows", "floor", "--import-rounds", "1", "--json",
                       "--no-progress"]) == 0
    imported = json.loads(capsys.readouterr().out)["import"]
    assert imported["rounds"] == 1 and imported["torch_s"] > 0 and imported["torch_lamb_s"] > 0
    assert imported["ratio"] == pytest.approx(imported["torch_lamb_s"] / imported["torch_s"])


def test_bench_warns_when_rounds_disagree(capsys: pytest.CaptureFixture[str]) -> None:
    row = {"name": "lamb-fused", "median_ms": 1.0, "ratio_vs_adamw_fused": 1.5, "ratio_spread": [1.2, 1.5, 1.9],
           "ratio_vs_floor": 1.1, "floor_spread": [1.0, 1.04, 1.08], "gb_per_s": 1.0, "bytes_per_param": 40,
           "state_mb": 1.0, "transient_mb": 0.0, "first_step_ms": 1.0}
    steady = {**row, "name": "adamw-fused", "ratio_spread": [1.0, 1.0, 1.0], "floor_spread": [0.6, 0.7, 0.8]}
    bench._print({"case": "tiny", "tensors": 1, "params": 1, "dtype": "float32", "rounds": 3, "fused_kernel": True,
                  "rss_base_mb": 1.0, "peak_rss_mb": 1.0, "rows": [row, steady]})
    out = capsys.readouterr().out
    assert "1.20/1.50/1.90" in out and "1.00/1.04/1.08" in out  # min/median/max per round, both references
    warnings = [line for line in out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 2
    against_adamw, against_floor = warnings
    assert "to AdamW" in against_adamw and "lamb-fused" in against_adamw and "adamw-fused" not in against_adamw
    # 1.00-1.08 spans under 10% of 1.04: only AdamW's 0.6-0.8 against the floor is too wide
    assert "to the floor" in against_floor and "adamw-fused" in against_floor and "lamb-fused" not in against_floor


def test_bench_rejects_unknown_row() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--case", "tiny", "--rows", "nope"])


def test_bench_low_precision_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--case", "tiny", "--rounds", "1", "--threads", "1", "--dtype", "bfloat16",
                       "--rows", "lamb-fused,lamb-fused-master,adamw-fused,floor", "--json"]) == 0
    (case,) = json.loads(capsys.readouterr().out)["cases"]
    assert case["dtype"] == "bfloat16"
    rows = {r["name"]: r for r in case["rows"]}
    assert set(rows) == {"lamb-fused", "lamb-fused-master", "adamw-fused"}  # the floor streams float32 only
    assert rows["lamb-fused"]["bytes_per_param"] == 32 and rows["lamb-fused-master"]["bytes_per_param"] == 40
    assert rows["adamw-fused"]["bytes_per_param"] == 14
    assert bench.nominal_bytes("lamb-fused-all", bench.torch.float32) == bench.LAMB_ALL_BPP == 88


def test_bench_progress_goes_to_stderr_and_json_stays_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--case", "tiny", "--rounds", "2", "--threads", "1", "--rows", "lamb-fused,adamw-fused",
                       "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # nothing but the report on stdout
    err = captured.err.splitlines()
    needs = [line for line in err if "case tiny" in line and "needs about" in line]
    assert len(needs) == 1 and "GiB" in needs[0]
    assert sum("first step" in line for line in err) == 2  # one per row
    assert sum("round" in line and "lamb-fused" in line and "adamw-fused" in line for line in err) == 2
    assert bench.main(["--case", "tiny", "--rounds", "1", "--rows", "floor", "--json", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_bench_memory_estimate_counts_params_grads_and_row_state() -> None:
    n = 1_000_000
    assert bench.memory_estimate(n, ["lamb-fused"]) == n * (8 + 8)  # p and g, then m and v
    assert bench.memory_estimate(n, ["lamb-fused", "adamw-fused"]) == n * (8 + 8 + 8)
    assert bench.memory_estimate(n, ["adamw-fused"], bench.torch.bfloat16) == n * (4 + 4)


def test_bench_quick_picks_small_cases_and_few_rounds(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    seen = []

    def fake_run_case(case: str, rounds: int, rows: list[str] | None, dtype: object = None) -> dict:
        seen.append((case, rounds, rows))
        return {"case": case}

    monkeypatch.setattr(bench, "run_case", fake_run_case)
    monkeypatch.setattr(bench, "_cold_compile_s", lambda: None)
    monkeypatch.setattr(bench, "import_times", lambda rounds: seen.append(("import", rounds)) or None)
    assert bench.main(["--quick", "--json"]) == 0
    capsys.readouterr()
    assert seen == [("small-many", bench.QUICK_ROUNDS, None), ("bert-base", bench.QUICK_ROUNDS, bench.QUICK_ROWS),
                    ("import", 5)]  # the import is timed without --case
    # small-many runs its case rows: never the compiled backend, whose compile of 2,000 tensors takes minutes
    assert "lamb-compiled" in bench.DEFAULT_ROWS and "lamb-compiled" not in bench.CASE_ROWS["small-many"]
    assert "lamb-compiled" not in bench.QUICK_ROWS


def test_bench_moe_case_shapes() -> None:
    shapes = bench.CASES["moe"]()
    numel = sum(bench.torch.Size(s).numel() for s in shapes)
    assert 60e6 < numel < 70e6  # near BERT-base, for small machines
    assert [s for s in shapes if len(s) == 3] == [(64, 512, 1024), (64, 1024, 512)]  # the two expert banks
    assert (64, 512) in shapes and shapes.count((512, 512)) == 2  # router and the two dense projections
    assert [s for s in bench.CASES["moe-large"]() if len(s) == 3] == [(64, 1024, 4096), (64, 4096, 1024)]
    assert bench.CASE_ROWS["moe-large"][:2] == ["lamb-fused", "lamb-fused-sliced"]
    assert bench.DEFAULT_ROWS[:2] == ["lamb-fused", "lamb-fused-sliced"]  # timed one right after the other


def test_bench_sliced_row_gives_each_expert_a_trust_ratio(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(bench.CASES, "moe", lambda: bench._moe(4, 8, 16))  # the moe case's layout, tiny
    assert bench.main(["--case", "moe", "--rounds", "3", "--threads", "1", "--no-progress", "--json",
                       "--rows", "lamb-fused,lamb-fused-sliced,lamb-foreach,adamw-fused"]) == 0
    (case,) = json.loads(capsys.readouterr().out)["cases"]
    assert case["tensors"] == 10 and case["params"] == 4 * 8 + 4 + 2 * (64 + 8) + 2 * 8 + 2 * 4 * 8 * 16
    rows = {r["name"]: r for r in case["rows"]}
    assert list(rows) == ["lamb-fused", "lamb-fused-sliced", "lamb-foreach", "adamw-fused"]
    # per tensor: one ratio per tensor; sliced: the 8 other tensors, and 4 experts in each of the 2 banks
    assert rows["lamb-fused"]["trust_ratios"] == rows["lamb-foreach"]["trust_ratios"] == 10
    assert rows["lamb-fused-sliced"]["trust_ratios"] == 8 + 2 * 4
    assert rows["adamw-fused"]["trust_ratios"] is None
    assert rows["lamb-fused-sliced"]["state_mb"] == rows["lamb-fused"]["state_mb"] > 0  # same m and v
    cost = case["sliced_vs_per_tensor"]
    assert cost["row"] == "lamb-fused-sliced" and cost["vs"] == "lamb-fused"
    assert cost["ratio"] == pytest.approx(rows["lamb-fused-sliced"]["median_ms"] / rows["lamb-fused"]["median_ms"])
    low, mid, high = cost["ratio_spread"]
    assert 0 < low <= mid <= high
    bench._print(case)
    printed = capsys.readouterr().out
    assert f"lamb-fused-sliced vs lamb-fused (per-slice vs per-tensor trust ratios): {cost['ratio']:.3f}x" in printed
    table = {line.split()[0]: line.split()[-1] for line in printed.splitlines()
             if line.startswith("lamb-") and " vs " not in line}
    assert table == {"lamb-fused": "10", "lamb-fused-sliced": "16", "lamb-foreach": "10"}  # the ratios column


def test_bench_skips_the_sliced_row_without_expert_banks(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--case", "tiny", "--rounds", "1", "--threads", "1", "--no-progress", "--json",
                       "--rows", "lamb-fused,lamb-fused-sliced,adamw-fused"]) == 0
    (case,) = json.loads(capsys.readouterr().out)["cases"]
    assert [r["name"] for r in case["rows"]] == ["lamb-fused", "adamw-fused"]  # tiny has no 3-D parameter
    assert case["sliced_vs_per_tensor"] is None
    assert case["rows"][0]["trust_ratios"] == 3


def test_gpu_check_script_runs_on_the_cpu() -> None:
    """benchmarks/gpu_check.py stays runnable without a GPU: the same code on CPU tensors, a tiny case."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    import impls

    rows = "adamw-fused,adamw-foreach,lamb-foreach,lamb-foreach-capturable"
    if "triton" in impls.available():  # the Triton kernels, interpreted
        rows += ",lamb-triton"
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--case", "tiny", "--dtype",
         "float32", "--dtype", "bfloat16", "--rounds", "2", "--rows", rows],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(root / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "device copy" in out and out.count("case tiny") == 2
    for row in rows.split(","):
        assert out.count(f"\n{row} ") == 2, (row, out)
    assert "1.00x" in out  # fused AdamW, the reference row


def test_kernel_profile_script_runs() -> None:
    """benchmarks/profile_kernel.py (issue 15's breakdown) stays runnable: every section, on a tiny case."""
    import subprocess
    import sys
    from pathlib import Path

    import impls

    impls.skip_unless("fused")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "profile_kernel.py"), "--case", "tiny", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(root / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for section in ("inside the kernel's C call", "Python around it", "kernel / floor", "kernel, data in L2",
                    "floor, data from DRAM", "of which the C call", "32 MiB"):
        assert section in proc.stdout, (section, proc.stdout)


def test_bench_text_counts_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    """One thread and one round read as such (the header used to say "1 threads")."""
    assert bench.main(["--case", "tiny", "--rounds", "1", "--threads", "1", "--no-progress",
                       "--rows", "lamb-fused,adamw-fused"]) == 0
    out = capsys.readouterr().out
    assert ", 1 thread; kernel:" in out and " params, 1 round, fused kernel" in out
    assert "1 threads" not in out and "1 rounds" not in out
    assert [bench.plural(n, "row") for n in (0, 1, 2)] == ["0 rows", "1 row", "2 rows"]
