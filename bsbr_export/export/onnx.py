"""ONNX graphs through the torch.export-based exporter (`torch.onnx.export(dynamo=True)`).

Each graph is checked before it is written: the ONNX checker, shape inference, the dims
that must stay symbolic, and agreement with eager at lengths and batches it was not
exported with (`checks.check_generalizes`, through the ONNX Runtime runner).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from torch import nn

from bsbr_export.defaults import DEFAULT_OPSET
from bsbr_export.errors import UserError
from bsbr_export.export.checks import FREEZE_HINT, DoesNotGeneralize, ExportError, check_generalizes, check_kind
from bsbr_export.export.examples import dynamic_shapes, example_args, graph_axes, output_axes
from bsbr_export.export.staging import quiet, staging
from bsbr_export.formats import kind_of, recorded_kind
from bsbr_export.manifest import state_manifest
from bsbr_export.model.graphs import export_graph
from bsbr_export.model.probe import spec_for
from bsbr_export.model.spec import EXAMPLE_BATCH, ModelSpec
from bsbr_export.runtime.onnx import OnnxRunner
from bsbr_export.versions import versions

# The torch.export-based exporter writes opset 18 and up; ONNX Runtime 1.20+ runs <= 23.
SUPPORTED_OPSETS = range(18, 24)
TWO_GIB = 2 * 1024**3


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
    kind: str | None = None,
    attention_mask: bool = True,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Export `model` (described by `spec`, default `spec_for(model)`) to ONNX at `path`
    (plus `path.data` when weights exceed 2 GiB).

    dynamic: batch and sequence axes symbolic (named `batch`, `sequence`); a
    `static_shape=(batch, length)` fixes them instead. streaming: export one streaming
    step (tokens + `past.*` -> outputs + `present.*`) instead of the full forward.
    decode: a streaming step that returns only what changed (`new.*` finished chunks to
    append, `present.*` for the current chunk; see `DecodeGraph`). kind: the graph kind by
    name (`formats.KINDS`, "rows" among them), instead of the two flags. attention_mask=False
    leaves an optional padding mask out of the graph. The spec, export settings and
    library versions go into `metadata_props`. Before anything is written the graph runs
    at lengths and batches it was not exported with (`DoesNotGeneralize` if it cannot).
    Returns the files written (the .onnx first).
    """
    path = Path(path)
    kind = kind or kind_of(streaming or decode, decode)
    check_opset(opset)
    check_static_shape(static_shape, kind != "full")
    model = model.eval()
    spec = spec_for(model, spec)
    if not attention_mask:
        spec = spec.without_mask()
    check_kind(model, spec, kind)
    dynamic = dynamic and static_shape is None
    graph = export_graph(model, spec, kind)
    batch, length = static_shape or (EXAMPLE_BATCH, None)
    args = example_args(model, spec, kind, batch, length)
    axes = graph_axes(spec, kind) if dynamic else {}
    settings = {
        "kind": recorded_kind(kind),
        "dynamic": dynamic,
        "static_shape": list(static_shape) if static_shape else None,
        "opset": opset,
        "example_shape": list(args[0].shape[:2]),
        "attention_mask": spec.mask is not None and kind == "full",
    }
    with staging(path) as tmp, quiet():
        program = _torch_onnx_export(model, graph, args, axes, opset)
        if dynamic:
            _rename_output_dims(program.model, output_axes(spec, kind))
        program.model.metadata_props.update(graph_metadata(model, spec, settings, metadata))
        staged = tmp / path.name
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        program.save(staged, external_data=weight_bytes >= TWO_GIB)
        _check_onnx(staged, axes, tmp)
        if dynamic:
            check_generalizes(
                model, lambda inputs, outputs: OnnxRunner(staged, inputs, outputs), kind, spec, "ONNX graph"
            )
        written = sorted(tmp.iterdir(), key=lambda p: p.suffix != ".onnx")
        final = [path.with_name(p.name) for p in written]
        for src, dst in reversed(list(zip(written, final))):  # data first, graph last
            os.replace(src, dst)
    return final


def graph_metadata(model: nn.Module, spec: ModelSpec, settings: dict, extra: dict[str, str] | None) -> dict[str, str]:
    """The graph's `metadata_props`: spec, export settings, library versions, the
    model's config when it has one, and a streaming graph's state."""
    props = {
        "bsbr.spec": json.dumps(spec.to_dict(), sort_keys=True),
        "bsbr.chunk_size": str(spec.chunk_size),
        "bsbr.export": json.dumps(settings, sort_keys=True),
        "bsbr.versions": json.dumps(versions(), sort_keys=True),
        **(extra or {}),
    }
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        props["bsbr.config"] = json.dumps(config.to_dict(), sort_keys=True)
    if settings["kind"] != recorded_kind("full"):
        props["bsbr.state"] = json.dumps(state_manifest(spec), sort_keys=True)
    return props


def _torch_onnx_export(model: nn.Module, graph: nn.Module, args: tuple, axes: dict, opset: int):
    """torch.onnx's program of `graph` on `args`, dynamic on `axes` (none: static)."""
    shapes = dynamic_shapes(graph, axes) if axes else None
    try:
        with torch.no_grad():
            return torch.onnx.export(
                graph,
                args,
                dynamo=True,
                dynamic_shapes=shapes,
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


def _rename_output_dims(model, axes: dict[str, dict[int, str]]) -> None:
    """Give computed output dims readable names (not `past_chunks + Min(...)`)."""
    for value in model.graph.outputs:
        if value.name in axes and value.shape is not None:
            dims = list(value.shape)
            for axis, label in axes[value.name].items():
                if axis < len(dims) and not isinstance(dims[axis], int):
                    dims[axis] = ir.SymbolicDim(label)
            value.shape = ir.Shape(dims)


def _check_onnx(path: Path, axes: dict[str, dict[int, str]], scratch: Path) -> None:
    """Checker (full), shape inference, and the dims that must stay symbolic."""
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
