"""The example an artifact is exported with, and its named dynamic axes: shapes chosen
so that nothing specializes (batch >= 2, a length that is no multiple of the chunk size,
a streaming state mid-chunk with every state dim >= 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from bsbr_export.model.graphs import flatten_state
from bsbr_export.model.probe import example_inputs
from bsbr_export.model.spec import EXAMPLE_BATCH, ModelSpec, example_length, row_inputs


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


def example_args(
    model, spec: ModelSpec, kind: str, batch: int = EXAMPLE_BATCH, length: int | None = None
) -> tuple[Tensor, ...]:
    """The example an artifact kind is exported with (shapes chosen so nothing specializes):
    `length` tokens (default `example_length`), or for a streaming step
    `example_new_tokens` after `example_state`."""
    c = spec.chunk_size
    if kind == "rows":
        return example_rows(spec, batch)
    if kind != "full":
        ids = example_inputs(spec, batch, length or example_new_tokens(c))[spec.tokens.name]
        return (ids, *example_state(model, spec, batch))
    inputs = example_inputs(spec, batch, length or example_length(c))
    return tuple(inputs[name] for name in spec.input_names)


def example_rows(spec: ModelSpec, batch: int, seed: int = 0) -> tuple[Tensor, ...]:
    """A row step's example: one token per row, rows at positions that differ (fills 0 and
    c - 2, finished chunks 0 and 2), random caches."""
    c = spec.chunk_size
    inputs = row_inputs(spec, [2 * c + max(c - 2, 0) if row % 2 == 0 else 0 for row in range(batch)], seed)
    return tuple(torch.from_numpy(inputs[name]) for name in spec.state.row_input_names(spec.tokens.name))


def graph_axes(spec: ModelSpec, kind: str) -> dict[str, dict[int, str]]:
    """Named dynamic axes of an artifact's inputs."""
    if kind == "rows":  # the rows are the only dim that moves
        return {name: {0: "batch"} for name in spec.state.row_input_names(spec.tokens.name)}
    if kind != "full":
        return {spec.tokens.name: {0: "batch", 1: "new_tokens"}, **spec.state.axes("past")}
    return {i.name: {0: "batch", 1: "sequence"} for i in spec.inputs}


def output_axes(spec: ModelSpec, kind: str) -> dict[str, dict[int, str]]:
    """Named dynamic axes of an artifact's outputs (computed dims come out as `Min(...)`)."""
    if kind == "rows":
        return {name: {0: "batch"} for name in [*spec.output_names, *spec.state.row_outputs()]}
    seq = "sequence" if kind == "full" else "new_tokens"
    axes = {o.name: ({0: "batch", 1: seq} if o.per_position else {0: "batch"}) for o in spec.outputs}
    if kind == "streaming":
        axes |= spec.state.axes("present")
    elif kind == "decode":
        axes |= spec.state.update_axes()
    return axes


def dynamic_shapes(graph, axes: dict[str, dict[int, str]], bounds: dict[str, int] | None = None):
    """torch.export's dynamic_shapes for a graph: one `Dim` per axis label, with a
    maximum where `bounds` gives one."""
    dims: dict[str, torch.export.Dim] = {}
    bounds = bounds or {}

    def spec(name: str) -> dict[int, torch.export.Dim]:
        return {
            axis: dims.setdefault(label, torch.export.Dim(label, max=bounds.get(label)))
            for axis, label in axes[name].items()
        }

    specs = [spec(name) for name in graph.input_names]
    # The graphs' forward(*inputs) / (tokens, *past) / (tokens, positions, *cache): the
    # varargs after the graph's `positional` arguments are one tuple argument.
    return [*specs[: graph.positional], tuple(specs[graph.positional :])]
