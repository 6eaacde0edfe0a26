"""What a model takes and returns: its `ModelSpec`, computed once and passed down.

Export, validate and bench read the spec, never a model's internals (like Optimum's
`OnnxConfig`, Navigator's dataloader). A spec names the inputs (dtype, named axes and how
to draw valid values), the outputs (per position or pooled, logits or not), the chunk
size, and optionally the streaming state (flat `past.*` names with their growing axes).

This module is data only and imports no torch: a serving process reads an export's spec
with numpy and onnxruntime alone. `model.probe.spec_for(module)` builds a spec from a
module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bsbr_export.errors import UserError
from bsbr_export.io import read_json

# How an input's values are drawn: token ids below `high`, a right-padding mask of 0/1,
# or standard-normal floats.
VALUE_KINDS = ("token_ids", "padding_mask", "float")
MASK_NAMES = ("attention_mask", "mask", "padding_mask")


@dataclass(frozen=True)
class InputSpec:
    """One input: its name, named axes (`batch`, `sequence`, or a fixed int) and values."""

    name: str
    values: str = "token_ids"  # one of VALUE_KINDS
    axes: tuple = ("batch", "sequence")
    high: int | None = None  # token ids are drawn from [0, high)
    optional: bool = False  # the module runs without it (a padding mask)

    def __post_init__(self) -> None:
        if self.values not in VALUE_KINDS:
            raise UserError(f"input {self.name!r}: values must be one of {', '.join(VALUE_KINDS)}, got {self.values!r}")
        if self.values == "token_ids" and not (isinstance(self.high, int) and self.high >= 1):
            raise UserError(f"input {self.name!r} holds token ids: give its vocabulary size as high >= 1")
        if tuple(self.axes[:2]) != ("batch", "sequence") or not all(isinstance(a, int) for a in self.axes[2:]):
            raise UserError(
                f"input {self.name!r}: axes must start with batch, sequence and then fixed sizes, got {list(self.axes)}"
            )


@dataclass(frozen=True)
class OutputSpec:
    """One output: per position (axis 1 follows the input sequence) or pooled, and
    whether it holds logits (then top-1 agreement is reported too)."""

    name: str
    per_position: bool = True
    logits: bool = False


@dataclass(frozen=True)
class StateSpec:
    """A streaming state, flat: `past.*` inputs and `present.*` outputs with their
    shapes (named axes grow as the stream goes on; `batch` is the batch), all zeros-
    sized along the growing axes at the start. `appended` names the entries a decode
    step returns as `new.*` rows to append along `append_axis` instead of whole."""

    inputs: dict[str, list]
    appended: tuple[str, ...] = ()
    append_axis: int = 2
    dtype: str = "float32"

    @property
    def outputs(self) -> dict[str, list]:
        return {present_name(n): [_present_axis(d) for d in s] for n, s in self.inputs.items()}

    def axes(self, prefix: str = "past") -> dict[str, dict[int, str]]:
        """Named (dynamic) axes of every state tensor, for `past` inputs or `present` outputs."""
        names = self.inputs if prefix == "past" else self.outputs
        return {n: {i: d for i, d in enumerate(s) if isinstance(d, str)} for n, s in names.items()}

    def update_names(self) -> list[str]:
        """A decode step's state outputs, in state order: `new.*` for appended entries."""
        return [n.replace("past.", "new.", 1) if n in self.appended else present_name(n) for n in self.inputs]

    def cache_inputs(self, chunk_size: int) -> dict[str, list]:
        """A row step's per-row caches (`step_rows`): the entries a step does not append,
        named `cache.*`, the current chunk's rows (`past_tokens`) as `c - 1` slots."""
        return {
            name.replace("past.", "cache.", 1): [chunk_size - 1 if d == "past_tokens" else d for d in shape]
            for name, shape in self.inputs.items()
            if name not in self.appended
        }

    def row_outputs(self) -> dict[str, list]:
        """A row step's outputs besides the model's: each row's new entry (`row.*`, one
        slot) of the caches that hold the current chunk's rows."""
        return {
            name.replace("past.", "row.", 1): [1 if d == "past_tokens" else d for d in shape]
            for name, shape in self.inputs.items()
            if name not in self.appended and "past_tokens" in shape
        }

    def row_input_names(self, tokens: str) -> list[str]:
        """A row step's inputs: one token per row, the rows' positions, their caches."""
        return [
            tokens,
            ROW_POSITIONS,
            *(n.replace("past.", "cache.", 1) for n in self.inputs if n not in self.appended),
        ]

    def update_axes(self) -> dict[str, dict[int, str]]:
        """Dynamic axes of a decode step's state outputs."""
        axes = {}
        for name, shape in self.inputs.items():
            out = name.replace("past.", "new.", 1) if name in self.appended else present_name(name)
            axes[out] = {
                i: ("new_chunks" if name in self.appended and i == self.append_axis else _present_axis(d))
                for i, d in enumerate(shape)
                if isinstance(d, str)
            }
        return axes


# "bytes": token id = one UTF-8 byte (vocabulary 256); "tokenizer.json": the ids of the
# export directory's tokenizer.json (the `tokenizers` library's file).
TOKENIZERS = (None, "bytes", "tokenizer.json")


@dataclass(frozen=True)
class ModelSpec:
    """Everything export, validate and bench need to know about a model."""

    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    chunk_size: int
    state: StateSpec | None = None
    causal: bool = True
    note: str | None = None  # what the artifacts' users must know (e.g. "not causal")
    block_path: str | None = None  # where the repeated blocks live, for localizing failures
    num_blocks: int = 0
    # "bytes": the token ids are UTF-8 bytes, so held-out text scores the model in bits per
    # byte; "tokenizer.json": ids of the tokenizer shipped beside the weights (see TOKENIZERS)
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise UserError(f"chunk size must be an integer >= 1, got {self.chunk_size!r}")
        if not self.inputs or not self.outputs:
            raise UserError("a model spec needs at least one input and one output")
        if self.tokenizer not in TOKENIZERS:
            raise UserError(f"unknown tokenizer {self.tokenizer!r}: the spec knows {', '.join(map(str, TOKENIZERS))}")

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def tokens(self) -> InputSpec:
        """The input that carries the sequence (the first)."""
        return self.inputs[0]

    @property
    def mask(self) -> InputSpec | None:
        return next((i for i in self.inputs if i.values == "padding_mask"), None)

    def without_mask(self) -> ModelSpec:
        """The spec of a graph called without its (optional) padding mask."""
        return dataclasses.replace(self, inputs=tuple(i for i in self.inputs if i.values != "padding_mask"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        """The inverse of `to_dict` (a manifest's `spec`, or a user's `--spec` file)."""
        try:
            state = data.get("state")
            return cls(
                inputs=tuple(
                    InputSpec(**{**i, "axes": tuple(i.get("axes", ("batch", "sequence")))}) for i in data["inputs"]
                ),
                outputs=tuple(OutputSpec(**o) for o in data["outputs"]),
                chunk_size=data["chunk_size"],
                state=StateSpec(**{**state, "appended": tuple(state.get("appended", ()))}) if state else None,
                **{k: data[k] for k in ("causal", "note", "block_path", "num_blocks", "tokenizer") if k in data},
            )
        except (KeyError, TypeError) as exc:
            raise UserError(f"not a model spec: {exc}") from None


def present_name(past: str) -> str:
    return past.replace("past.", "present.", 1)


def _present_axis(dim):
    return dim.replace("past_", "present_", 1) if isinstance(dim, str) else dim


def read_spec(path: str | Path) -> ModelSpec:
    """A `ModelSpec` from a JSON file (`--spec FILE`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file {path} does not exist")
    return ModelSpec.from_dict(read_json(path))


# ---------------------------------------------------------------------------
# Example shapes: the toolkit picks them, because users get this wrong silently.

EXAMPLE_BATCH = 2  # batch 1 would let the exporter specialize the batch dim to 1


def example_length(chunk_size: int) -> int:
    """A length `k*c + r` with `k >= 2` and `0 < r < c` (r = 1 when c = 1): neither 1 nor
    a multiple of c, so tracing cannot specialize the sequence dim or the padding."""
    return 2 * chunk_size + max(1, chunk_size // 2) + (chunk_size == 1)


def probe_lengths(chunk_size: int) -> list[int]:
    """Lengths a graph must also run at before it is written (never the example's):
    1, c-1, c+1, a few chunks, a long one."""
    c = chunk_size
    example = example_length(c)
    return sorted({1, max(c - 1, 1), c + 1, 4 * c + 3, 9 * c + 7} - {example})


ROW_POSITIONS = "positions"  # a row step's input: each row's position, int64 [batch]


def row_inputs(spec: ModelSpec, positions: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of a row step for rows at `positions` (none the last of its chunk): a
    token per row below the vocabulary, and caches drawn at the scale of real states."""
    rng = np.random.default_rng(seed)
    batch = len(positions)
    out = {
        spec.tokens.name: rng.integers(0, spec.tokens.high, (batch, 1), dtype=np.int64),
        ROW_POSITIONS: np.asarray(positions, dtype=np.int64),
    }
    for name, shape in spec.state.cache_inputs(spec.chunk_size).items():
        out[name] = rng.standard_normal([batch if d == "batch" else d for d in shape]).astype(np.float32)
    return out
