"""tools/sweep_precision.py at a tiny size: the trained bsbr-stdlib optimized and benched
at short lengths, every engine scored in bits per byte on held-out text."""

from __future__ import annotations


def test_sweep_precision_smoke(run_study, stdlib_export, tmp_path):
    """Each smoke engine timed and scored at every length; int8 both ways, the targets listed."""
    export_dir, _ = stdlib_export
    result, report = run_study(
        "sweep_precision", "--export", export_dir, "--work", tmp_path / "work", name="sweep_precision_bsbr-stdlib"
    )
    lengths = ["64", "128", "256"]
    assert result["model"] == "bsbr-stdlib" and result["lengths"] == [64, 128, 256]
    assert {"eager", "ort-cpu-all", "ort-cpu-int8"} <= set(result["engines"])
    rows = {row["engine"]: row for row in result["table"]}
    for engine in result["engines"]:
        row = rows[engine]
        assert list(row["latency_ms"]) == lengths and all(t["p50"] > 0 for t in row["latency_ms"].values())
        # A trained byte-level model: far better than a uniform guess (8 bits) at every length.
        assert list(row["bits_per_byte"]) == lengths and all(0 < b < 8 for b in row["bits_per_byte"].values())
    assert [q["method"] for q in result["int8"]] == ["dynamic", "static"]
    assert result["recommendation"]["engine"] in result["engines"]
    assert result["flops_length"] == 128 and result["model_gflops"] > 0 and result["machine"]["matmul_gflops"] > 0
    assert len(result["targets"]) == 7
    assert "| ratio | measured | target | met |" in report and "--smoke" in report
