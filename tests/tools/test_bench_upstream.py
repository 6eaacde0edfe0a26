"""tools/bench_upstream.py at a tiny size: the real bsbr package, our eager flavor and its
ONNX export, each length and engine in its own child process, agree and are measured."""

from __future__ import annotations

import pytest


def test_bench_upstream_smoke(run_study):
    """Every engine at both smoke lengths is timed, its memory taken, and matches the package."""
    pytest.importorskip("bsbr")
    result, report = run_study("bench_upstream", name="upstream_bench")
    engines = ["package", "eager", "ort-cpu"]
    assert [(r["length"], r["engine"]) for r in result["results"]] == [(n, e) for n in (64, 100) for e in engines]
    for row in result["results"]:
        assert "error" not in row, row
        assert row["iters"] >= 3 and 0 < row["p10_ms"] <= row["p50_ms"]
        assert 0 < row["rss_before_mib"] <= row["peak_rss_mib"] and row["forward_peak_mib"] >= 0
        expected = 0.0 if row["engine"] == "package" else 1e-4  # the package against itself, then round-off
        assert row["max_abs_vs_package"] <= expected, row
    assert result["threads"] == 1 and result["machine"]["threads"] == 1
    assert result["machine"]["matmul_gflops"] > 0 and len(result["machine"]["loadavg_end"]) == 3
    assert "| 100 | ort-cpu |" in report and "--smoke" in report
