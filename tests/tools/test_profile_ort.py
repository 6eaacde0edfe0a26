"""tools/profile_ort.py at a tiny size: ORT's profiler read back into categories that
add up, and the costliest nodes timed alone."""

from __future__ import annotations

import math


def test_profile_ort_smoke(run_study, tiny_onnx_export):
    """Each smoke length profiled: categories sum to the kernel time, op types too, nodes timed alone."""
    result, report = run_study("profile_ort", "--export", tiny_onnx_export, name="profile_bsbr-tiny")
    assert result["model"] == "bsbr-tiny" and [r["length"] for r in result["results"]] == [64, 128]
    for r in result["results"]:
        assert r["p50_ms"] > 0 and r["kernel_ms"] > 0
        assert math.isclose(sum(r["categories"].values()), r["kernel_ms"])
        assert math.isclose(sum(r["op_types"].values()), r["kernel_ms"])
        assert "dense GEMMs (projections, feed-forward, LM head)" in r["categories"]
        assert 0 < r["dense_flop_share"] < 1 and r["dense_gemm_gflops"] > 0
        assert r["alone"] and all(a["alone_ms"] > 0 and a["in_graph_ms"] > 0 for a in r["alone"])
        assert f"## L = {r['length']}:" in report
    assert result["machine"]["matmul_gflops"] > 0
    assert "| dense GEMMs (projections, feed-forward, LM head) |" in report and "--smoke" in report
