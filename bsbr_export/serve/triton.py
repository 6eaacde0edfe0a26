"""A Triton Inference Server model repository from an export directory.

`write_triton_repo` writes up to four models, `<repo>/<model>/config.pbtxt` + `1/...`:
- `<model>`: the full-sequence graph on Triton's ONNX Runtime backend;
- `<model>_streaming` (with a streaming export): the full-state step graph on the ONNX
  Runtime backend, its `past.*` -> `present.*` state kept by Triton between the requests
  of a sequence (implicit state, `sequence_batching.state`);
- `<model>_python`: the full-sequence graph on Triton's Python backend (onnxruntime
  inside `model.py`), for servers that only have that backend;
- `<model>_streaming_python` (with a streaming export): the step model on the Python
  backend behind the sequence batcher's "oldest" strategy, which keeps each sequence's
  state itself: the one-token requests of the sequences in one call go through one
  row-step call (`runtime.batching.Sequences`; the decode graph alone, one sequence at a
  time, for exports without a row step), so a token costs the same at any context length;
- `<model>_generate` (with a row step): a prompt in, tokens streamed back as they are
  made, all running generations advanced together (in-flight batching), with the tensor
  names of Triton's vLLM backend (`text_input`, `max_tokens`, `sampling_parameters`,
  `stream`, `exclude_input_in_output` -> `text_output`), so `generate_stream` works.
The `rows` and `generate` models carry the torch-free modules of this package they run
(`1/bsbr_export/`) and their graphs with a manifest of them (`1/export/`); see `triton_model.py`.
Names, dtypes and dims are read from the ONNX graphs themselves, and the state's from the
export's manifest, so the configs cannot drift from them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx

from bsbr_export.defaults import DEFAULT_TOKEN_BUDGET, MAX_PROMPT_TOKENS, MAX_SEQUENCES, MAX_STATE_BYTES
from bsbr_export.errors import UserError
from bsbr_export.formats import FORMATS, ONNX, artifact_name
from bsbr_export.io import atomic_dir, check_can_create
from bsbr_export.manifest import MANIFEST, read_manifest
from bsbr_export.model.spec import ModelSpec
from bsbr_export.model.usercode import export_name
from bsbr_export.model.zoo import presets_dir

# Requests of up to this many sequences per call to the full-sequence model.
MAX_BATCH_SIZE = 8
# By default, a streaming sequence idle this long is dropped (by Triton and by the Python model).
IDLE_SECONDS = 60
# The Python-backend model.py: this package's triton_model.py, copied.
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")
# What the rows / generate models run: this module and the package modules it imports.
SERVING_MODULE = "bsbr_export.runtime.serving"  # and runtime.batching, which it imports
ROWS_GRAPH, DECODE_GRAPH = (artifact_name(FORMATS["onnx"], kind) for kind in ("rows", "decode"))
TOKENIZER_FILE = "tokenizer.json"
# ONNX element type name -> Triton data type (the ones an export can hold).
TRITON_TYPES = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
    "BOOL": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its Triton type and dims (-1 where the graph's is symbolic)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def graph_tensors(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX graph, weights left on disk."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def tensor(value) -> TensorSpec:
        kind = value.type.tensor_type
        type_name = onnx.TensorProto.DataType.Name(kind.elem_type)
        if type_name not in TRITON_TYPES:
            raise UserError(f"{path.name}: {value.name} is {type_name}, which has no Triton type: re-export in float32")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim)
        return TensorSpec(value.name, TRITON_TYPES[type_name], dims)

    inputs = [tensor(v) for v in graph.input if v.name not in initializers]
    return inputs, [tensor(v) for v in graph.output]


def write_triton_repo(
    export_dir: str | os.PathLike,
    repo_dir: str | os.PathLike,
    model_name: str | None = None,
    *,
    overwrite: bool = False,
    idle_seconds: int = IDLE_SECONDS,
    max_sequences: int = MAX_SEQUENCES,
    max_state_bytes: int = MAX_STATE_BYTES,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    threads: int = 0,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> Path:
    """Write Triton models for the ONNX graphs in `export_dir` into `repo_dir`.

    model_name defaults to the exported model's name (a preset name, or the checkpoint
    directory's). Each model directory appears whole or not at all; other models already
    in `repo_dir` are left alone, and an existing one of the same name is replaced only
    with `overwrite`. A streaming sequence idle for `idle_seconds` is dropped by the
    Python-backend model. The step and generate models each hold at most `max_sequences`
    sequences and `max_state_bytes` of their state, and take prompts of up to
    `max_prompt_tokens`; past a limit, a request gets an error response; they run ONNX
    Runtime with `threads` intra-op threads (0: its default, one per core); the generate
    model's iterations take `token_budget` tokens (`runtime.batching.Batcher`). Returns `repo_dir`, the
    path to give `tritonserver --model-repository`.
    """
    export_dir, repo_dir = Path(export_dir), Path(repo_dir)
    manifest = read_manifest(export_dir)
    artifacts = {a["name"]: a for a in manifest["artifacts"]}
    if artifact_name(ONNX) not in artifacts:
        raise UserError(f"{export_dir} has no model.onnx: export with --format onnx to write a Triton repository")
    name = model_name or export_name(manifest["model"]) or export_dir.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(f"Triton model name {name!r} must be letters, digits, '_', '.' or '-': pass another name")
    check_triton_repo(repo_dir, name, artifact_name(ONNX, "streaming") in artifacts, overwrite)

    vocab_size = ModelSpec.from_dict(manifest["spec"]).tokens.high
    full = export_dir / artifact_name(ONNX)
    # model -> (artifact, config, Python backend?, carries the serving package?)
    models = {
        name: (artifacts[artifact_name(ONNX)], logits_config(name, full), False, False),
        f"{name}_python": (
            artifacts[artifact_name(ONNX)],
            python_logits_config(f"{name}_python", full, vocab_size),
            True,
            False,
        ),
    }
    if artifact_name(ONNX, "streaming") in artifacts:
        streaming = f"{name}_streaming"
        config = streaming_config(streaming, export_dir / artifact_name(ONNX, "streaming"), manifest["state"])
        models[streaming] = (artifacts[artifact_name(ONNX, "streaming")], config, False, False)
    limits = {
        "max_sequences": max_sequences,
        "max_state_bytes": max_state_bytes,
        "max_prompt_tokens": max_prompt_tokens,
        "threads": threads,
    }
    if ROWS_GRAPH in artifacts:
        step = f"{name}_streaming_python"
        models[step] = (None, rows_config(step, export_dir / DECODE_GRAPH, idle_seconds, limits), True, True)
        generate = f"{name}_generate"
        config = generate_config(generate, {**limits, "token_budget": token_budget})
        models[generate] = (None, config, True, True)
    elif DECODE_GRAPH in artifacts:
        streaming = f"{name}_streaming_python"
        config = python_decode_config(streaming, export_dir / DECODE_GRAPH, manifest["state"], vocab_size, idle_seconds)
        models[streaming] = (artifacts[DECODE_GRAPH], config, True, True)  # its state advances as runtime.state says
    # Stage every model before publishing any: a failure leaves the repository as it was.
    with contextlib.ExitStack() as stack:
        for model, (artifact, config, python, package) in models.items():
            tmp = stack.enter_context(atomic_dir(repo_dir / model, overwrite=overwrite))
            version = tmp / "1"
            version.mkdir()
            if package:
                copy_serving_package(version)
            if artifact is None:  # a model that runs runtime.batching over the export's step graphs
                write_serving_export(export_dir, manifest, version / "export")
            else:
                for file in artifact["files"]:
                    # Triton's ONNX Runtime backend loads `model.onnx`; external weights keep
                    # their name, since the graph refers to them by it. model.py is told the name.
                    target = "model.onnx" if file == artifact["name"] and not python else file
                    shutil.copyfile(export_dir / file, version / target)
            if python:
                shutil.copyfile(PYTHON_MODEL, version / "model.py")
            (tmp / "config.pbtxt").write_text(config)
    return repo_dir


def check_triton_repo(repo: Path, name: str, streaming: bool, overwrite: bool = False) -> None:
    """Refuse a Triton repository that cannot take model `name` (a file, the preset
    folder, or, without `overwrite`, one holding its models already): the export command
    calls it before exporting, `write_triton_repo` before writing."""
    if repo.exists() and not repo.is_dir():
        raise UserError(f"Triton repository {repo} is a file: pass a directory")
    check_can_create(repo / name, overwrite=True)  # a writable place; an existing model is checked below
    if repo.resolve() == presets_dir().resolve():
        raise UserError(
            f"Triton repository {repo} is bsbr-export's preset folder: pass another directory (e.g. export/triton)"
        )
    if not overwrite:
        names = [name, f"{name}_python"] + (
            [f"{name}_streaming", f"{name}_streaming_python", f"{name}_generate"] if streaming else []
        )
        for model in names:
            if (repo / model).is_dir() and any((repo / model).iterdir()):
                raise UserError(f"{repo / model} already exists: pass --force to replace it, or another repository")


def copy_serving_package(target: Path) -> None:
    """Copy the modules of this package that `SERVING_MODULE` imports into
    `target/bsbr_export/` (found by importing it in a fresh interpreter; none of them
    imports torch, which import-linter keeps so)."""
    code = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); print('\\n'.join(sorted("
        "m.__file__ for n, m in list(sys.modules.items()) if n.split('.')[0] == 'bsbr_export')))"
    )
    root = Path(__file__).resolve().parents[1]  # the bsbr_export package
    # Run beside this package, so `-c` imports it (not one in the caller's directory).
    done = subprocess.run(
        [sys.executable, "-c", code, SERVING_MODULE], capture_output=True, text=True, check=True, cwd=root.parent
    )
    for file in done.stdout.split():
        path = Path(file).resolve()
        copy = target / "bsbr_export" / path.relative_to(root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)


def write_serving_export(export_dir: Path, manifest: dict, target: Path) -> None:
    """The decode and row graphs (and a tokenizer.json) of an export, in `target` with a
    manifest that lists just them (with their sha256, checked when the model loads)."""
    target.mkdir()
    artifacts = [a for a in manifest["artifacts"] if a["name"] in (ROWS_GRAPH, DECODE_GRAPH)]
    checkpoint = {n: r for n, r in manifest.get("checkpoint", {}).items() if n == TOKENIZER_FILE}
    for file in [*checkpoint, *(f for a in artifacts for f in a["files"])]:
        shutil.copyfile(export_dir / file, target / file)
    (target / MANIFEST).write_text(json.dumps({**manifest, "artifacts": artifacts, "checkpoint": checkpoint}, indent=2))


def logits_config(name: str, path: Path, backend: str = "onnxruntime") -> str:
    """config.pbtxt of the full-sequence graph (input_ids, attention_mask -> logits)."""
    inputs, outputs = graph_tensors(path)
    batched = _batch_is_dynamic(inputs + outputs)
    lines = [
        *_header(name, path, backend),
        # A graph exported with a fixed batch (--static) takes exactly that batch.
        f"max_batch_size: {MAX_BATCH_SIZE if batched else 0}",
        *_io("input", inputs, batched),
        *_io("output", outputs, batched),
    ]
    return "\n".join(lines) + "\n"


def streaming_config(name: str, path: Path, state: dict) -> str:
    """config.pbtxt of the streaming step graph, its state kept by Triton between requests.

    Each request sends a sequence's next `input_ids` (START on the first, END on the
    last) and gets their logits; Triton feeds `present.*` of one request back as
    `past.*` of the next. The state starts empty: zeros with 0 past chunks and tokens.
    max_batch_size is 1 because sequences carry states of different lengths, which
    cannot be stacked into one batch.
    """
    inputs, outputs = graph_tensors(path)
    pairs = dict(zip(state["inputs"], state["outputs"]))  # past.L.field -> present.L.field
    tensors = {t.name: t for t in inputs + outputs}
    missing = [n for pair in pairs.items() for n in pair if n not in tensors]
    if missing:
        raise UserError(f"{path.name} lacks the state tensors its manifest lists ({', '.join(missing[:3])}): re-export")
    lines = [
        *_header(name, path, "onnxruntime"),
        "max_batch_size: 1",
        *_io("input", [t for t in inputs if t.name not in pairs], True),
        *_io("output", [t for t in outputs if t.name not in pairs.values()], True),
        "sequence_batching {",
        "  # Implicit state: Triton keeps present.* and feeds it back as past.*. The -1",
        "  # dims (finished chunks, tokens of the current chunk) change from step to step.",
        "  state [",
    ]
    for i, (past, present) in enumerate(pairs.items()):
        tensor = tensors[past]
        dims = tensor.dims[1:]
        lines += [
            "    {",
            f'      input_name: "{past}"',
            f'      output_name: "{present}"',
            f"      data_type: {tensor.data_type}",
            f"      dims: {_dims(dims)}",
            "      initial_state {",
            '        name: "empty"',
            f"        data_type: {tensor.data_type}",
            f"        dims: {_dims(tuple(0 if d == -1 else d for d in dims))}",
            "        zero_data: true",
            "      }",
            "    }" + ("," if i < len(pairs) - 1 else ""),
        ]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def python_logits_config(name: str, path: Path, vocab_size: int) -> str:
    """config.pbtxt of the full-sequence graph on the Python backend (model.py runs it
    with onnxruntime, one session run per request)."""
    lines = [
        "instance_group [ { kind: KIND_CPU, count: 1 } ]",
        *_parameters({"mode": "full", "onnx_file": path.name, "vocab_size": vocab_size}),
    ]
    return logits_config(name, path, "python") + "\n".join(lines) + "\n"


def python_decode_config(name: str, path: Path, state: dict, vocab_size: int, idle_seconds: int = IDLE_SECONDS) -> str:
    """config.pbtxt of the decode graph on the Python backend, behind the sequence batcher.

    Each request sends a sequence's next `input_ids` (batch 1; `sequence_start` on the
    first, `sequence_end` on the last, its correlation id as `sequence_id`) and gets their
    logits and `open_sequences` (how many sequences the instance holds state for). The
    "oldest" strategy lets any number of sequences interleave on one instance, which
    tells them apart by the CORRID control input; their states never leave model.py.
    """
    inputs, outputs = graph_tensors(path)
    names = {t.name: t for t in inputs + outputs}
    missing = [n for n in state["inputs"] if n not in names]
    if missing:
        raise UserError(f"{path.name} lacks the state tensors its manifest lists ({', '.join(missing[:3])}): re-export")
    opened = TensorSpec("open_sequences", "TYPE_INT64", (-1, 1))
    lines = [
        *_header(name, path, "python"),
        f"max_batch_size: {MAX_BATCH_SIZE}",
        *_io("input", [t for t in inputs if t.name not in state["inputs"]], True),
        *_io("output", [outputs[0], opened], True),
        "instance_group [ { kind: KIND_CPU, count: 1 } ]",
        *_sequence_batching(idle_seconds),
        *_parameters(
            {
                "mode": "decode",
                "onnx_file": path.name,
                "vocab_size": vocab_size,
                "idle_seconds": idle_seconds,
                "state_shapes": json.dumps(state["inputs"]),
            }
        ),
    ]
    return "\n".join(lines) + "\n"


def rows_config(name: str, decode_path: Path, idle_seconds: int, limits: dict) -> str:
    """config.pbtxt of the step model over `runtime.batching.Sequences` (mode `rows`).

    The protocol of `python_decode_config` (input_ids of batch 1 per request, the sequence
    batcher's START / END / CORRID, logits and open_sequences out); the "oldest" strategy
    hands one `execute` the requests of up to max_batch_size sequences, whose one-token
    requests then run as one row-step call.
    """
    inputs, outputs = graph_tensors(decode_path)
    tokens = next(t for t in inputs if not t.name.startswith("past."))
    opened = TensorSpec("open_sequences", "TYPE_INT64", (-1, 1))
    lines = [
        *_header(name, decode_path, "python"),
        f"max_batch_size: {MAX_BATCH_SIZE}",
        *_io("input", [tokens], True),
        *_io("output", [outputs[0], opened], True),
        "instance_group [ { kind: KIND_CPU, count: 1 } ]",
        *_sequence_batching(idle_seconds),
        *_parameters({"mode": "rows", "idle_seconds": idle_seconds, **limits}),
    ]
    return "\n".join(lines) + "\n"


def generate_config(name: str, limits: dict) -> str:
    """config.pbtxt of the generate model (mode `generate`): decoupled, so one request gets
    a response per token; inputs and outputs named as Triton's vLLM backend's, plus
    `input_ids` (a prompt as token ids) and `output_ids` (the new tokens' ids)."""
    optional = [
        ("text_input", "TYPE_STRING", 1),
        ("input_ids", "TYPE_INT64", -1),
        ("max_tokens", "TYPE_INT32", 1),
        ("sampling_parameters", "TYPE_STRING", 1),
        ("stream", "TYPE_BOOL", 1),
        ("exclude_input_in_output", "TYPE_BOOL", 1),
    ]
    lines = [
        f"# Written by bsbr-export: in-flight batching over {ROWS_GRAPH} and {DECODE_GRAPH} (1/export/).",
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 0",
        "model_transaction_policy { decoupled: true }",
        "input [",
        ",\n".join(f'  {{ name: "{n}", data_type: {t}, dims: [ {d} ], optional: true }}' for n, t, d in optional),
        "]",
        "output [",
        '  { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] },',
        '  { name: "output_ids", data_type: TYPE_INT64, dims: [ -1 ] }',
        "]",
        "instance_group [ { kind: KIND_CPU, count: 1 } ]",
        *_parameters({"mode": "generate", **limits}),
    ]
    return "\n".join(lines) + "\n"


def _sequence_batching(idle_seconds: int) -> list[str]:
    """The sequence batcher's "oldest" strategy: any number of sequences interleave on one
    instance, told apart by the CORRID control input; their states never leave model.py."""
    return [
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {idle_seconds * 1_000_000}",
        f"  oldest {{ max_candidate_sequences: {MAX_SEQUENCES}, max_queue_delay_microseconds: 0 }}",
        "  control_input [",
        '    { name: "START", control [ { kind: CONTROL_SEQUENCE_START, int32_false_true: [ 0, 1 ] } ] },',
        '    { name: "END", control [ { kind: CONTROL_SEQUENCE_END, int32_false_true: [ 0, 1 ] } ] },',
        '    { name: "CORRID", control [ { kind: CONTROL_SEQUENCE_CORRID, data_type: TYPE_UINT64 } ] }',
        "  ]",
        "}",
    ]


def _header(name: str, path: Path, backend: str) -> list[str]:
    """A config's first lines: where it came from, its name, what runs it."""
    runs = 'platform: "onnxruntime_onnx"' if backend == "onnxruntime" else f'backend: "{backend}"'
    return [
        f"# Written by bsbr-export from {path.name}: names, types and dims are the graph's.",
        f'name: "{name}"',
        runs,
    ]


def _parameters(values: dict) -> list[str]:
    """A `parameters` section; json.dumps quotes and escapes as protobuf text format does."""
    entries = [
        f"  {{ key: {json.dumps(k)}, value: {{ string_value: {json.dumps(str(v))} }} }}" for k, v in values.items()
    ]
    return ["parameters ["] + [e + ("," if i < len(entries) - 1 else "") for i, e in enumerate(entries)] + ["]"]


def _batch_is_dynamic(tensors: list[TensorSpec]) -> bool:
    """True when every tensor's first dim is symbolic: Triton may then batch requests."""
    return all(t.dims and t.dims[0] == -1 for t in tensors)


def _dims(dims: tuple[int, ...]) -> str:
    return f"[ {', '.join(map(str, dims))} ]"


def _io(section: str, tensors: list[TensorSpec], batched: bool) -> list[str]:
    """An input/output section; with `batched`, dims leave out the batch dim (Triton adds it)."""
    lines = [f"{section} ["]
    for i, t in enumerate(tensors):
        lines += [
            "  {",
            f'    name: "{t.name}"',
            f"    data_type: {t.data_type}",
            f"    dims: {_dims(t.dims[1:] if batched else t.dims)}",
            "  }" + ("," if i < len(tensors) - 1 else ""),
        ]
    return lines + ["]"]
