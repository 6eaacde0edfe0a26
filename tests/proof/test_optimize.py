"""`optimize`: ORT levels measured and the fastest passing one saved; int8 with
sensitivity-chosen fp32 nodes; both recorded in the manifest and validated."""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import run_cli

from bsbr_export.proof.optimize import quantize_int8, weight_matmuls
from bsbr_export.proof.validate import validate_export
from bsbr_export.runtime.onnx import available_providers


def test_weight_matmuls_are_labelled_by_module(tiny_export):
    out, _ = tiny_export
    modules = weight_matmuls(out / "model.onnx")
    # 2 layers x (q, k, v, out, ff.0, ff.2), and the tied LM head; the meta query/key
    # projections read 2-D [batch*chunks, hidden] boundary rows, so they export as Gemm.
    assert len(modules) == 13
    assert {"blocks.0.attn.out_proj", "blocks.1.ff.2", "blocks.1.attn.q_proj", "lm_head"} <= set(modules.values())


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


def test_fp16_graph_keeps_positions_fp32_and_validates(capsys, export_copy):
    code, out, err = run_cli(capsys, "optimize", export_copy, "--length", "40", "--no-int8", "--fp16")
    assert code == 0, err
    assert "fp16: wrote model.fp16.onnx" in out
    settings = {a["name"]: a for a in json.loads((export_copy / "manifest.json").read_text())["artifacts"]}[
        "model.fp16.onnx"
    ]["settings"]
    assert settings["precision"] == "fp16" and settings["target_provider"] == "CUDAExecutionProvider"
    graph = onnx.load(str(export_copy / "model.fp16.onnx")).graph
    kept = {n.name: n.op_type for n in graph.node if n.name in settings["fp32_nodes"]}
    assert {"Sin", "Cos", "Mul"} <= set(kept.values())
    float16 = onnx.TensorProto.FLOAT16
    assert all(w.data_type == float16 for w in graph.initializer if w.name.endswith("weight"))
    assert all(v.type.tensor_type.elem_type != float16 for v in [*graph.input, *graph.output])
    # ORT's CPU provider runs fp16 graphs too: long lengths catch angles rounded to fp16
    # (that moved logits by 5e-2 at L=2048, five times the fp16 tolerance).
    result = validate_export(export_copy, lengths=[5, 17, 2048], batches=(1,), providers=["CPUExecutionProvider"])
    fp16 = next(c for c in result.checks if c.artifact == "model.fp16.onnx")
    assert fp16.passed and fp16.parity.max_abs > 0


@pytest.mark.skipif("CUDAExecutionProvider" in available_providers(), reason="this machine has the CUDA provider")
def test_fp16_is_skipped_without_cuda_unless_asked(capsys, export_copy):
    code, out, err = run_cli(capsys, "optimize", export_copy, "--length", "40", "--no-int8")
    assert code == 0, err
    assert "fp16: skipped" in out and not (export_copy / "model.fp16.onnx").exists()


@pytest.mark.skipif("CUDAExecutionProvider" not in available_providers(), reason="CUDAExecutionProvider not available")
def test_fp16_on_cuda(capsys, export_copy):
    code, out, err = run_cli(capsys, "optimize", export_copy, "--length", "40", "--no-int8")
    assert code == 0 and "fp16: wrote" in out, err
    result = validate_export(export_copy, lengths=[5, 17, 2048], batches=(1, 2), providers=["CUDAExecutionProvider"])
    assert result.passed, [c.parity.failures for c in result.checks if not c.passed]


def test_int8_measures_sensitivities_only_when_all_int8_misses(export_copy):
    """All-int8 within the target: one step, no per-MatMul runs. Out of it: every MatMul's
    sensitivity measured, and the ones kept in fp32 are the most sensitive, in order."""
    loose = quantize_int8(export_copy, length=40, target_top1=0.5)
    assert loose.reached and len(loose.steps) == 1 and loose.fp32_nodes == () and loose.sensitivity == {}
    # 1024 positions of random weights' near-tied logits: int8 flips a few of their argmaxes.
    tight = quantize_int8(export_copy, length=512, batch=2, target_top1=1.0)
    assert set(tight.sensitivity) == set(tight.modules) and tight.steps[0].top1 < 1.0
    ranked = sorted(tight.sensitivity, key=tight.sensitivity.get, reverse=True)
    assert tight.fp32_nodes and list(tight.fp32_nodes) == ranked[: len(tight.fp32_nodes)]
    assert tight.reached and [s.kept_fp32 for s in tight.steps] == list(range(len(tight.fp32_nodes) + 1))
