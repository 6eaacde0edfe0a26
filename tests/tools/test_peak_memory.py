"""tools/peak_memory.py at a tiny size: each length measured in its own process, and the
report's rows are the figures the result holds."""

from __future__ import annotations


def test_peak_memory_smoke(run_study):
    """Both smoke lengths measured, each forward adding memory above the RSS before it."""
    result, report = run_study("peak_memory", name="peak_memory_bsbr-tiny")
    assert result["model"] == "bsbr-tiny" and [row["length"] for row in result["rows"]] == [64, 256]
    for row in result["rows"]:
        assert 0 < row["rss_before_mib"] <= row["peak_rss_mib"]
        assert row["forward_extra_mib"] == row["peak_rss_mib"] - row["rss_before_mib"]
    assert result["machine"]["matmul_gflops"] > 0
    assert "| 64 |" in report and "| 64 -> 256 |" in report and "--smoke" in report
