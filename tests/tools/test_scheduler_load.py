"""tools/scheduler_load.py at a tiny size: the study runs end to end and its figures say
what the scheduler did (a prompt over the budget spans iterations)."""

from __future__ import annotations


def test_scheduler_load_smoke(run_study, tiny_export):
    export_dir, _ = tiny_export
    result, report = run_study("scheduler_load", "--export", export_dir)
    whole, budgeted = result["stall"]
    assert whole["budget"] == "whole" and whole["join_iterations"] == 1
    assert budgeted["budget"] == 80 and budgeted["join_iterations"] > 1  # 300 tokens in pieces of <= 80
    for row in result["stall"]:
        assert 0 < row["alone_p50_ms"] <= row["alone_p99_ms"]
        assert 0 < row["join_p50_ms"] <= row["join_p99_ms"] <= row["join_max_ms"]
    assert result["lone"]["ttft_s"] > 0 and result["lone"]["forward_s"] > 0
    assert result["many_vs_one"]["many_tokens_s"] > 0 and result["many_vs_one"]["one_tokens_s"] > 0
    assert set(result["per_token"]) == {"70", "200"}
    assert result["machine"]["matmul_gflops"] > 0
    assert "| 80 |" in report and "--smoke" in report
