"""Retrieval form `gated` through every format: the same writers, the same self-check at
lengths around the chunk size, then `validate` at lengths and batches the export never saw.
Form `sum` goes through every format in the other export tests (bsbr-tiny)."""

from __future__ import annotations

import json

import pytest
from conftest import EXECUTORCH_LIMITS

from bsbr_export.export.pipeline import export_model
from bsbr_export.formats import FORMATS
from bsbr_export.model.checkpoint import load_model
from bsbr_export.proof.optimize import optimize_export
from bsbr_export.proof.validate import validate_export

GATED = "bsbr-tiny-gated"  # bsbr-tiny (chunk 8) with retrieval = "gated"
UNSEEN = dict(lengths=[3, 9, 22], batches=(1, 3))  # none a chunk multiple; export checks 2 x (k*8 + r)


def test_preset_is_bsbr_tiny_with_the_gated_form():
    gated, plain = load_model(GATED), load_model("bsbr-tiny")
    assert gated.config.retrieval == "gated" and plain.config.retrieval == "sum"
    assert {k: v for k, v in gated.config.to_dict().items() if k != "retrieval"} == {
        k: v for k, v in plain.config.to_dict().items() if k != "retrieval"
    }
    extra = set(gated.state_dict()) - set(plain.state_dict())
    assert extra == {f"blocks.{i}.attn.retrieval_{p}" for i in range(2) for p in ("gate", "norm")}


@pytest.mark.parametrize("fmt", [f for f in FORMATS.values() if f.name != "onnx"], ids=lambda f: f.name)
def test_gated_form_exports_and_validates(fmt, tmp_path):
    if not fmt.installed:
        pytest.skip(f"{fmt.requires} is not installed")
    out = tmp_path / fmt.name
    result = export_model(GATED, out, [fmt], streaming=fmt.streaming, **fmt.own(EXECUTORCH_LIMITS))
    assert result.passed, [f for a in result.artifacts for f in a.parity.failures]
    assert {a.kind for a in result.artifacts} >= set(fmt.kinds) - set(fmt.optional_kinds)
    report = validate_export(out, **UNSEEN)
    assert report.passed and {c.artifact for c in report.checks} == {a.name for a in result.artifacts}


def test_gated_onnx_every_kind_and_optimized_graph(tmp_path):
    """Full, streaming, row and decode graphs; then optimize's ORT level and int8 graphs,
    each validated (int8 against its own tolerance)."""
    out = tmp_path / "onnx"
    result = export_model(GATED, out, [FORMATS["onnx"]], streaming=True)
    assert result.passed
    assert {a.kind for a in result.artifacts} == {"full", "streaming", "rows", "decode"}
    optimize_export(out, length=40, target_top1=0.9, static_int8=True)
    report = validate_export(out, **UNSEEN)
    written = {a["name"] for a in json.loads((out / "manifest.json").read_text())["artifacts"]}
    assert {"model.optimized.onnx", "model.int8.onnx", "model.int8-static.onnx"} <= written
    assert report.passed and {c.artifact for c in report.checks} >= written - {"model.rows.onnx"}
