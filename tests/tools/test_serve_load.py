"""tools/serve_load.py at a tiny size: the study serves bsbr-tiny from a real tritonserver
and times every (context, concurrency) cell it was asked for."""

from __future__ import annotations


def test_serve_load_smoke(run_study, tiny_export, triton_env):
    """Every cell of --smoke's grid is measured over the step model, with positive, ordered
    figures, the server healthy after, and each cell reported."""
    export_dir, _ = tiny_export
    result, report = run_study(
        "serve_load", "--export", export_dir, "--triton-env", triton_env.root, name="serve_load_bsbr-tiny"
    )
    assert [(c["context"], c["concurrency"]) for c in result["cells"]] == [(20, 1), (20, 2), (40, 1), (40, 2)]
    for cell in result["cells"]:
        assert cell["tokens_per_sequence"] == 4 and cell["wall_s"] > 0
        assert cell["tokens_per_s"] > 0 and 0 < cell["p50_ms"] <= cell["p99_ms"]
    assert result["healthy_after"] is True and result["server_start_s"] > 0
    assert result["machine"]["matmul_gflops"] > 0
    assert "bsbr-tiny_streaming_python" in report and "| 40 | 2 |" in report and "--smoke" in report
