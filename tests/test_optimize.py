"""`optimize`: ORT levels measured and the fastest passing one saved; int8 with
sensitivity-chosen fp32 nodes; both recorded in the manifest and validated."""

from __future__ import annotations

import json


from bsbr_export.optimize import weight_matmuls
from bsbr_export.validate import validate_export
from conftest import run_cli


def test_weight_matmuls_are_labelled_by_module(tiny_export):
    out, _ = tiny_export
    modules = weight_matmuls(out / "model.onnx")
    # 2 layers x (q, k, v, meta query, meta key, out, ff.0, ff.2), and the tied LM head
    assert len(modules) == 17
    assert {"blocks.0.attn.out_proj", "blocks.1.ff.2", "blocks.1.attn.meta_query_proj", "lm_head"} <= set(
        modules.values()
    )


def test_optimize_writes_and_records_both_graphs(capsys, export_copy):
    code, out, err = run_cli(capsys, "optimize", export_copy, "--length", "40", "--target-top1", "0.9")
    assert code == 0, err
    assert "<- saved" in out and "int8" in out
    manifest = json.loads((export_copy / "manifest.json").read_text())
    artifacts = {a["name"]: a for a in manifest["artifacts"]}
    optimized = artifacts["model.optimized.onnx"]["settings"]
    assert optimized["ort_level"] in ("disabled", "basic", "extended", "all")
    assert optimized["hardware_specific"] == (optimized["ort_level"] in ("extended", "all"))
    int8 = artifacts["model.int8.onnx"]["settings"]
    assert int8["precision"] == "int8"
    assert all(m.startswith("blocks.") for m in int8["fp32_modules"])
    # the new artifacts validate (int8 against its own, documented tolerance)
    result = validate_export(export_copy, lengths=[5, 17], batches=(2,))
    checked = {c.artifact for c in result.checks}
    assert {"model.optimized.onnx", "model.int8.onnx"} <= checked
    assert result.passed


def test_optimize_needs_an_export_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "optimize", tmp_path)
    assert code == 2 and "no manifest.json" in err
