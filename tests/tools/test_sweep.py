"""tools/sweep.py at a tiny size: every engine, the SDPA graph and decode measured at the
smoke lengths, and each target computed from them."""

from __future__ import annotations

import math


def test_sweep_smoke(run_study, tiny_export, tmp_path):
    """All four engines, SDPA and decode at every smoke length; all eight targets measured."""
    export_dir, _ = tiny_export
    result, report = run_study("sweep", "--export", export_dir, "--work", tmp_path / "work", name="sweep_bsbr-tiny")
    lengths = [32, 64, 128, 256]
    assert result["model"] == "bsbr-tiny" and result["lengths"] == lengths
    assert set(result["engines"]) == {"eager", "ort-cpu-all", "ort-cpu-disabled", "ort-cpu-int8"}
    for engine in result["engines"].values():
        assert engine["ok"] and [t["length"] for t in engine["timings"]] == lengths
        assert all(0 < t["p50_ms"] <= t["p90_ms"] and t["peak_rss_mib"] > 0 for t in engine["timings"])
    assert [t["length"] for t in result["sdpa_ort"]["timings"]] == lengths
    assert [d["context"] for d in result["decode"]] == lengths
    assert all(d["step_p50_ms"] > 0 and d["speedup"] > 0 for d in result["decode"])
    assert result["flops_length"] == 128 and result["model_gflops"] > 0 and result["machine"]["matmul_gflops"] > 0
    assert 0 < result["int8"]["top1"] <= 1
    assert len(result["targets"]) == 8
    assert all(math.isfinite(t["measured"]) and t["measured"] > 0 for t in result["targets"])
    assert "| 256 |" in report and "| ORT / eager latency, L=32 |" in report and "--smoke" in report
