"""Bring your own model: `export_module` on the kinds of models users write, every
output checked at lengths and batches the export never saw."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import user_models

from bsbr_export import ModelSpec, UserError, export_module, spec_for
from bsbr_export.export.checks import DoesNotGeneralize
from bsbr_export.proof.validate import validate_export

C = 4  # chunk size of every model in user_models
LENGTHS = [1, C - 1, C + 1, 3 * C + 2]  # none a multiple of c
BATCHES = [1, 3]


def ort_outputs(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})))


def eager_outputs(module, spec, feeds):
    from bsbr_export.model.graphs import FullGraph

    graph = FullGraph(module, spec)
    with torch.no_grad():
        out = graph(*(torch.from_numpy(feeds[n]) for n in graph.input_names))
    out = out if isinstance(out, tuple) else (out,)
    return {name: t.numpy() for name, t in zip(spec.output_names, out)}


def feeds_for(spec, batch, length, seed):
    from bsbr_export.model.probe import example_inputs

    return {k: v.numpy() for k, v in example_inputs(spec, batch, length, seed=seed).items()}


def error_table(path, module, spec):
    """max abs error of every output over LENGTHS x BATCHES (fresh inputs)."""
    table = {}
    for length in LENGTHS:
        for batch in BATCHES:
            feeds = feeds_for(spec, batch, length, seed=100 + length + batch)
            want, got = eager_outputs(module, spec, feeds), ort_outputs(path, feeds)
            for name in spec.output_names:
                table[(name, batch, length)] = float(np.abs(want[name] - got[name]).max())
    return table


@pytest.fixture(scope="module")
def value_head_export(tmp_path_factory):
    module = user_models.value_head_model()
    out = tmp_path_factory.mktemp("byo") / "value-head"
    result = export_module(module, out, streaming=True)
    return module, out, result


def test_value_head_spec_has_both_outputs_and_native_state():
    spec = spec_for(user_models.value_head_model())
    assert spec.chunk_size == C
    assert [(o.name, o.per_position, o.logits) for o in spec.outputs] == [
        ("logits", True, True),
        ("value", True, False),
    ]
    assert spec.inputs[1].name == "attention_mask" and spec.inputs[1].optional
    assert spec.state.inputs["past.0.meta_keys"] == ["batch", 2, "past_chunks", 8]
    assert spec.state.inputs["past.1.keys"] == ["batch", 2, "past_tokens", 8]


def test_value_head_every_output_matches(value_head_export):
    module, out, result = value_head_export
    assert result.passed
    spec = ModelSpec.from_dict(json.loads((out / "manifest.json").read_text())["spec"])
    table = error_table(out / "model.onnx", module, spec)
    assert {name for name, _, _ in table} == {"logits", "value"}
    assert max(table.values()) <= 1e-4, table
    # TorchScript returns both outputs too.
    traced = torch.jit.load(str(out / "model.pt"))
    ids = torch.randint(0, 53, (3, 3 * C + 2), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits, value = traced(ids, torch.ones_like(ids))
        want = module(ids)
    assert (logits - want["logits"]).abs().max() <= 1e-4 and (value - want["value"]).abs().max() <= 1e-4


def test_a_wrong_second_head_is_caught(value_head_export):
    """A trace whose value head has other weights must fail: every output is compared."""
    from bsbr_export.export.torchscript import check_trace
    from bsbr_export.model.graphs import FullGraph

    module, _, _ = value_head_export
    other = user_models.value_head_model()
    with torch.no_grad():
        other.value.bias.add_(0.5)  # (a shift of every weight would cancel: its input is layer-normed)
    spec = spec_for(module)
    ids = torch.randint(0, 53, (2, 2 * C + 2))
    wrong = torch.jit.trace(FullGraph(other, spec), (ids, torch.ones_like(ids)))
    with pytest.raises(DoesNotGeneralize, match="value max abs"):
        check_trace(module, wrong, "full", spec)


def test_value_head_streaming_graph(value_head_export):
    module, out, _ = value_head_export
    report = validate_export(out, module=user_models.value_head_model(), lengths=[C + 1, 3 * C + 2], batches=(1, 3))
    assert report.passed
    streamed = [c for c in report.checks if c.artifact == "model.streaming.onnx"]
    assert streamed and all(c.passed for c in streamed)
    names = {d.name for c in streamed for r in c.parity.results for d in r.diffs}
    assert {"logits", "value", "present.1.chunk_states"} <= names


def test_pooled_output_is_compared_whole(tmp_path):
    module = user_models.pooled_model()
    spec = spec_for(module)
    assert [(o.name, o.per_position) for o in spec.outputs] == [("output", False)]
    result = export_module(module, tmp_path / "pooled")
    assert result.passed
    table = error_table(tmp_path / "pooled" / "model.onnx", module, spec)
    assert max(table.values()) <= 1e-5, table
    masked = [r for a in result.artifacts for r in a.parity.results if r.case.masked]
    assert masked and all(d.name == "output" for r in masked for d in r.diffs)


def test_upstream_layers_are_swapped_and_exported(tmp_path):
    pytest.importorskip("bsbr", reason="the upstream bsbr 0.1.1 package is not installed")
    module = user_models.upstream_classifier()
    ids = torch.randint(0, 41, (3, 3 * C + 2), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = module(ids)
    result = export_module(module, tmp_path / "clf", formats=("onnx", "torchscript"))
    assert result.passed and "NOT causal" in result.note
    manifest = json.loads((tmp_path / "clf" / "manifest.json").read_text())
    assert [s["module"] for s in manifest["swapped"]] == ["layers.0", "layers.1"]
    assert all(s["max_abs"] < 1e-5 for s in manifest["swapped"])
    got = ort_outputs(tmp_path / "clf" / "model.onnx", {"input_ids": ids.numpy()})["output"]
    assert np.abs(got - before.numpy()).max() <= 1e-5  # the user's own, unswapped numbers
    with pytest.raises(UserError, match="not causal"):
        export_module(user_models.upstream_classifier(), tmp_path / "clf-stream", streaming=True)


def test_a_chunk_loop_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(DoesNotGeneralize, match="doctor"):
        export_module(user_models.chunk_loop(), tmp_path / "broken", chunk_size=C)
    assert not list(tmp_path.iterdir())


def test_spec_json_round_trip_and_mismatch(tmp_path):
    module = user_models.pooled_model()
    spec = spec_for(module)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    bad = ModelSpec.from_dict({**spec.to_dict(), "inputs": [{"name": "tokens", "values": "token_ids", "high": 53}]})
    with pytest.raises(UserError, match="tokens are not parameters"):
        export_module(module, tmp_path / "x", spec=bad)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def decoder_export(tmp_path_factory):
    module = user_models.rotary_decoder()
    out = tmp_path_factory.mktemp("byo") / "decoder"
    return module, out, export_module(module, out, streaming=True)


def test_rotary_gqa_decoder_full_and_streaming(decoder_export):
    module, out, result = decoder_export
    assert result.passed, [f for a in result.artifacts for f in a.parity.failures]
    spec = spec_for(module)
    assert spec.outputs[0].logits and spec.chunk_size == C
    assert spec.state.inputs["past.0.keys"] == ["batch", 2, "past_tokens", 8]  # kv heads only
    assert spec.state.inputs["past.0.retrieved"] == ["batch", 4, 8, 8]  # per query head
    names = {a.name for a in result.artifacts}
    assert {"model.onnx", "model.pt", "model.streaming.onnx", "model.streaming.pt"} <= names
    table = error_table(out / "model.onnx", module, spec)
    assert max(table.values()) <= 1e-4, table
    # Streaming graph rolled out in uneven pieces equals the full forward.
    report = validate_export(out, module=user_models.rotary_decoder(), lengths=[C + 1, 3 * C + 2], batches=(1, 3))
    assert report.passed


def test_upstream_model_object_reads_heads_and_chunk_size(tmp_path):
    bsbr = pytest.importorskip("bsbr", reason="the upstream bsbr 0.1.1 package is not installed")
    from bsbr_export import from_upstream

    torch.manual_seed(12)
    theirs = bsbr.BSBRModel(
        vocab_size=50, hidden_dim=16, num_layers=2, num_heads=4, chunk_size=C, ff_dim=32, dropout=0.0
    ).eval()
    ours = from_upstream(theirs)
    assert (ours.config.num_heads, ours.config.chunk_size) == (4, C)
    ids = torch.randint(0, 50, (3, 3 * C + 2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids)).abs().max() <= 1e-5
    result = export_module(theirs, tmp_path / "up", formats=("onnx",))
    assert result.passed and "NOT causal" in result.note
    got = ort_outputs(
        tmp_path / "up" / "model.onnx", {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    )
    with torch.no_grad():
        assert np.abs(got["hidden_states"] - theirs(ids).numpy()).max() <= 1e-5


def test_a_broken_block_is_named_with_the_users_module_names(decoder_export, tmp_path):
    """A graph whose second block went wrong is localized to `layers.1`, the user's name."""
    import shutil

    import onnx
    from conftest import rehash, weight_used_only_in

    _, out, _ = decoder_export
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    proto = onnx.load(str(broken / "model.onnx"))
    weight = weight_used_only_in(proto, "model.layers.1", block_path="layers")
    values = onnx.numpy_helper.to_array(weight).copy()
    weight.CopyFrom(onnx.numpy_helper.from_array(values + 0.5, weight.name))
    onnx.save(proto, str(broken / "model.onnx"))
    rehash(broken, "model.onnx")
    report = validate_export(broken, module=user_models.rotary_decoder(), lengths=[3 * C + 2], batches=(2,))
    check = next(c for c in report.checks if c.artifact == "model.onnx")
    assert not check.passed and check.first_bad_layer == "layers.1"


def test_bench_rebuilds_a_module_ref(capsys, tmp_path):
    """bench on a module reference: export, validate and time with the user's eager module."""
    from pathlib import Path

    from conftest import run_cli

    ref = f"{Path(user_models.__file__)}:pooled_model"
    out = tmp_path / "bench"
    code, stdout, err = run_cli(
        capsys,
        "bench",
        ref,
        "--trust-code",
        "--out",
        out,
        "--formats",
        "onnx,torchscript",  # what the engines below run: no AOTInductor compile, no lowering
        "--lengths",
        "9",
        "--engines",
        "eager,torchscript,ort-cpu-all",
        "--decode",
        "",
        "--validation-lengths",
        "6",
        "--budget",
        "0.05",
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = {row["engine"]: row for row in report["table"]}
    assert set(rows) == {"eager", "torchscript", "ort-cpu-all"}
    assert all(row["status"] == "✅" and row["max_abs"] <= 1e-5 for row in rows.values()), rows
