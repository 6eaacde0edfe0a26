"""ExecuTorch programs (`.pte`) lowered to XNNPACK: `torch.export` with bounded batch and
sequence dims, then ExecuTorch's standard `to_edge_transform_and_lower` with the
`XnnpackPartitioner`.

ExecuTorch plans every activation's memory ahead of time, for the largest shape the
dims allow, so a program has a maximum length and batch (`max_length`, `max_batch`):
they are stored in the `.pte` itself as constant methods (as ExecuTorch's LLM exports
store `get_max_seq_len`) and checked before every call, so a longer input is refused
in one line instead of failing inside the runtime.

`executorch` is an optional extra (`pip install -c constraints.txt ".[executorch]"`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from bsbr_export.errors import UserError
from bsbr_export.export.examples import dynamic_shapes, example_args, graph_axes
from bsbr_export.export.staging import quiet, staging
from bsbr_export.model.graphs import export_graph
from bsbr_export.model.probe import spec_for
from bsbr_export.model.spec import EXAMPLE_BATCH, example_length
from bsbr_export.runtime.executorch import quiet_runtime, require_executorch

# Memory is planned for the largest input, so the defaults cover the validation lengths
# (up to 2048) and batches (up to 3) without planning a server-sized arena.
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_BATCH = 4


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    """aten.layer_norm in ops XNNPACK takes: it has no layer norm, and its mean is a
    global average over the two innermost dims of a 4D tensor, so every row (the
    normalized trailing dims, flattened) becomes a [1, 1, width] image (one channel: no
    layout transpose)."""
    rows = x.reshape(-1, 1, 1, math.prod(normalized_shape))
    centered = rows - rows.mean(dim=(-2, -1), keepdim=True)
    variance = (centered * centered).mean(dim=(-2, -1), keepdim=True)
    y = (centered * torch.rsqrt(variance + eps)).reshape(x.shape)
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


def _static_views(graph_module):
    """An edge-dialect pass that lets XNNPACK take the reshapes: it delegates a view
    only when every dim is a number but at most one `-1`, while torch.export writes each
    view's dims as symbolic sizes. A view with exactly one symbolic dim gets `-1` there
    (the others fix it); an expand to its input's own shape (what `matmul` emits around
    its `bmm`) is dropped."""
    from executorch.exir.dialects._ops import ops as exir_ops  # optional extra
    from torch.fx.passes.infra.pass_base import PassResult  # the pass protocol ExecuTorch's lowering calls

    view, expand = exir_ops.edge.aten.view_copy.default, exir_ops.edge.aten.expand_copy.default
    changed = False
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == view:
            shape = list(node.args[1])
            symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
            if len(symbolic) == 1 and -1 not in shape:
                shape[symbolic[0]] = -1
                node.args = (node.args[0], shape)
                changed = True
        elif node.target == expand and tuple(node.args[0].meta["val"].shape) == tuple(node.meta["val"].shape):
            node.replace_all_uses_with(node.args[0])
            changed = True
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return PassResult(graph_module, changed)


def lower(program, limits: dict[str, int]):
    """An exported program -> ExecuTorch's edge program lowered to XNNPACK, with
    `limits` as constant methods. Layer norms are decomposed first and views made
    static where they can be, so that XNNPACK takes them too (more of the graph in
    fewer delegate calls)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # optional extra
    from executorch.exir import to_edge_transform_and_lower  # optional extra

    program = program.run_decompositions({torch.ops.aten.layer_norm.default: _layer_norm})
    return to_edge_transform_and_lower(
        program, partitioner=[XnnpackPartitioner()], transform_passes=[_static_views], constant_methods=limits
    )


def bounded_program(model, spec, limits: dict[str, int]):
    """`torch.export` of `model`'s full forward with batch and sequence bounded by
    `limits`: without a maximum, memory would be planned for the example's shape. A
    batch of at most 1 stays static (torch.export cannot keep a size-1 dim symbolic)."""
    graph = export_graph(model, spec, "full")
    args = example_args(model, spec, "full", min(EXAMPLE_BATCH, limits["max_batch"]), example_length(spec.chunk_size))
    bounds = {"sequence": limits["max_length"], "batch": limits["max_batch"]}
    axes = {
        name: {a: label for a, label in dims.items() if bounds[label] > 1}
        for name, dims in graph_axes(spec, "full").items()
    }
    with torch.no_grad():
        return torch.export.export(graph, args, dynamic_shapes=dynamic_shapes(graph, axes, bounds))


def export_executorch(
    model, path: str | os.PathLike, spec=None, max_length: int | None = None, max_batch: int | None = None
) -> Path:
    """Lower the full forward of `model` (described by `spec`) to an ExecuTorch program
    at `path`, delegated to XNNPACK, that runs every batch up to `max_batch` and every
    length from 1 to `max_length` (both stored in the program; see `runtime.executorch.program_limits`)."""
    require_executorch()
    path = Path(path)
    model = model.eval()
    spec = spec_for(model, spec)
    check_limits(spec, max_length, max_batch)
    limits = resolve_limits(max_length, max_batch)
    with staging(path) as tmp, quiet(), quiet_runtime():
        staged = tmp / path.name
        staged.write_bytes(lower(bounded_program(model, spec, limits), limits).to_executorch().buffer)
        os.replace(staged, path)
    return path


def resolve_limits(max_length: int | None = None, max_batch: int | None = None) -> dict[str, int]:
    """The limits a program gets: the ones given, else the defaults."""
    return {"max_length": max_length or DEFAULT_MAX_LENGTH, "max_batch": max_batch or DEFAULT_MAX_BATCH}


def check_limits(spec, max_length: int | None = None, max_batch: int | None = None) -> None:
    """UserError unless a program of `spec`'s model can be exported with these limits:
    the example it is traced with must fit."""
    limits, length = resolve_limits(max_length, max_batch), example_length(spec.chunk_size)
    if not all(isinstance(v, int) and v >= 1 for v in limits.values()):
        raise UserError(f"--max-length and --max-batch must be integers >= 1, got {limits}")
    if limits["max_length"] < length:
        raise UserError(
            f"--max-length {limits['max_length']} is below the {length} tokens the export traces with "
            f"(2c + c/2 at chunk size {spec.chunk_size}): give at least {length}"
        )
