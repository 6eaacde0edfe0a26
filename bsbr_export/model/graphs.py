"""The exact functions that get exported, as modules with flat tensor signatures.

They take any module plus its `ModelSpec` and call only the module's public API
(`forward`, and for streaming `init_state` / `stream`, plus `stream_update` for a decode
step and `step_rows` for a row step), so export code never touches model internals. Outputs come out as a flat tuple in
the spec's order; a streaming state travels as flat `past.*` inputs and `present.*`
outputs, named from the state's pytree (`past.0.meta_keys` for a list of `LayerState`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from bsbr_export.model.probe import call_module, output_leaves
from bsbr_export.model.spec import ModelSpec


def flatten_state(state) -> list[Tensor]:
    """A state pytree -> its tensors, in the order of the spec's `past.*` names."""
    return pytree.tree_leaves(state)


def _flat_outputs(outputs) -> tuple[Tensor, ...]:
    return tuple(output_leaves(outputs)[1])


class FullGraph(nn.Module):
    """The full forward: the spec's inputs -> its outputs, as a flat tuple (the tensor
    itself when there is one output, as C++ callers of a traced module expect)."""

    positional = 0  # arguments before the varargs (torch.export's dynamic_shapes follow them)

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.input_names = spec.input_names
        self.output_names = spec.output_names

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        outputs = _flat_outputs(call_module(self.model, self.spec.inputs, dict(zip(self.input_names, inputs))))
        return outputs[0] if len(outputs) == 1 else outputs


class StreamingGraph(nn.Module):
    """One streaming step: (tokens [batch, new_tokens], *past) -> (*outputs, *present)."""

    positional = 1

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.treespec = pytree.tree_structure(model.init_state(1))
        self.input_names = [spec.tokens.name, *spec.state.inputs]
        self.output_names = [*spec.output_names, *self.state_output_names()]

    def state_output_names(self) -> list[str]:
        return list(self.spec.state.outputs)

    def step(self, tokens: Tensor, state):
        return self.model.stream(tokens, state)

    def forward(self, tokens: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        out, present = self.step(tokens, pytree.tree_unflatten(list(past), self.treespec))
        return (*_flat_outputs(out), *pytree.tree_leaves(present))


class DecodeGraph(StreamingGraph):
    """A streaming step that returns only what changed: per state entry, `new.*` rows
    (the chunks this step finished, usually none) for the entries the spec appends, and
    the small `present.*` rest. The caller appends the `new.*` rows to its past state, so
    no call copies the finished chunks: per-token cost stays flat as the context grows.
    Needs the module's `stream_update(tokens, state) -> (outputs, updates)`.
    """

    def state_output_names(self) -> list[str]:
        return self.spec.state.update_names()

    def step(self, tokens: Tensor, state):
        return self.model.stream_update(tokens, state)


class DefaultMask(nn.Module):
    """A traced full forward whose padding mask may be left out (all ones then): C++ and
    Python users call `model(input_ids)` first, as the eager model allows."""

    def __init__(self, traced: nn.Module) -> None:
        super().__init__()
        self.traced = traced

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.traced(input_ids, attention_mask)


class RowsGraph(nn.Module):
    """One token for each of many sequences at their own positions (in-flight batching):
    (tokens [rows, 1], positions [rows], *cache) -> (*outputs, *row). The caches are, per
    layer, the state entries a step does not append (`cache.*`: the current chunk's keys
    and values in `c - 1` slots, `S_i`); `row.*` are each row's new key and value, for
    the caller to write at slot `position % c`. Needs the module's `step_rows(tokens,
    positions, cache)`, `cache` a list of per-layer tuples in state order; no row may be
    the last token of its chunk (those need their finished chunks: the decode step)."""

    positional = 2

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.input_names = spec.state.row_input_names(spec.tokens.name)
        self.output_names = [*spec.output_names, *spec.state.row_outputs()]
        cached = self.input_names[2:]
        self.layers = [
            sum(1 for n in cached if n.split(".")[1] == layer)
            for layer in dict.fromkeys(n.split(".")[1] for n in cached)
        ]

    def forward(self, tokens: Tensor, positions: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        per_layer, at = [], 0
        for size in self.layers:
            per_layer.append(tuple(cache[at : at + size]))
            at += size
        out, rows = self.model.step_rows(tokens, positions, per_layer)
        return (*_flat_outputs(out), *pytree.tree_leaves(rows))


GRAPHS = {"full": FullGraph, "streaming": StreamingGraph, "decode": DecodeGraph, "rows": RowsGraph}


def export_graph(model: nn.Module, spec: ModelSpec, kind: str) -> nn.Module:
    """The module exported for an artifact kind (`formats.KINDS`): full, streaming, decode or rows."""
    return GRAPHS[kind](model, spec)
