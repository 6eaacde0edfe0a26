"""tools/gpu_check.py at a tiny size, on the CPU: the script the GPU machine runs, every
section of it."""

from __future__ import annotations

MODELS = ["bsbr-tiny", "bsbr-stdlib"]


def test_gpu_check_smoke(run_study, tmp_path):
    """Nothing skipped: parity of every engine (bits per byte for the byte-level model),
    latency at every batch and length, decode at every context, attention, the product's
    bench and the compiled engine, each row where the report tables it."""
    data, report = run_study("gpu_check")
    assert data["smoke"] and data["skipped"] == [] and data["machine"]["matmul_gflops"] > 0
    rows = {}
    for row in data["rows"]:
        rows.setdefault(row["what"], []).append(row)
    engines = [(m, e) for m in MODELS for e in ("eager-fp32", "eager-bf16")] + [("bsbr-tiny", "compile-fp32")]
    assert [(r["model"], r["engine"]) for r in rows["parity"]] == engines
    for r in rows["parity"]:
        assert ("bits_per_byte" in r) == (r["model"] == "bsbr-stdlib")
        if r["engine"] == "eager-fp32":  # the GPU's fp32 reference is this very engine on the CPU
            assert r["vs_gpu_fp32"]["max_abs"] == 0 and r["vs_cpu_fp64"]["max_abs"] < 1e-4
    sizes = [(b, n) for b in (1, 2) for n in (70, 130)]
    assert [(r["model"], r["engine"], r["batch"], r["length"]) for r in rows["latency"]] == [
        (*engine, *size) for engine in engines for size in sizes
    ]
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 for r in rows["latency"])
    assert [(r["model"], r["context"]) for r in rows["decode"]] == [(m, c) for m in MODELS for c in (8, 40)]
    assert all(0 < r["ms_per_token"] <= r["p90_ms"] for r in rows["decode"])
    assert [r["length"] for r in rows["attention"]] == [128, 300]
    assert all(r["bsbr_ms"] > 0 and r["sdpa_ms"] > 0 for r in rows["attention"])
    (bench,) = rows["product bench"]
    assert bench["validated"] and (tmp_path / "product_bench" / "report.json").is_file()
    assert "| bsbr-tiny | compile-fp32 | 70 |" in report and "| bsbr-stdlib | 40 |" in report
    assert "validation passed" in report
