"""tools/generate_load.py at a tiny size: the study streams generations from a real
tritonserver's generate model, beside the same graphs called directly."""

from __future__ import annotations


def test_generate_load_smoke(run_study, tiny_export, triton_env):
    """Every cell of --smoke's grid streams with positive, ordered figures, the direct
    references are measured at each context and concurrency, and the report has them."""
    export_dir, _ = tiny_export
    result, report = run_study("generate_load", "--export", export_dir, "--triton-env", triton_env.root)
    (model,) = result["results"]
    assert model["model"] == "bsbr-tiny" and model["healthy_after"] is True and model["perf_analyzer"] == []
    assert [(c["context"], c["concurrency"]) for c in model["generate"]] == [(20, 1), (20, 2), (40, 1), (40, 2)]
    for cell in model["generate"]:
        assert cell["tokens_per_s"] > 0 and cell["window_tokens"] > 0 and cell["ttft_p50_ms"] > 0
        assert 0 < cell["itl_p50_ms"] <= cell["itl_p99_ms"]
    direct = model["direct"]
    assert set(direct["decode_ms"]) == {"20", "40"} and all(ms > 0 for ms in direct["decode_ms"].values())
    assert direct["full_4096_ms"] > 0
    assert [p["concurrency"] for p in direct["step_parts"]] == [1, 2]
    for part in direct["step_parts"]:  # medians of each part: on a busy machine one can pass another
        assert part["graph_ms"] > 0 and part["feed_ms"] > 0 and part["step_ms"] > 0
    assert result["tokens"] == 8 and result["machine"]["matmul_gflops"] > 0
    assert "## bsbr-tiny" in report and "| 40 | 2 |" in report and "--smoke" in report
