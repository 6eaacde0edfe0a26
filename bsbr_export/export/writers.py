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
from torch import Tensor, nn

from bsbr_export.errors import UserError
from bsbr_export.export.formats import DEFAULT_OPSET
from bsbr_export.export.graphs import DefaultMask, export_graph, flatten_state
from bsbr_export.io import check_parent_dir
from bsbr_export.model.spec import (
    EXAMPLE_BATCH,
    ModelSpec,
    example_inputs,
    example_length,
    probe_lengths,
    spec_for,
)
from bsbr_export.versions import versions

# The torch.export-based exporter writes opset 18 and up; ONNX Runtime 1.20+ runs <= 23.
SUPPORTED_OPSETS = range(18, 24)
TWO_GIB = 2 * 1024**3


class ExportError(RuntimeError):
    """An export produced something wrong (a bug on our side, not a user mistake)."""


class DoesNotGeneralize(UserError):
    """The module exports, but the graph is frozen to the example's shapes (a Python loop
    over chunks, float math on sizes, `.item()`): the user's code must change."""


FREEZE_HINT = ("`bsbr-export doctor` names the line that freezes it (a Python loop over chunks, math.ceil on a "
               "size, .item(), a reshape before padding), or build on bsbr_export.nn.BSBRAttention")


def example_state(model, spec: ModelSpec, batch: int, seed: int = 0) -> list[Tensor]:
    """A flat streaming state mid-chunk (2 finished chunks, then c//2 + 1 tokens): every
    state dim is >= 2 and differs from the others, so none gets specialized. Contiguous,
    as callers feed it: AOTInductor compiles an input's example strides in unchecked
    (a step's `retrieved` is a view into a larger tensor)."""
    c = spec.chunk_size
    ids = example_inputs(spec, batch, 2 * c + c // 2 + 1, seed)[spec.tokens.name]
    with torch.no_grad():
        _, state = model.stream(ids, model.init_state(batch))
    return [t.contiguous() for t in flatten_state(state)]


def example_new_tokens(chunk_size: int) -> int:
    """New tokens of a streaming example: after `example_state`'s c//2 + 1 cached tokens
    the block is 3c + 2 long, so the sizes derived from it (3 finished chunks, 2 tokens
    left over) are >= 2 as well (for c >= 3). torch.export specializes a derived size
    that is 1 in the example without a constraint violation, only a guard."""
    return 3 * chunk_size + 2 - (chunk_size // 2 + 1)


def example_args(model, spec: ModelSpec, kind: str, batch: int = EXAMPLE_BATCH,
                 length: int | None = None) -> tuple[Tensor, ...]:
    """The example an artifact kind is exported with (shapes chosen so nothing specializes):
    `length` tokens (default `example_length`), or for a streaming step
    `example_new_tokens` after `example_state`."""
    c = spec.chunk_size
    if kind != "logits":
        ids = example_inputs(spec, batch, length or example_new_tokens(c))[spec.tokens.name]
        return (ids, *example_state(model, spec, batch))
    inputs = example_inputs(spec, batch, length or example_length(c))
    return tuple(inputs[name] for name in spec.input_names)


def graph_axes(spec: ModelSpec, kind: str) -> dict[str, dict[int, str]]:
    """Named dynamic axes of an artifact's inputs."""
    if kind != "logits":
        return {spec.tokens.name: {0: "batch", 1: "new_tokens"}, **spec.state.axes("past")}
    return {i.name: {0: "batch", 1: "sequence"} for i in spec.inputs}


def output_axes(spec: ModelSpec, kind: str) -> dict[str, dict[int, str]]:
    """Named dynamic axes of an artifact's outputs (computed dims come out as `Min(...)`)."""
    seq = "sequence" if kind == "logits" else "new_tokens"
    axes = {o.name: ({0: "batch", 1: seq} if o.per_position else {0: "batch"}) for o in spec.outputs}
    if kind == "streaming":
        axes |= spec.state.axes("present")
    elif kind == "decode":
        axes |= spec.state.update_axes()
    return axes


def check_opset(opset: int) -> None:
    """UserError unless `opset` is one the exporter and ONNX Runtime both support."""
    if opset not in SUPPORTED_OPSETS:
        raise UserError(
            f"opset {opset} is not supported: pass --opset between {SUPPORTED_OPSETS.start} "
            f"and {SUPPORTED_OPSETS.stop - 1}"
        )


def check_static_shape(static_shape: tuple[int, int] | None, streaming: bool) -> None:
    """UserError for a static shape that cannot be exported."""
    if static_shape is None:
        return
    if streaming:
        raise UserError("--static applies to the full-sequence graph only: drop --streaming or --static")
    if len(static_shape) != 2 or any(not isinstance(d, int) or d < 1 for d in static_shape):
        raise UserError(f"static shape must be BATCHxLENGTH with both >= 1, got {static_shape}")


def check_kind(model, spec: ModelSpec, kind: str) -> None:
    """UserError when `model` cannot give the artifact kind (it does not stream)."""
    if kind == "logits":
        return
    if not spec.causal:
        raise UserError(f"this model is not causal, so it cannot stream; drop --streaming ({spec.note})")
    if spec.state is None:
        raise UserError(
            f"{type(model).__name__} does not implement the streaming protocol (init_state(batch) and "
            "stream(inputs, state) -> (outputs, state)): drop --streaming"
        )
    if kind == "decode" and not callable(getattr(model, "stream_update", None)):
        raise UserError(f"{type(model).__name__} has no stream_update(inputs, state): it has no decode graph")


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
    model: nn.Module,
    path: str | os.PathLike,
    *,
    spec: ModelSpec | None = None,
    dynamic: bool = True,
    static_shape: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    streaming: bool = False,
    decode: bool = False,
    attention_mask: bool = True,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Export `model` (described by `spec`, default `spec_for(model)`) to ONNX at `path`
    (plus `path.data` when weights exceed 2 GiB).

    dynamic: batch and sequence axes symbolic (named `batch`, `sequence`); a
    `static_shape=(batch, length)` fixes them instead. streaming: export one streaming
    step (tokens + `past.*` -> outputs + `present.*`) instead of the full forward.
    decode: a streaming step that returns only what changed (`new.*` finished chunks to
    append, `present.*` for the current chunk; see `DecodeGraph`). attention_mask=False
    leaves an optional padding mask out of the graph. The spec, export settings and
    library versions go into `metadata_props`. Before anything is written the graph runs
    at lengths and batches it was not exported with (`DoesNotGeneralize` if it cannot).
    Returns the files written (the .onnx first).
    """
    path = Path(path)
    kind = kind_of(streaming or decode, decode)
    streaming = kind != "logits"
    check_opset(opset)
    check_static_shape(static_shape, streaming)
    model = model.eval()
    spec = spec_for(model, spec)
    if not attention_mask:
        spec = spec.without_mask()
    check_kind(model, spec, kind)
    dynamic = dynamic and static_shape is None
    graph = export_graph(model, spec, kind)
    batch, length = static_shape or (EXAMPLE_BATCH, None)
    args = example_args(model, spec, kind, batch, length)
    axes = graph_axes(spec, kind)
    dynamic_shapes = _dynamic_shapes(graph, axes, streaming) if dynamic else None

    settings = {
        "kind": kind,
        "dynamic": dynamic,
        "static_shape": list(static_shape) if static_shape else None,
        "opset": opset,
        "example_shape": list(args[0].shape[:2]),
        "attention_mask": spec.mask is not None and not streaming,
    }
    props = {
        "bsbr.spec": json.dumps(spec.to_dict(), sort_keys=True),
        "bsbr.chunk_size": str(spec.chunk_size),
        "bsbr.export": json.dumps(settings, sort_keys=True),
        "bsbr.versions": json.dumps(versions(), sort_keys=True),
        **(metadata or {}),
    }
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        props["bsbr.config"] = json.dumps(config.to_dict(), sort_keys=True)
    if streaming:
        props["bsbr.state"] = json.dumps(state_manifest(spec), sort_keys=True)

    with _staging(path) as tmp, _quiet():
        try:
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
        except torch.onnx.errors.OnnxExporterError as exc:
            cause = str(exc.__cause__ or exc).strip().splitlines()
            raise DoesNotGeneralize(
                f"torch.onnx could not export {type(model).__name__} with dynamic batch and sequence: "
                f"{cause[0] if cause else exc}; {FREEZE_HINT}"
            ) from None
        if dynamic:
            _rename_output_dims(program.model, output_axes(spec, kind))
        program.model.metadata_props.update(props)
        staged = tmp / path.name
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        program.save(staged, external_data=weight_bytes >= TWO_GIB)
        _check_onnx(staged, axes if dynamic else {}, tmp)
        if dynamic:
            probe_onnx(staged, graph, model, spec, kind)
        written = sorted(tmp.iterdir(), key=lambda p: p.suffix != ".onnx")
        final = [path.with_name(p.name) for p in written]
        for src, dst in reversed(list(zip(written, final))):  # data first, graph last
            os.replace(src, dst)
    return final


def probe_onnx(path: Path, graph: nn.Module, model, spec: ModelSpec, kind: str) -> None:
    """Run the staged graph at lengths and batches it was not exported with, and refuse
    one that fails or disagrees: a graph can declare a symbolic `sequence` dim and still
    run at the example's chunk count only (what torch.onnx's own verification misses,
    since it runs just the example)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for batch, length in probe_shapes(spec):
        args = _probe_args(model, spec, kind, batch, length)
        feeds = {name: arg.numpy() for name, arg in zip(graph.input_names, args)}
        try:
            got = session.run(None, feeds)
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
            raise DoesNotGeneralize(
                f"the exported graph of {type(model).__name__} runs only at the example's shape: at batch "
                f"{batch} x length {length} ONNX Runtime fails ({str(exc).splitlines()[0][:200]}); {FREEZE_HINT}"
            ) from None
        _agree(graph, args, got, spec, f"the ONNX graph of {type(model).__name__}", batch, length)


def probe_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(batch, length) pairs a graph must run at besides the example's."""
    lengths = probe_lengths(spec.chunk_size)
    return [(1 if i % 2 else 3, n) for i, n in enumerate(lengths)]


def _probe_args(model, spec: ModelSpec, kind: str, batch: int, length: int) -> tuple[Tensor, ...]:
    """Inputs for a probe: the full sequence, or `length` new tokens after an odd state."""
    if kind == "logits":
        inputs = example_inputs(spec, batch, length, seed=length)
        return tuple(inputs[name] for name in spec.input_names)
    ids = example_inputs(spec, batch, length + spec.chunk_size + 3, seed=length)[spec.tokens.name]
    with torch.no_grad():
        _, state = model.stream(ids[:, length:], model.init_state(batch))
    return (ids[:, :length], *flatten_state(state))


def _agree(graph, args, got, spec: ModelSpec, what: str, batch: int, length: int) -> None:
    """DoesNotGeneralize unless `got` (flat outputs) matches eager on `args`."""
    import numpy as np

    with torch.no_grad():
        want = graph(*args)
    want = want if isinstance(want, tuple) else (want,)
    for name, w, g in zip(graph.output_names, want, got):
        w = w.numpy()
        g = np.asarray(g)
        scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
        if w.shape != g.shape or (w.size and float(np.abs(w - g).max()) > 1e-3 * scale):
            detail = f"shape {list(g.shape)} != {list(w.shape)}" if w.shape != g.shape else \
                f"max abs error {float(np.abs(w - g).max()):.2e}"
            raise DoesNotGeneralize(
                f"{what} disagrees with eager away from the example's shape: at batch {batch} x length {length}, "
                f"{name}: {detail}; {FREEZE_HINT}"
            )


def _dynamic_shapes(graph, axes: dict[str, dict[int, str]], streaming: bool, bounds: dict[str, int] | None = None):
    """torch.export's dynamic_shapes for a graph: one `Dim` per axis label, with a
    maximum where `bounds` gives one."""
    dims: dict[str, torch.export.Dim] = {}
    bounds = bounds or {}

    def spec(name: str) -> dict[int, torch.export.Dim]:
        return {axis: dims.setdefault(label, torch.export.Dim(label, max=bounds.get(label)))
                for axis, label in axes[name].items()}

    specs = [spec(name) for name in graph.input_names]
    # The graphs' forward(tokens, *past) / forward(*inputs): varargs are one tuple argument.
    return [specs[0], tuple(specs[1:])] if streaming else [tuple(specs)]


def _rename_output_dims(model, axes: dict[str, dict[int, str]]) -> None:
    """Give computed output dims readable names (not `past_chunks + Min(...)`)."""
    import onnx_ir as ir

    for value in model.graph.outputs:
        if value.name in axes and value.shape is not None:
            dims = list(value.shape)
            for axis, label in axes[value.name].items():
                if axis < len(dims) and not isinstance(dims[axis], int):
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
        raise DoesNotGeneralize(
            f"the export specialized dims that must stay symbolic: {', '.join(specialized)}; {FREEZE_HINT}"
        )


def state_manifest(spec: ModelSpec) -> dict:
    """Names and shapes of the streaming state, for metadata and for callers that build
    the empty initial state: every `past.*` tensor is zeros of its shape with the named
    growing axes (`past_chunks`, `past_tokens`) at 0."""
    state = spec.state
    return {
        "chunk_size": spec.chunk_size,
        "inputs": state.inputs,
        "outputs": state.outputs,
        "appended": list(state.appended),
        "initial": "zeros, with past_chunks = past_tokens = 0",
        "dtype": state.dtype,
    }


def kind_of(streaming: bool, decode: bool) -> str:
    """The artifact kind (formats.KINDS) for export flags: decode implies streaming."""
    return "decode" if decode else "streaming" if streaming else "logits"


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    spec: ModelSpec | None = None,
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
    spec = spec_for(model, spec)
    if not attention_mask:
        spec = spec.without_mask()
    kind = kind_of(streaming or decode, decode)
    check_kind(model, spec, kind)
    graph = export_graph(model, spec, kind)
    args = example_args(model, spec, kind)
    with _staging(path) as tmp, _quiet(), torch.no_grad():
        traced = torch.jit.trace(graph, args, check_trace=False)
        if kind == "logits" and len(spec.inputs) == 2 and spec.inputs[1].optional and len(spec.outputs) == 1:
            traced = torch.jit.script(DefaultMask(traced))  # callable with input_ids alone
        if not mobile:
            traced = torch.jit.freeze(traced.eval())
        elif torch._C._is_xnnpack_enabled():
            from torch.utils.mobile_optimizer import optimize_for_mobile

            traced = optimize_for_mobile(traced)  # freezes and folds; raises without XNNPACK
        check_trace(model, traced, kind, spec)
        staged = tmp / path.name
        if mobile:
            traced._save_for_lite_interpreter(str(staged))
        else:
            torch.jit.save(traced, str(staged))
        os.replace(staged, path)
    return path


def check_trace(model: nn.Module, traced, kind: str, spec: ModelSpec) -> None:
    """Compare the trace with eager at shapes it never saw (a frozen chunk count fails),
    on every output."""
    from bsbr_export.proof.runners import TorchScriptRunner

    check_generalizes(model, lambda inputs, outputs: TorchScriptRunner.from_module(traced, inputs, outputs), kind,
                      spec, "TorchScript trace")


def check_generalizes(model: nn.Module, make_runner, kind: str, spec: ModelSpec, what: str) -> None:
    """DoesNotGeneralize unless the artifact that `make_runner(input_names, output_names)`
    runs matches eager on every output at lengths, batches and (streamed) states it was
    not exported with; `what` names it in the message ("TorchScript trace")."""
    from bsbr_export.proof.runners import EagerRunner
    from bsbr_export.proof.validate import check_parity, default_cases

    reference = EagerRunner(model, spec, kind)
    runner = make_runner(reference.input_names, reference.output_names)
    cases = default_cases(spec.chunk_size, kind != "logits", long_length=4 * spec.chunk_size + 3)
    try:
        report = check_parity(what, reference, runner, cases, spec)
    except RuntimeError as exc:  # the artifact cannot even run at another shape
        raise DoesNotGeneralize(
            f"the {what} of {type(model).__name__} fails away from the example's shape "
            f"({str(exc).strip().splitlines()[0][:200]}); {FREEZE_HINT}"
        ) from None
    if not report:
        raise DoesNotGeneralize(
            f"the {what} of {type(model).__name__} disagrees with eager: "
            + "; ".join(report.failures[:3]) + f"; {FREEZE_HINT}"
        )
