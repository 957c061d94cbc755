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
