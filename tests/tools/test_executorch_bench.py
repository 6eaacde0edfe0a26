"""tools/executorch_bench.py at a tiny size: bsbr-tiny lowered both ways, exported, checked
against eager and timed."""

from __future__ import annotations

import pytest


def test_executorch_bench_smoke(run_study):
    """Both lowerings counted at both lengths (the shipped one delegating more), the .pte
    matching eager at every length and batch, and both engines timed at 1 and 2 threads."""
    pytest.importorskip("executorch", reason='the executorch extra is not installed (pip install ".[executorch]")')
    result, report = run_study("executorch_bench", name="executorch_bsbr-tiny")
    assert result["model"] == "bsbr-tiny" and result["lengths"] == [16, 40]
    assert result["limits"] == {"max_length": 77, "max_batch": 2}
    standard, shipped = result["delegation"]
    assert (standard["stage"], shipped["stage"]) == ("standard", "shipped")
    for stage in (standard, shipped):
        assert stage["delegate calls"] > 0 and stage["xnnpack nodes"] > 0
        assert list(stage["flops"]) == ["16", "40"]
        assert all(0 < share["delegated"] <= 1 and share["gflop"] > 0 for share in stage["flops"].values())
    assert all(shipped["flops"][n]["delegated"] > standard["flops"][n]["delegated"] for n in ("16", "40"))
    assert result["export"]["bytes"] > 0
    assert [(r["length"], r["batch"]) for r in result["parity"]] == [
        (length, batch) for length in (1, 7, 8, 9, 29, 40, 77) for batch in (1, 2)
    ]
    assert all(r["max_abs"] < 1e-4 * max(1.0, r["logit_scale"]) for r in result["parity"])
    assert [(r["threads"], r["length"]) for r in result["latency"]] == [(1, 16), (1, 40), (2, 16), (2, 40)]
    assert all(r["eager_ms"] > 0 and r["executorch_ms"] > 0 for r in result["latency"])
    assert result["machine"]["matmul_gflops"] > 0
    assert "| shipped |" in report and "| 2 | 77 |" in report
