"""Writing artifacts: ONNX (torch.export-based exporter) and TorchScript (traced).

Each function writes one artifact atomically and returns its path; each checks what it
wrote (ONNX: checker, shape inference, symbolic dims; TorchScript: parity with eager at
lengths and batch sizes the trace never saw) before the file appears.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from bsbr_export.errors import UserError
from bsbr_export.formats import DEFAULT_OPSET
from bsbr_export.graphs import export_graph, flatten_state, state_dims, update_dims
from bsbr_export.io import check_parent_dir
from bsbr_export.model import BSBRModel
from bsbr_export.versions import versions

# The torch.export-based exporter writes opset 18 and up; ONNX Runtime 1.20+ runs <= 23.
SUPPORTED_OPSETS = range(18, 24)
TWO_GIB = 2 * 1024**3
EXAMPLE_BATCH = 2  # batch 1 would let the exporter specialize the batch dim to 1


class ExportError(RuntimeError):
    """An export produced something wrong (a bug on our side, not a user mistake)."""


def default_example_length(chunk_size: int) -> int:
    """A length `k*c + r` with `k >= 2` and `0 < r < c`: neither 1 nor a multiple of c,
    so tracing cannot specialize the sequence dim or the padding."""
    return 2 * chunk_size + max(1, chunk_size // 2)


def example_ids(model: BSBRModel, batch: int, length: int, seed: int = 0) -> Tensor:
    """Random token ids from their own generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


def example_state(model: BSBRModel, batch: int, seed: int = 0) -> list[Tensor]:
    """A flat streaming state mid-chunk (2 finished chunks, then c//2 + 1 tokens): every
    state dim is >= 2 and differs from the others, so none gets specialized."""
    c = model.config.chunk_size
    ids = example_ids(model, batch, 2 * c + c // 2 + 1, seed)
    with torch.no_grad():
        _, state = model.stream(ids, model.init_state(batch))
    return flatten_state(state)


def check_opset(opset: int) -> None:
    """UserError unless `opset` is one the exporter and ONNX Runtime both support."""
    if opset not in SUPPORTED_OPSETS:
        raise UserError(
            f"opset {opset} is not supported: pass --opset between {SUPPORTED_OPSETS.start} "
            f"and {SUPPORTED_OPSETS.stop - 1}"
        )


def check_static_shape(model: BSBRModel, static_shape: tuple[int, int] | None, streaming: bool) -> None:
    """UserError for a static shape that cannot be exported."""
    if static_shape is None:
        return
    if streaming:
        raise UserError("--static applies to the full-sequence graph only: drop --streaming or --static")
    if len(static_shape) != 2 or any(not isinstance(d, int) or d < 1 for d in static_shape):
        raise UserError(f"static shape must be BATCHxLENGTH with both >= 1, got {static_shape}")


@contextlib.contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """A temp dir beside `path`: files staged there are moved into place on success."""
    check_parent_dir(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet():
    """Exporter chatter (progress prints, deprecation and tracer warnings) off."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "torchvision is not installed" notes on every export
    stack.callback(logger.setLevel, level)
    return stack


def export_onnx(
    model: BSBRModel,
    path: str | os.PathLike,
    *,
    dynamic: bool = True,
    static_shape: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    example_length: int | None = None,
    streaming: bool = False,
    decode: bool = False,
    attention_mask: bool = True,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Export `model` to ONNX at `path` (plus `path.data` when weights exceed 2 GiB).

    dynamic: batch and sequence axes symbolic (named `batch`, `sequence`); a
    `static_shape=(batch, length)` fixes them instead. streaming: export one streaming
    step (`input_ids` + `past.*` -> `logits` + `present.*`) instead of the full forward.
    decode: a streaming step that returns only what changed (`new.*` finished chunks to
    append, `present.*` for the current chunk; see `DecodeGraph`). The model config,
    export settings and library versions go into `metadata_props`.
    Returns the files written (the .onnx first).
    """
    path = Path(path)
    streaming = streaming or decode
    check_opset(opset)
    check_static_shape(model, static_shape, streaming)
    model = model.eval()
    cfg = model.config
    dynamic = dynamic and static_shape is None
    graph = export_graph(model, kind_of(streaming, decode), attention_mask)
    batch, length = static_shape or (EXAMPLE_BATCH, example_length or default_example_length(cfg.chunk_size))
    ids = example_ids(model, batch, length)
    if streaming:
        args = (ids, *example_state(model, batch))
        axes = {"input_ids": {0: "batch", 1: "new_tokens"}, **state_dims(cfg.num_layers, "past")}
    else:
        args = (ids, torch.ones_like(ids)) if attention_mask else (ids,)
        axes = {name: {0: "batch", 1: "sequence"} for name in graph.input_names}
    dynamic_shapes = _dynamic_shapes(graph, axes, streaming) if dynamic else None

    settings = {
        "kind": kind_of(streaming, decode),
        "dynamic": dynamic,
        "static_shape": list(static_shape) if static_shape else None,
        "opset": opset,
        "example_shape": [batch, length],
        "attention_mask": attention_mask and not streaming,
    }
    props = {
        "bsbr.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "bsbr.chunk_size": str(cfg.chunk_size),
        "bsbr.export": json.dumps(settings, sort_keys=True),
        "bsbr.versions": json.dumps(versions(), sort_keys=True),
        **(metadata or {}),
    }
    if streaming:
        props["bsbr.state"] = json.dumps(state_spec(model), sort_keys=True)

    with _staging(path) as tmp, _quiet():
        with torch.no_grad():
            program = torch.onnx.export(
                graph,
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=graph.input_names,
                output_names=graph.output_names,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        if streaming and dynamic:
            outputs = update_dims(cfg.num_layers) if decode else state_dims(cfg.num_layers, "present")
            _rename_output_dims(program.model, outputs)
        elif dynamic:  # the output is sliced back from whole chunks: Min(sequence, ...)
            _rename_output_dims(program.model, {name: {0: "batch", 1: "sequence"} for name in graph.output_names})
        program.model.metadata_props.update(props)
        staged = tmp / path.name
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        program.save(staged, external_data=weight_bytes >= TWO_GIB)
        _check_onnx(staged, axes if dynamic else {}, tmp)
        written = sorted(tmp.iterdir(), key=lambda p: p.suffix != ".onnx")
        final = [path.with_name(p.name) for p in written]
        for src, dst in reversed(list(zip(written, final))):  # data first, graph last
            os.replace(src, dst)
    return final


def _dynamic_shapes(graph, axes: dict[str, dict[int, str]], streaming: bool):
    dims: dict[str, torch.export.Dim] = {}

    def spec(name: str) -> dict[int, torch.export.Dim]:
        return {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes[name].items()}

    specs = [spec(name) for name in graph.input_names]
    # StreamingGraph.forward(input_ids, *past): the varargs are one tuple argument.
    return [specs[0], tuple(specs[1:])] if streaming else specs


def _rename_output_dims(model, axes: dict[str, dict[int, str]]) -> None:
    """Give computed output dims readable names (not `past_chunks + Min(...)`)."""
    import onnx_ir as ir

    for value in model.graph.outputs:
        if value.name in axes and value.shape is not None:
            dims = list(value.shape)
            for axis, label in axes[value.name].items():
                if not isinstance(dims[axis], int):
                    dims[axis] = ir.SymbolicDim(label)
            value.shape = ir.Shape(dims)


def _check_onnx(path: Path, axes: dict[str, dict[int, str]], scratch: Path) -> None:
    """Checker (full), shape inference, and the dims that must stay symbolic."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = scratch / "inferred.onnx.tmp"
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
        inferred.unlink()
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported graph {path.name} fails the ONNX checker: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    specialized = []
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, label in axes.get(value.name, {}).items():
            if dims[axis].dim_param != label:
                specialized.append(f"{value.name}[{axis}]={dims[axis].dim_value or dims[axis].dim_param!r}")
    if specialized:
        raise ExportError(f"export specialized dims that must stay symbolic: {', '.join(specialized)}")


def state_spec(model: BSBRModel) -> dict:
    """Names and shapes of the streaming state, for metadata and for callers that build
    the empty initial state: every `past.*` tensor is zeros of its shape with
    `past_chunks = past_tokens = 0`."""
    cfg = model.config
    h, e = cfg.num_heads, cfg.head_dim
    shapes = {
        "meta_keys": ["batch", h, "past_chunks", e],
        "chunk_states": ["batch", h, "past_chunks", cfg.state_size],
        "keys": ["batch", h, "past_tokens", e],
        "values": ["batch", h, "past_tokens", e],
        "retrieved": ["batch", h, e, e],
    }
    inputs = {
        f"past.{layer}.{field}": shape for layer in range(cfg.num_layers) for field, shape in shapes.items()
    }
    return {
        "chunk_size": cfg.chunk_size,
        "inputs": inputs,
        "outputs": {name.replace("past.", "present.", 1): shape for name, shape in inputs.items()},
        "initial": "zeros, with past_chunks = past_tokens = 0",
        "dtype": "float32",
    }


def kind_of(streaming: bool, decode: bool) -> str:
    """The artifact kind (formats.KINDS) for export flags: decode implies streaming."""
    return "decode" if decode else "streaming" if streaming else "logits"


def export_torchscript(
    model: BSBRModel,
    path: str | os.PathLike,
    *,
    streaming: bool = False,
    decode: bool = False,
    attention_mask: bool = True,
    mobile: bool = False,
) -> Path:
    """Trace `model` to TorchScript at `path`; refuses to write a trace that disagrees
    with eager at lengths and batch sizes it was not traced with.

    streaming / decode: trace one streaming step, as in `export_onnx`.
    mobile: save for PyTorch Mobile's lite interpreter (`.ptl`) instead.
    """
    path = Path(path)
    model = model.eval()
    c = model.config.chunk_size
    kind = kind_of(streaming, decode)
    streaming = kind != "logits"
    graph = export_graph(model, kind, attention_mask)
    ids = example_ids(model, EXAMPLE_BATCH, default_example_length(c))
    if streaming:
        args = (ids, *example_state(model, EXAMPLE_BATCH))
    else:
        args = (ids, torch.ones_like(ids)) if attention_mask else (ids,)
    with _staging(path) as tmp, _quiet(), torch.no_grad():
        traced = torch.jit.trace(graph, args, check_trace=False)
        if not mobile:
            traced = torch.jit.freeze(traced.eval())
        elif torch._C._is_xnnpack_enabled():
            from torch.utils.mobile_optimizer import optimize_for_mobile

            traced = optimize_for_mobile(traced)  # freezes and folds; raises without XNNPACK
        check_trace(model, traced, kind, attention_mask)
        staged = tmp / path.name
        if mobile:
            traced._save_for_lite_interpreter(str(staged))
        else:
            torch.jit.save(traced, str(staged))
        os.replace(staged, path)
    return path


def check_trace(model: BSBRModel, traced, kind: str, attention_mask: bool) -> None:
    """Compare the trace with eager at shapes it never saw (a frozen chunk count fails)."""
    from bsbr_export.runners import EagerRunner, TorchScriptRunner
    from bsbr_export.validate import check_parity, default_cases

    reference = EagerRunner(model, kind, attention_mask)
    runner = TorchScriptRunner.from_module(traced, reference.input_names, reference.output_names)
    cases = default_cases(model.config.chunk_size, kind != "logits", long_length=4 * model.config.chunk_size + 3)
    report = check_parity("torchscript", reference, runner, cases, model.config.vocab_size,
                          state_shapes=state_spec(model)["inputs"])
    if not report:
        raise ExportError("TorchScript trace disagrees with eager: " + "; ".join(report.failures))
