"""Exported graphs against the eager model, computed here independently of validate.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import random_ids, tiny_config

from bsbr_export import BSBRConfig, UserError, build_model, load_model
from bsbr_export.export.onnx import export_onnx
from bsbr_export.export.torchscript import check_trace, export_torchscript
from bsbr_export.formats import FORMATS, artifact_name, export_jobs
from bsbr_export.model.graphs import FullGraph, flatten_state
from bsbr_export.model.probe import spec_for
from bsbr_export.runtime.onnx import OnnxRunner

C = 8  # bsbr-tiny's chunk size
LENGTHS = [1, C - 1, C, C + 1, 3 * C + 5, 2048]


def ort_session(path, provider="CPUExecutionProvider"):
    return ort.InferenceSession(str(path), providers=[provider])


@pytest.mark.parametrize("provider", ["CPUExecutionProvider", "CUDAExecutionProvider"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_eager(tiny_export, length, batch, provider):
    if provider not in ort.get_available_providers():
        pytest.skip(f"{provider} not available on this machine")
    out, _ = tiny_export
    model = load_model("bsbr-tiny")
    ids = random_ids(model.config, batch, length, seed=100 + length)
    got = ort_session(out / "model.onnx", provider).run(
        None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    )[0]
    want = model(ids).detach().numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_torchscript_matches_eager(tiny_export, length, batch):
    out, _ = tiny_export
    model = load_model("bsbr-tiny")
    traced = torch.jit.load(str(out / "model.pt"))
    ids = random_ids(model.config, batch, length, seed=200 + length)
    with torch.no_grad():
        got = traced(ids, torch.ones_like(ids))
        want = model(ids)
    assert (got - want).abs().max() <= 1e-4


def test_padded_batch_with_mask(tiny_export):
    out, _ = tiny_export
    model = load_model("bsbr-tiny")
    lengths = [3, 17, 29]
    ids = random_ids(model.config, 3, 29, seed=7)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    got = ort_session(out / "model.onnx").run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    for row, n in enumerate(lengths):
        alone = model(ids[row : row + 1, :n]).detach().numpy()[0]
        assert np.abs(got[row, :n] - alone).max() <= 1e-4


def _stream_onnx(path, model, ids, pieces):
    session = ort_session(path)
    names = list(spec_for(model).state.inputs)
    state = [t.numpy() for t in flatten_state(model.init_state(ids.shape[0]))]
    outs, at = [], 0
    for size in pieces:
        result = session.run(None, {"input_ids": ids[:, at : at + size].numpy(), **dict(zip(names, state))})
        outs.append(result[0])
        state = result[1:]
        at += size
    return np.concatenate(outs, axis=1), state


@pytest.mark.parametrize("which", ["tiny_export", "compressed_export"])
def test_streaming_onnx_matches_full_forward_and_eager_state(which, request):
    out, _ = request.getfixturevalue(which)
    model = load_model(out)
    pieces = [3, 1, C + 2, 5, 2 * C + 1, C - 2, 5]  # none aligned with C
    ids = random_ids(model.config, 2, sum(pieces), seed=11)
    got, state = _stream_onnx(out / "model.streaming.onnx", model, ids, pieces)
    assert np.abs(got - model(ids).detach().numpy()).max() <= 1e-4
    eager_state = model.init_state(2)
    at = 0
    for size in pieces:
        _, eager_state = model.stream(ids[:, at : at + size], eager_state)
        at += size
    for name, want, have in zip(spec_for(model).state.outputs, flatten_state(eager_state), state):
        assert have.shape == tuple(want.shape), name
        assert np.abs(have - want.detach().numpy()).max() <= 1e-4, name


def test_streaming_torchscript(tiny_export):
    out, _ = tiny_export
    model = load_model("bsbr-tiny")
    traced = torch.jit.load(str(out / "model.streaming.pt"))
    ids = random_ids(model.config, 3, 4 * C + 1, seed=12)
    state, outs, at = flatten_state(model.init_state(3)), [], 0
    for size in [C + 3, 1, 1, C - 1, 2 * C - 3]:
        result = traced(ids[:, at : at + size], *state)
        outs.append(result[0])
        state = list(result[1:])
        at += size
    assert (torch.cat(outs, 1) - model(ids)).abs().max() <= 1e-4


def test_compressed_onnx_matches_eager(compressed_export):
    out, result = compressed_export
    model = load_model(out)
    assert model.config.compression == 16
    ids = random_ids(model.config, 3, 3 * C + 5, seed=13)
    got = ort_session(out / "model.onnx").run(
        None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    )[0]
    assert np.abs(got - model(ids).detach().numpy()).max() <= 1e-4
    assert result.passed


def test_dims_are_symbolic_and_named(tiny_export):
    out, _ = tiny_export
    graph = onnx.load(str(out / "model.onnx")).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }
    assert dims == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
        "logits": ["batch", "sequence", 97],
    }
    stream = onnx.load(str(out / "model.streaming.onnx")).graph
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*stream.input, *stream.output]
    }
    assert shapes["past.1.chunk_states"] == ["batch", 4, "past_chunks", 64]
    assert shapes["present.1.keys"] == ["batch", 4, "present_tokens", 8]
    assert shapes["present.0.meta_keys"] == ["batch", 4, "present_chunks", 8]


def test_metadata_round_trips_into_config(tiny_export):
    out, _ = tiny_export
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert BSBRConfig.from_dict(json.loads(props["bsbr.config"])) == load_model("bsbr-tiny").config
    assert props["bsbr.chunk_size"] == "8"
    assert json.loads(props["bsbr.export"])["dynamic"] is True
    assert "onnxruntime" in json.loads(props["bsbr.versions"])
    stream_props = {p.key: p.value for p in onnx.load(str(out / "model.streaming.onnx")).metadata_props}
    spec = json.loads(stream_props["bsbr.state"])
    assert spec["inputs"]["past.0.retrieved"] == ["batch", 4, 8, 8]
    assert set(spec["outputs"]) == set(spec_for(load_model("bsbr-tiny")).state.outputs)


def test_checker_is_clean(tiny_export):
    out, _ = tiny_export
    for name in ("model.onnx", "model.streaming.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)


def test_full_graph_pads_once_and_fuses_chunk_attention(tiny_export):
    # What keeps the graph fast (ORT profile at L=4096): one Pad for the whole model, not
    # copies per layer, and within-chunk attention as opset 23's fused Attention node.
    out, _ = tiny_export
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    layers = load_model("bsbr-tiny").config.num_layers
    assert ops.count("Pad") == 1
    assert ops.count("Attention") == layers
    assert ops.count("Softmax") == layers  # the chunk-level retrieval's; within-chunk is fused


def test_manifest_hashes_files(tiny_export):
    from bsbr_export.manifest import sha256

    out, result = tiny_export
    manifest = json.loads((out / "manifest.json").read_text())
    formats = [FORMATS[a.format] for a in result.artifacts if a.kind == "full"]  # the fixture's formats
    expected = [artifact_name(f, kind) for f, kind in export_jobs(formats, streaming=True)]
    assert [a["name"] for a in manifest["artifacts"]] == expected
    assert {"model.onnx", "model.pt", "model.streaming.onnx", "model.streaming.pt", "model.decode.onnx"} <= set(
        expected
    )
    for artifact in manifest["artifacts"]:
        for name, info in artifact["files"].items():
            assert info["sha256"] == sha256(out / name)
        assert artifact["checks"]["passed"] is True
        assert artifact["checks"]["max_abs"] <= 1e-4
    assert result.passed
    assert manifest["config"] == load_model("bsbr-tiny").config.to_dict()


def test_static_shape_graph_refuses_other_shapes(tmp_path):
    model = load_model("bsbr-tiny")
    (path,) = export_onnx(model, tmp_path / "static.onnx", static_shape=(2, 10))
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 10]
    runner = OnnxRunner(path)
    ids = random_ids(model.config, 2, 10, seed=3).numpy()
    got = runner.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    assert np.abs(got - model(torch.from_numpy(ids)).detach().numpy()).max() <= 1e-4
    other = random_ids(model.config, 2, 11).numpy()
    with pytest.raises(UserError, match=r"shape \[2, 11\] but this graph takes \[2, 10\].*static shape"):
        runner.infer({"input_ids": other, "attention_mask": np.ones_like(other)})


def test_trace_check_catches_a_wrong_trace():
    model = build_model(tiny_config(), seed=1)
    other = build_model(tiny_config(), seed=2)  # same graph, different weights
    ids = random_ids(model.config, 2, 11)
    wrong = torch.jit.trace(FullGraph(other, spec_for(other)), (ids, torch.ones_like(ids)))
    with pytest.raises(UserError, match="disagrees with eager"):
        check_trace(model, wrong, "full", spec_for(model))


@pytest.mark.parametrize("opset", [18, 23])
def test_opsets(tmp_path, opset):
    model = load_model("bsbr-tiny")
    (path,) = export_onnx(model, tmp_path / "m.onnx", opset=opset, attention_mask=False)
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == opset
    ids = random_ids(model.config, 3, 13, seed=opset).numpy()
    got = ort_session(path).run(None, {"input_ids": ids})[0]
    assert np.abs(got - model(torch.from_numpy(ids)).detach().numpy()).max() <= 1e-4


def test_unsupported_opset_is_user_error(tmp_path):
    with pytest.raises(UserError, match="opset 11 is not supported"):
        export_onnx(load_model("bsbr-tiny"), tmp_path / "m.onnx", opset=11)
    assert not list(tmp_path.iterdir())


def test_torchscript_file_is_loadable_and_atomic(tmp_path):
    path = export_torchscript(load_model("bsbr-tiny"), tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    assert torch.jit.load(str(path)) is not None


def test_external_data_above_threshold(tmp_path, monkeypatch):
    import bsbr_export.export.onnx as export_module

    monkeypatch.setattr(export_module, "TWO_GIB", 1)  # treat tiny as "large"
    model = load_model("bsbr-tiny")
    files = export_onnx(model, tmp_path / "big.onnx", attention_mask=False)
    assert [f.name for f in files] == ["big.onnx", "big.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert files[1].stat().st_size >= 0.9 * weight_bytes  # the weights live in .data
    ids = random_ids(model.config, 2, 19, seed=5).numpy()
    got = ort_session(files[0]).run(None, {"input_ids": ids})[0]
    assert np.abs(got - model(torch.from_numpy(ids)).detach().numpy()).max() <= 1e-4


@pytest.mark.parametrize("which", ["tiny_export", "compressed_export"])
def test_decode_graph_returns_only_what_changed(which, request):
    """model.decode.onnx: the caller appends new.* rows; logits and the accumulated state
    equal the full forward and eager streaming."""
    from bsbr_export.runtime.state import advance_state

    out, _ = request.getfixturevalue(which)
    model = load_model(out)
    session = ort_session(out / "model.decode.onnx")
    assert [o.name for o in session.get_outputs()] == ["logits", *spec_for(model).state.update_names()]
    pieces = [1, 1, C - 1, 3, 2 * C + 2, 1, C]
    ids = random_ids(model.config, 2, sum(pieces), seed=21)
    names = list(spec_for(model).state.inputs)
    state = dict(zip(names, [t.numpy() for t in flatten_state(model.init_state(2))]))
    logits, at, eager_state = [], 0, model.init_state(2)
    for size in pieces:
        result = dict(
            zip(
                [o.name for o in session.get_outputs()],
                session.run(None, {"input_ids": ids[:, at : at + size].numpy(), **state}),
            )
        )
        finished = (at % C + size) // C
        assert result["new.0.chunk_states"].shape[2] == finished  # only the chunks this step closed
        state = advance_state(state, result)
        logits.append(result["logits"])
        _, eager_state = model.stream(ids[:, at : at + size], eager_state)
        at += size
    assert np.abs(np.concatenate(logits, axis=1) - model(ids).detach().numpy()).max() <= 1e-4
    for name, want in zip(names, flatten_state(eager_state)):
        assert np.abs(state[name] - want.detach().numpy()).max() <= 1e-4, name


def test_decode_torchscript_rollout(tiny_export):
    from bsbr_export.runtime.state import advance_state

    out, _ = tiny_export
    model = load_model(out)
    traced = torch.jit.load(str(out / "model.decode.pt"))
    names = list(spec_for(model).state.inputs)
    ids = random_ids(model.config, 2, 3 * C + 3, seed=31)
    state = dict(zip(names, [t.numpy() for t in flatten_state(model.init_state(2))]))
    logits, at = [], 0
    for size in [2, C, 1, C + 4, 4]:  # 27 = 3C + 3 tokens, crossing every boundary off-step
        with torch.no_grad():
            result = traced(ids[:, at : at + size], *(torch.from_numpy(state[n]) for n in names))
        result = dict(zip(["logits", *spec_for(model).state.update_names()], (r.numpy() for r in result)))
        state = advance_state(state, result)
        logits.append(result["logits"])
        at += size
    assert np.abs(np.concatenate(logits, axis=1) - model(ids).detach().numpy()).max() <= 1e-4


@pytest.mark.parametrize("name", ["model.pt", "model.ptl"])
def test_torchscript_takes_input_ids_alone(tiny_export, name):
    """What C++ and Python users try first: the mask defaults to all ones, as in eager."""
    from torch.jit.mobile import _load_for_lite_interpreter

    out, _ = tiny_export
    model = load_model("bsbr-tiny")
    traced = _load_for_lite_interpreter(str(out / name)) if name.endswith(".ptl") else torch.jit.load(str(out / name))
    ids = random_ids(model.config, 3, 3 * C + 5, seed=41)
    with torch.no_grad():
        assert (traced(ids) - model(ids)).abs().max() <= 1e-4
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0
        assert (traced(ids, mask)[0, :7] - model(ids[:1, :7])[0]).abs().max() <= 1e-4


def test_writers_table_covers_every_format_and_old_paths_warn():
    """Every row of the format table names a writer and a runner that exist; the module
    paths the README named before the stages were layered still work, with a DeprecationWarning."""
    from bsbr_export.export import onnx, writers
    from bsbr_export.formats import resolve

    for fmt in FORMATS.values():
        assert isinstance(resolve(fmt.writer), writers.Writer), fmt.name
        assert callable(getattr(resolve(fmt.runner), "infer", None)), fmt.name  # the Runner contract
    with pytest.warns(DeprecationWarning, match="moved to bsbr_export.export.onnx.export_onnx"):
        assert writers.export_onnx is onnx.export_onnx


def test_row_step_graph_advances_real_sequences_as_each_alone(tiny_export):
    """model.rows.onnx on the states of real sequences at positions from 0 to 16390 (each
    its own fill and count of finished chunks) gives each row what its own stream does."""
    out, _ = tiny_export
    model = load_model(out)
    c = model.config.chunk_size
    positions = [0, 1, c - 2, c, 3 * c + 5, 16389]  # 16389 % 8 == 5: mid-chunk
    runner = OnnxRunner(out / "model.rows.onnx")
    feeds = {"input_ids": [], "positions": np.array(positions), **{n: [] for n in runner.input_names[2:]}}
    expected = []
    with torch.no_grad():
        for p in positions:
            ids = random_ids(model.config, 1, p + 1, seed=p)
            state = model.init_state(1)
            if p:
                _, state = model.stream(ids[:, :p], state)
            logits, updates = model.stream_update(ids[:, p:], state)
            expected.append((logits, updates))
            feeds["input_ids"].append(ids[:, p:].numpy())
            for i, layer in enumerate(state):
                pad = (0, 0, 0, c - 1 - layer.keys.shape[-2])
                feeds[f"cache.{i}.keys"].append(torch.nn.functional.pad(layer.keys, pad).numpy())
                feeds[f"cache.{i}.values"].append(torch.nn.functional.pad(layer.values, pad).numpy())
                feeds[f"cache.{i}.retrieved"].append(layer.retrieved.numpy())
    got = runner.infer({n: v if n == "positions" else np.concatenate(v) for n, v in feeds.items()})
    for row, (logits, updates) in enumerate(expected):
        assert np.abs(got["logits"][row] - logits[0].numpy()).max() <= 1e-5
        for i, update in enumerate(updates):
            assert np.abs(got[f"row.{i}.keys"][row, :, 0] - update.keys[0, :, -1].numpy()).max() <= 1e-5
            assert np.abs(got[f"row.{i}.values"][row, :, 0] - update.values[0, :, -1].numpy()).max() <= 1e-5
