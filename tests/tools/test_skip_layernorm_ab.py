"""tools/skip_layernorm_ab.py at a tiny size: the rewrite fuses, matches the exported
graph, and every graph is timed once per round at each length."""

from __future__ import annotations


def test_skip_layernorm_ab_smoke(run_study, tiny_onnx_export, tmp_path):
    """Both rewrites fuse nodes and agree with the export; each round times each graph."""
    result, report = run_study(
        "skip_layernorm_ab",
        "--export",
        tiny_onnx_export,
        "--work",
        tmp_path / "work",
        name="skip_layernorm_ab_bsbr-tiny",
    )
    graphs = ["exported", "skip-layernorm", "skip-layernorm+bias"]
    assert result["lengths"] == [32, 64] and result["rounds"] == 2
    assert result["fused_nodes"]["skip-layernorm"] > 0 and result["fused_nodes"]["skip-layernorm+bias"] > 0
    assert result["max_abs_vs_exported"]["exported"] == 0
    assert all(result["max_abs_vs_exported"][g] < 1e-4 for g in graphs)
    for graph in graphs:
        rounds = result["p50_ms_per_round"][graph]
        assert set(rounds) == {"32", "64"} and all(len(p50s) == 2 and min(p50s) > 0 for p50s in rounds.values())
        assert result["median_of_rounds_ms"][graph]["64"] > 0
    assert result["machine"]["matmul_gflops"] > 0
    assert all(f"| {g} | " in report for g in graphs) and "--smoke" in report
