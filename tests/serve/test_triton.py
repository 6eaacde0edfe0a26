"""--triton-repo: config.pbtxt parses with Triton's own model-config protobuf and agrees
with the ONNX graphs it serves; the streaming model's implicit state runs as Triton runs it.
(tests/test_serve.py runs the Python-backend twins on a real server.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import bsbr_export
from bsbr_export.cli import main
from bsbr_export.compare.cases import stream_pieces
from bsbr_export.defaults import DEFAULT_TOKEN_BUDGET, MAX_PROMPT_TOKENS, MAX_SEQUENCES, MAX_STATE_BYTES
from bsbr_export.errors import UserError
from bsbr_export.export.pipeline import export_model
from bsbr_export.formats import FORMATS
from bsbr_export.manifest import read_manifest, sha256
from bsbr_export.model.checkpoint import load_model
from bsbr_export.runtime.eager import EagerRunner
from bsbr_export.runtime.onnx import OnnxRunner
from bsbr_export.serve.triton import IDLE_SECONDS, MAX_BATCH_SIZE, PYTHON_MODEL, write_triton_repo

TRITON_DTYPES = {
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
    onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
}


@pytest.fixture(scope="session")
def repo(tiny_export, triton_repo):
    out, _ = tiny_export
    return triton_repo, out


def parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def graph_io(path) -> dict[str, tuple[int, list[int]]]:
    """name -> (ONNX elem type, dims with -1 for symbolic) of every graph input and output."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        v.name: (
            v.type.tensor_type.elem_type,
            [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim],
        )
        for v in [*graph.input, *graph.output]
    }


def assert_matches_graph(entries, graph, batched: bool):
    for entry in entries:
        elem_type, dims = graph[entry.name]
        assert entry.data_type == TRITON_DTYPES[elem_type]
        assert list(entry.dims) == (dims[1:] if batched else dims)


def test_layout_and_files(repo):
    models, out = repo
    assert sorted(p.name for p in models.iterdir()) == [
        "bsbr-tiny",
        "bsbr-tiny_generate",
        "bsbr-tiny_python",
        "bsbr-tiny_streaming",
        "bsbr-tiny_streaming_python",
    ]
    for name, source in (("bsbr-tiny", "model.onnx"), ("bsbr-tiny_streaming", "model.streaming.onnx")):
        assert sorted(p.name for p in (models / name).iterdir()) == ["1", "config.pbtxt"]
        assert sha256(models / name / "1" / "model.onnx") == sha256(out / source)
    version = models / "bsbr-tiny_python" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.py"]
    assert sha256(version / "model.onnx") == sha256(out / "model.onnx")
    for name in ("bsbr-tiny_streaming_python", "bsbr-tiny_generate"):
        version = models / name / "1"
        assert sorted(p.name for p in version.iterdir()) == ["bsbr_export", "export", "model.py"]
        assert sha256(version / "model.py") == sha256(PYTHON_MODEL)
        served = read_manifest(version / "export")  # checks each file's sha256
        assert sorted(a["name"] for a in served["artifacts"]) == ["model.decode.onnx", "model.rows.onnx"]
        assert served["spec"] == read_manifest(out)["spec"]
        assert sorted(p.name for p in (version / "export").iterdir()) == [
            "manifest.json",
            "model.decode.onnx",
            "model.rows.onnx",
        ]


def test_served_package_is_the_torch_free_modules_of_this_one(repo):
    """1/bsbr_export holds runtime.batching and what it imports, byte for byte, and no
    module that imports torch (the serving venv has none)."""
    models, _ = repo
    copied = models / "bsbr-tiny_generate" / "1" / "bsbr_export"
    files = sorted(p.relative_to(copied).as_posix() for p in copied.rglob("*.py"))
    assert {"runtime/batching.py", "runtime/requests.py", "runtime/onnx.py", "manifest.py"} <= set(files)
    root = Path(bsbr_export.__file__).parent
    for file in files:
        assert (copied / file).read_bytes() == (root / file).read_bytes()
        assert not re.search(r"^\s*(import|from) torch\b", (copied / file).read_text(), re.M), file


def parameters(config) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_python_logits_config_matches_graph(repo):
    models, _ = repo
    config = parse(models / "bsbr-tiny_python" / "config.pbtxt")
    graph = graph_io(models / "bsbr-tiny_python" / "1" / "model.onnx")
    assert config.backend == "python" and not config.platform
    assert config.max_batch_size == MAX_BATCH_SIZE
    assert [i.name for i in config.input] == ["input_ids", "attention_mask"]
    assert_matches_graph([*config.input, *config.output], graph, batched=True)
    assert parameters(config) == {"mode": "full", "onnx_file": "model.onnx", "vocab_size": "97"}
    assert not config.HasField("sequence_batching")


def assert_sequence_batching(config, idle_seconds: int = IDLE_SECONDS) -> None:
    """No implicit state (it would feed zeros to a Python model), the "oldest" strategy
    (one execute gets several sequences' requests), the controls model.py reads."""
    batching = config.sequence_batching
    assert config.max_batch_size == MAX_BATCH_SIZE
    assert not batching.state and batching.HasField("oldest")
    assert batching.max_sequence_idle_microseconds == idle_seconds * 1_000_000
    controls = {c.name: c.control[0] for c in batching.control_input}
    assert controls["START"].kind == model_config_pb2.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START
    assert controls["END"].kind == model_config_pb2.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END
    assert controls["CORRID"].kind == model_config_pb2.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID


def test_python_streaming_config_batches_rows(repo):
    """The step model of an export with a row step: mode rows, with its limits."""
    models, _ = repo
    config = parse(models / "bsbr-tiny_streaming_python" / "config.pbtxt")
    graph = graph_io(models / "bsbr-tiny_streaming_python" / "1" / "export" / "model.decode.onnx")
    assert config.backend == "python"
    assert [i.name for i in config.input] == ["input_ids"]
    assert [o.name for o in config.output] == ["logits", "open_sequences"]
    assert_matches_graph([*config.input, config.output[0]], graph, batched=True)
    assert_sequence_batching(config)
    assert parameters(config) == {
        "mode": "rows",
        "idle_seconds": str(IDLE_SECONDS),
        "max_sequences": str(MAX_SEQUENCES),
        "max_state_bytes": str(MAX_STATE_BYTES),
        "max_prompt_tokens": str(MAX_PROMPT_TOKENS),
        "threads": "0",
    }


def test_generate_config_is_decoupled_with_vllm_names(repo):
    models, _ = repo
    config = parse(models / "bsbr-tiny_generate" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled
    assert {i.name: (i.data_type, list(i.dims), i.optional) for i in config.input} == {
        "text_input": (model_config_pb2.TYPE_STRING, [1], True),
        "input_ids": (model_config_pb2.TYPE_INT64, [-1], True),
        "max_tokens": (model_config_pb2.TYPE_INT32, [1], True),
        "sampling_parameters": (model_config_pb2.TYPE_STRING, [1], True),
        "stream": (model_config_pb2.TYPE_BOOL, [1], True),
        "exclude_input_in_output": (model_config_pb2.TYPE_BOOL, [1], True),
    }
    assert {o.name: (o.data_type, list(o.dims)) for o in config.output} == {
        "text_output": (model_config_pb2.TYPE_STRING, [-1]),
        "output_ids": (model_config_pb2.TYPE_INT64, [-1]),
    }
    assert parameters(config)["mode"] == "generate"
    assert parameters(config)["token_budget"] == str(DEFAULT_TOKEN_BUDGET)


def test_python_streaming_config_without_row_step_keeps_state_in_the_model(hf_export, tmp_path):
    """An export with a decode graph but no row step (a module without step_rows): the
    decode twin, one sequence per call, with the state shapes of the manifest; no
    generate model."""
    models = write_triton_repo(hf_export, tmp_path / "models", "lm")
    assert sorted(p.name for p in models.iterdir()) == ["lm", "lm_python", "lm_streaming", "lm_streaming_python"]
    config = parse(models / "lm_streaming_python" / "config.pbtxt")
    graph = graph_io(models / "lm_streaming_python" / "1" / "model.decode.onnx")
    assert config.backend == "python"
    assert [i.name for i in config.input] == ["input_ids"]
    assert [o.name for o in config.output] == ["logits", "open_sequences"]
    assert_matches_graph([*config.input, config.output[0]], graph, batched=True)
    assert_sequence_batching(config)
    params = parameters(config)
    manifest = json.loads((hf_export / "manifest.json").read_text())
    assert json.loads(params.pop("state_shapes")) == manifest["state"]["inputs"]
    assert params == {
        "mode": "decode",
        "onnx_file": "model.decode.onnx",
        "vocab_size": str(manifest["spec"]["inputs"][0]["high"]),
        "idle_seconds": str(IDLE_SECONDS),
    }


def test_logits_config_matches_graph(repo):
    models, _ = repo
    config = parse(models / "bsbr-tiny" / "config.pbtxt")
    graph = graph_io(models / "bsbr-tiny" / "1" / "model.onnx")
    assert config.name == "bsbr-tiny" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == MAX_BATCH_SIZE  # the graph's batch dim is symbolic
    assert [i.name for i in config.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in config.output] == ["logits"]
    assert_matches_graph([*config.input, *config.output], graph, batched=True)
    assert list(config.input[0].dims) == [-1] and list(config.output[0].dims) == [-1, 97]
    assert not config.HasField("sequence_batching")


def test_streaming_config_has_implicit_state(repo):
    models, _ = repo
    config = parse(models / "bsbr-tiny_streaming" / "config.pbtxt")
    graph = graph_io(models / "bsbr-tiny_streaming" / "1" / "model.onnx")
    assert config.max_batch_size == 1
    assert [i.name for i in config.input] == ["input_ids"]  # state inputs are implicit
    assert [o.name for o in config.output] == ["logits"]
    assert_matches_graph([*config.input, *config.output], graph, batched=True)

    states = config.sequence_batching.state
    past = sorted(n for n in graph if n.startswith("past."))
    assert sorted(s.input_name for s in states) == past and len(past) == 2 * 5
    for state in states:
        assert state.output_name == state.input_name.replace("past.", "present.", 1)
        elem_type, dims = graph[state.input_name]
        assert state.data_type == TRITON_DTYPES[elem_type] and list(state.dims) == dims[1:]
        assert graph[state.output_name][0] == elem_type and len(graph[state.output_name][1]) == len(dims)
        (initial,) = state.initial_state
        assert initial.zero_data and initial.data_type == state.data_type and initial.name
        assert list(initial.dims) == [0 if d == -1 else d for d in state.dims]  # empty: no chunks or tokens yet


def test_streaming_model_runs_as_triton_feeds_it(repo):
    """Emulate Triton's sequence batcher from the config alone: batch 1, the zero initial
    state (Triton adds the batch dim), then present.* fed back as past.*. The logits
    equal one full eager forward."""
    models, out = repo
    config = parse(models / "bsbr-tiny_streaming" / "config.pbtxt")
    runner = OnnxRunner(models / "bsbr-tiny_streaming" / "1" / "model.onnx")
    model = load_model(out)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 29))
    state = {s.input_name: np.zeros([1, *s.initial_state[0].dims], np.float32) for s in config.sequence_batching.state}
    logits, start = [], 0
    for size in stream_pieces(ids.shape[1], model.config.chunk_size):
        outputs = runner.infer({"input_ids": ids[:, start : start + size], **state})
        state = {s.input_name: outputs[s.output_name] for s in config.sequence_batching.state}
        logits.append(outputs["logits"])
        start += size
    expected = EagerRunner(model).infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    assert np.abs(np.concatenate(logits, axis=1) - expected).max() <= 1e-4


def test_static_export_is_not_batched(tmp_path):
    """A fixed-shape graph keeps its batch dim in dims, with max_batch_size 0."""
    export_model("bsbr-tiny", tmp_path / "e", [FORMATS["onnx"]], static_shape=(2, 12))
    models = write_triton_repo(tmp_path / "e", tmp_path / "models", "tiny-static")
    assert sorted(p.name for p in models.iterdir()) == ["tiny-static", "tiny-static_python"]
    config = parse(models / "tiny-static" / "config.pbtxt")
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [2, 12] and list(config.output[0].dims) == [2, 12, 97]


def test_other_models_kept_and_existing_needs_overwrite(repo, tmp_path):
    models, out = repo
    target = tmp_path / "models"
    (target / "other" / "1").mkdir(parents=True)
    write_triton_repo(out, target, "tiny")
    assert sorted(p.name for p in target.iterdir()) == [
        "other",
        "tiny",
        "tiny_generate",
        "tiny_python",
        "tiny_streaming",
        "tiny_streaming_python",
    ]
    with pytest.raises(UserError, match="tiny already exists"):
        write_triton_repo(out, target, "tiny")
    write_triton_repo(out, target, "tiny", overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [
        "other",
        "tiny",
        "tiny_generate",
        "tiny_python",
        "tiny_streaming",
        "tiny_streaming_python",
    ]


def test_export_without_onnx_is_a_user_error(tmp_path):
    export_model("bsbr-tiny", tmp_path / "e", [FORMATS["torchscript"]])
    with pytest.raises(UserError, match="has no model.onnx: export with --format onnx"):
        write_triton_repo(tmp_path / "e", tmp_path / "models")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", ["..", "../up", "a b"])
def test_bad_model_name(repo, tmp_path, name):
    _, out = repo
    with pytest.raises(UserError, match="Triton model name"):
        write_triton_repo(out, tmp_path / "models", name)


def test_cli(capsys, tmp_path):
    code = main(
        [
            "export",
            "bsbr-tiny",
            "--out",
            str(tmp_path / "e"),
            "--format",
            "torchscript",
            "--triton-repo",
            str(tmp_path / "models"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--triton-repo serves the ONNX graph: add onnx to --format" in err
    assert list(tmp_path.iterdir()) == []

    code = main(
        [
            "export",
            "bsbr-tiny",
            "--out",
            str(tmp_path / "e"),
            "--format",
            "onnx",
            "--triton-repo",
            str(tmp_path / "models"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "Triton model repository" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["bsbr-tiny", "bsbr-tiny_python"]


def test_triton_repo_command_lays_out_an_existing_export(capsys, tiny_export, tmp_path):
    out, _ = tiny_export
    models = tmp_path / "models"
    assert main(["triton-repo", str(out), str(models)]) == 0
    assert f"Triton model repository: {models}" in capsys.readouterr().out
    names = ["bsbr-tiny", "bsbr-tiny_python", "bsbr-tiny_streaming", "bsbr-tiny_streaming_python", "bsbr-tiny_generate"]
    assert sorted(p.name for p in models.iterdir()) == sorted(names)
    assert all((models / name / "config.pbtxt").is_file() for name in names)
    assert read_manifest(out)  # the export itself is untouched (its hashes still hold)

    assert main(["triton-repo", str(out), str(models)]) == 2  # not replaced without --force
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists: pass --force" in err
    assert main(["triton-repo", str(out), str(models), "--force"]) == 0
