"""tools/batching_load.py at a tiny size: the study runs end to end and times every
(context, concurrency) cell it was asked for, beside one generation on the decode graph."""

from __future__ import annotations


def test_batching_load_smoke(run_study, tiny_export):
    """Every cell of --smoke's grid is measured, with positive, ordered figures, and reported."""
    export_dir, _ = tiny_export
    result, report = run_study("batching_load", "--export", export_dir)
    (model,) = result["results"]
    assert model["model"] == "bsbr-tiny"
    assert [(r["context"], r["concurrency"]) for r in model["rows"]] == [(20, 1), (20, 2), (40, 1), (40, 2)]
    for row in model["rows"]:
        assert row["tokens_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] and row["single_decode_ms"] > 0
    assert result["tokens"] == 4 and result["threads"] == 2 and result["machine"]["matmul_gflops"] > 0
    assert "## bsbr-tiny" in report and "| 40 | 2 |" in report and "--smoke" in report
