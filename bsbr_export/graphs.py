"""The exact functions that get exported, as modules with flat tensor signatures.

They call only the model's public API (`forward`, `stream`, `init_state`), so export
code never touches model internals. Streaming state travels as flat `past.*` inputs
and `present.*` outputs, named per layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from bsbr_export.model import BSBRModel, LayerState

STATE_FIELDS = LayerState._fields  # meta_keys, chunk_states, keys, values, retrieved
# A decode step's outputs per layer: the finished chunks to append, the current chunk.
UPDATE_NAMES = ("new.{}.meta_keys", "new.{}.chunk_states", "present.{}.keys", "present.{}.values",
                "present.{}.retrieved")


def state_names(num_layers: int, prefix: str) -> list[str]:
    """Flat names of a streaming state: `{prefix}.{layer}.{field}`, layer-major."""
    return [f"{prefix}.{layer}.{field}" for layer in range(num_layers) for field in STATE_FIELDS]


def state_dims(num_layers: int, prefix: str) -> dict[str, dict[int, str]]:
    """Names of the dynamic axes of every state tensor (the rest are fixed by the config)."""
    chunks, tokens = ("past_chunks", "past_tokens") if prefix == "past" else ("present_chunks", "present_tokens")
    axes = {
        "meta_keys": {0: "batch", 2: chunks},
        "chunk_states": {0: "batch", 2: chunks},
        "keys": {0: "batch", 2: tokens},
        "values": {0: "batch", 2: tokens},
        "retrieved": {0: "batch"},
    }
    return {f"{prefix}.{layer}.{field}": axes[field] for layer in range(num_layers) for field in STATE_FIELDS}


def update_names(num_layers: int) -> list[str]:
    """Flat names of a decode step's state outputs, layer-major."""
    return [name.format(layer) for layer in range(num_layers) for name in UPDATE_NAMES]


def update_dims(num_layers: int) -> dict[str, dict[int, str]]:
    """Dynamic axes of a decode step's state outputs."""
    axes = ({0: "batch", 2: "new_chunks"}, {0: "batch", 2: "new_chunks"}, {0: "batch", 2: "present_tokens"},
            {0: "batch", 2: "present_tokens"}, {0: "batch"})
    return {name.format(layer): axis for layer in range(num_layers) for name, axis in zip(UPDATE_NAMES, axes)}


def flatten_state(state: list[LayerState]) -> list[Tensor]:
    """[LayerState, ...] -> flat list in `state_names` order."""
    return [tensor for layer in state for tensor in layer]


def unflatten_state(flat: list[Tensor] | tuple[Tensor, ...]) -> list[LayerState]:
    """The inverse of `flatten_state`."""
    width = len(STATE_FIELDS)
    return [LayerState(*flat[i : i + width]) for i in range(0, len(flat), width)]


def stream_pieces(length: int, chunk_size: int) -> list[int]:
    """Split `length` into pieces that never line up with chunk boundaries:
    1, c+2, c-1, 1, c+2, ... (the splits that catch state bugs)."""
    sizes, out = (1, chunk_size + 2, max(chunk_size - 1, 1)), []
    while length > 0:
        out.append(min(sizes[len(out) % len(sizes)], length))
        length -= out[-1]
    return out


class LogitsGraph(nn.Module):
    """input_ids [batch, sequence] (+ attention_mask) -> logits (or hidden states)."""

    def __init__(self, model: BSBRModel, with_attention_mask: bool = True) -> None:
        super().__init__()
        self.model = model
        self.with_attention_mask = with_attention_mask

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] if self.with_attention_mask else ["input_ids"]

    @property
    def output_names(self) -> list[str]:
        return ["logits" if self.model.config.lm_head else "hidden_states"]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids, attention_mask)


class StreamingGraph(nn.Module):
    """One streaming step: (input_ids [batch, new_tokens], *past) -> (logits, *present)."""

    def __init__(self, model: BSBRModel) -> None:
        super().__init__()
        self.model = model

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", *state_names(self.model.config.num_layers, "past")]

    @property
    def output_names(self) -> list[str]:
        first = "logits" if self.model.config.lm_head else "hidden_states"
        return [first, *state_names(self.model.config.num_layers, "present")]

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        out, present = self.model.stream(input_ids, unflatten_state(past))
        return (out, *flatten_state(present))


class DecodeGraph(StreamingGraph):
    """A streaming step that returns only what changed: (input_ids, *past) ->
    (logits, per layer new.{i}.meta_keys, new.{i}.chunk_states, present.{i}.keys,
    present.{i}.values, present.{i}.retrieved).

    The caller appends the `new.*` rows (chunks this step finished, usually none) to its
    past_meta_keys / past_chunk_states and replaces the rest, so no call copies the
    finished chunks: per-token cost stays flat as the context grows.
    """

    @property
    def output_names(self) -> list[str]:
        first = "logits" if self.model.config.lm_head else "hidden_states"
        return [first, *update_names(self.model.config.num_layers)]

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        out, updates = self.model.stream_update(input_ids, unflatten_state(past))
        return (out, *[tensor for update in updates for tensor in update])


def export_graph(model: BSBRModel, kind: str, attention_mask: bool = True) -> nn.Module:
    """The module exported for an artifact kind: logits, streaming or decode."""
    if kind == "decode":
        return DecodeGraph(model)
    return StreamingGraph(model) if kind == "streaming" else LogitsGraph(model, attention_mask)
