"""A `ModelSpec` for a module, found by looking at it and running it.

`spec_for(module)` builds it: from the `BSBRConfig` of the native model and the upstream
flavor (`config_spec`), otherwise from defaults found by looking at the module (the first
embedding's vocabulary, the BSBR layers' chunk sizes, the forward's signature) and by
running it at two lengths (which outputs follow the sequence). `example_inputs` draws
valid torch inputs for a spec.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from bsbr_export.errors import UserError
from bsbr_export.model.config import BSBRConfig
from bsbr_export.model.spec import (
    EXAMPLE_BATCH,
    MASK_NAMES,
    InputSpec,
    ModelSpec,
    OutputSpec,
    StateSpec,
    example_length,
)
from bsbr_export.model.upstream import NOT_CAUSAL


def example_inputs(spec: ModelSpec, batch: int, length: int, seed: int = 0, masked: bool = False) -> dict[str, Tensor]:
    """Valid random inputs for `spec` (token ids below their vocabulary, a right-padding
    mask, floats), from their own generator so callers never share RNG state."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for inp in spec.inputs:
        shape = (batch, length, *inp.axes[2:])
        if inp.values == "token_ids":
            out[inp.name] = torch.randint(0, inp.high, shape, generator=generator)
        elif inp.values == "float":
            out[inp.name] = torch.randn(shape, generator=generator)
        else:
            mask = torch.ones(shape, dtype=torch.int64)
            if masked:
                valid = torch.randint(1, length + 1, (batch,), generator=generator)
                mask = (torch.arange(length)[None, :] < valid[:, None]).to(torch.int64)
            out[inp.name] = mask
    return out


# ---------------------------------------------------------------------------
# Default specs for a user's module


def chunk_sizes(module: nn.Module) -> list[int]:
    """Chunk sizes of the BSBR attention layers inside `module` (any of ours, or the
    upstream package's), in module order."""
    sizes = []
    for sub in module.modules():
        if "Attention" not in type(sub).__name__:  # ours, the upstream package's and its twins
            continue
        size = getattr(sub, "chunk_size", None) or getattr(getattr(sub, "config", None), "chunk_size", None)
        if isinstance(size, int):
            sizes.append(size)
    return sizes


def _first_embedding(module: nn.Module) -> nn.Embedding | None:
    return next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)


def forward_parameters(module: nn.Module) -> list[inspect.Parameter]:
    """The forward's parameters (self excluded)."""
    try:
        return list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def default_inputs(module: nn.Module) -> tuple[InputSpec, ...]:
    """`input_ids` (named like the forward's first parameter) below the first embedding's
    vocabulary, plus an optional `attention_mask` when the forward takes one."""
    params = [p for p in forward_parameters(module) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    embedding = _first_embedding(module)
    if not params or embedding is None:
        raise UserError(
            f"{type(module).__name__} has no nn.Embedding to read a vocabulary from: describe its inputs "
            "with a spec (--spec FILE, or spec= in Python)"
        )
    inputs = [InputSpec(params[0].name, "token_ids", high=embedding.num_embeddings)]
    mask = next((p for p in params[1:] if p.name in MASK_NAMES), None)
    if mask is not None:
        inputs.append(InputSpec(mask.name, "padding_mask", optional=mask.default is not inspect.Parameter.empty))
    return tuple(inputs)


def output_leaves(outputs) -> tuple[list[str], list[Tensor]]:
    """(names, tensors) of a forward's outputs: a tensor, a tuple/list or a dict of them.
    UserError for anything else (export needs tensors)."""
    if isinstance(outputs, Tensor):
        return ["output"], [outputs]
    if isinstance(outputs, dict):
        items = list(outputs.items())
    elif isinstance(outputs, (tuple, list)):
        items = [(f"output_{i}", v) for i, v in enumerate(outputs)]
    else:
        raise UserError(
            f"the forward returns {type(outputs).__name__}: export needs a tensor, or a tuple/dict of tensors"
        )
    bad = [str(k) for k, v in items if not isinstance(v, Tensor)]
    if bad or not items:
        raise UserError(
            f"outputs {', '.join(bad) or '(none)'} are not tensors: export needs a tensor, or a tuple/dict of tensors"
        )
    return [str(k) for k, _ in items], [v for _, v in items]


def call_module(module: nn.Module, spec_inputs, tensors: dict[str, Tensor]):
    """Call `module` with the spec's inputs by keyword (positionally when the forward
    takes *args), so the spec's names need not be the forward's order."""
    params = forward_parameters(module)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return module(*(tensors[i.name] for i in spec_inputs if i.name in tensors))
    return module(**{i.name: tensors[i.name] for i in spec_inputs if i.name in tensors})


def check_signature(module: nn.Module, spec: ModelSpec) -> None:
    """UserError when the spec names inputs the forward cannot take."""
    params = forward_parameters(module)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return
    names = {p.name for p in params}
    unknown = [i.name for i in spec.inputs if i.name not in names]
    if unknown:
        raise UserError(
            f"the spec's input(s) {', '.join(unknown)} are not parameters of {type(module).__name__}.forward "
            f"({', '.join(p.name for p in params)})"
        )


def infer_outputs(
    module: nn.Module, inputs: tuple[InputSpec, ...], chunk_size: int, names=None
) -> tuple[OutputSpec, ...]:
    """Run the module at two lengths: outputs whose axis 1 follows the length are per
    position; a per-position output as wide as the token vocabulary holds logits."""
    probe = ModelSpec(inputs, (OutputSpec("probe"),), chunk_size)
    lengths = (example_length(chunk_size), example_length(chunk_size) + chunk_size + 1)
    shapes = []
    with torch.no_grad():
        for length in lengths:
            found, tensors = output_leaves(call_module(module, inputs, example_inputs(probe, EXAMPLE_BATCH, length)))
            shapes.append([tuple(t.shape) for t in tensors])
    vocab = inputs[0].high if inputs[0].values == "token_ids" else None
    outputs = []
    for i, name in enumerate(names or found):
        first, second = shapes[0][i], shapes[1][i]
        per_position = len(first) >= 2 and first[1] == lengths[0] and second[1] == lengths[1]
        logits = per_position and vocab is not None and first[-1] == vocab
        outputs.append(OutputSpec("logits" if logits and name == "output" else name, per_position, logits))
    return tuple(outputs)


def spec_for(module: nn.Module, spec: ModelSpec | None = None, chunk_size: int | None = None) -> ModelSpec:
    """The module's spec: `spec` as given, its own `export_spec()`, or the defaults.

    Defaults need no spec at all: `input_ids` (+ `attention_mask` when the forward takes
    one) below the first embedding's vocabulary, the chunk size found by walking the BSBR
    layers (their least common multiple when layers differ, so every layer's chunks line
    up), outputs found by running the module, and the streaming state when the module
    implements `init_state(batch)` / `stream(inputs, state)`.
    """
    if spec is not None:
        check_signature(module, spec)
        return spec
    if isinstance(getattr(module, "config", None), BSBRConfig):
        return config_spec(module.config)
    sizes = chunk_sizes(module)
    if chunk_size is None:
        if not sizes:
            raise UserError(
                f"{type(module).__name__} has no BSBR attention layer to read a chunk size from: pass --chunk-size "
                "(or a spec)"
            )
        chunk_size = math.lcm(*sizes)
    inputs = default_inputs(module)
    was_training = module.training
    module.eval()
    try:
        outputs = infer_outputs(module, inputs, chunk_size)
        state = infer_state(module, inputs[0], chunk_size) if is_streamable(module) else None
    finally:
        module.train(was_training)
    return ModelSpec(inputs, outputs, chunk_size, state)


# ---------------------------------------------------------------------------
# Streaming state: flat names from the state's pytree, growing axes by probing


def is_streamable(module: nn.Module) -> bool:
    """Whether the module implements the streaming protocol."""
    return callable(getattr(module, "init_state", None)) and callable(getattr(module, "stream", None))


def state_leaf_names(state, prefix: str = "past") -> list[str]:
    """Flat names of a state pytree's tensors: `past.0.meta_keys` for list[LayerState]."""
    names = []
    for path, _ in pytree.tree_flatten_with_path(state)[0]:
        parts = []
        for key in path:
            for attr in ("idx", "name", "key"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
        names.append(".".join([prefix, *parts]))
    return names


def infer_state(module: nn.Module, tokens: InputSpec, chunk_size: int) -> StateSpec:
    """Probe `init_state` / `stream`: after streaming several token counts, an axis whose
    size follows the finished chunks is `past_chunks`, one that follows the tokens of the
    current chunk is `past_tokens`, one equal to the batch is `batch`; other axes that
    move get their own `past_<name>_<axis>`; the rest are fixed."""
    c = chunk_size
    batch = 3
    counts = [0, 1, c + 2, 2 * c + c // 2 + 1]
    spec = ModelSpec((tokens,), (OutputSpec("probe"),), c)
    shapes = []
    with torch.no_grad():
        for count in counts:
            state = module.init_state(batch)
            if count:
                _, state = module.stream(example_inputs(spec, batch, count)[tokens.name], state)
            leaves = pytree.tree_leaves(state)
            if not leaves or not all(isinstance(t, Tensor) for t in leaves):
                raise UserError(f"{type(module).__name__}.init_state must return a pytree of tensors")
            shapes.append([tuple(t.shape) for t in leaves])
    names = state_leaf_names(module.init_state(batch))
    if len({len(s) for s in shapes}) != 1:
        raise UserError(f"{type(module).__name__}.stream changed the structure of its state")
    patterns = {"past_chunks": [n // c for n in counts], "past_tokens": [n % c for n in counts]}
    inputs = {}
    for i, name in enumerate(names):
        dims = []
        for axis in range(len(shapes[0][i])):
            sizes = [s[i][axis] for s in shapes]
            label = next((k for k, v in patterns.items() if sizes == v), None)
            if axis == 0 and all(s == batch for s in sizes):
                label = "batch"
            elif label is None and len(set(sizes)) > 1:
                label = f"past_{name.split('.', 1)[1].replace('.', '_')}_{axis}"
            dims.append(label if label else sizes[0])
        inputs[name] = dims
    return StateSpec(inputs, **_appended(module, spec, tokens, inputs))


def _appended(module: nn.Module, spec: ModelSpec, tokens: InputSpec, inputs: dict[str, list]) -> dict:
    """Which entries `stream_update` returns as the rows of chunks it finished (to append)
    rather than whole: after one finished chunk and two cached tokens, a one-token update
    that finishes none returns 0 rows of those along their `past_chunks` axis."""
    if not callable(getattr(module, "stream_update", None)):
        return {}
    c, batch = spec.chunk_size, 2
    with torch.no_grad():
        _, state = module.stream(example_inputs(spec, batch, c + 2)[tokens.name], module.init_state(batch))
        _, updates = module.stream_update(example_inputs(spec, batch, 1)[tokens.name], state)
    leaves = pytree.tree_leaves(updates)
    if len(leaves) != len(inputs):
        raise UserError(
            f"{type(module).__name__}.stream_update returns {len(leaves)} tensors for a state of "
            f"{len(inputs)}: it must return one per state entry"
        )
    appended = {
        name: dims.index("past_chunks")
        for (name, dims), leaf in zip(inputs.items(), leaves)
        if "past_chunks" in dims and leaf.shape[dims.index("past_chunks")] == 0
    }
    if len(set(appended.values())) > 1:
        raise UserError(
            f"{type(module).__name__}'s appended state entries grow along different axes: "
            f"{appended}; the decode protocol appends along one"
        )
    return {"appended": tuple(appended), "append_axis": next(iter(appended.values()), 2)}


# ---------------------------------------------------------------------------
# The two flavors described by a BSBRConfig (native, and bsbr 0.1.1's numerics)

STATE_FIELDS = ("meta_keys", "chunk_states", "keys", "values", "retrieved")
APPENDED_FIELDS = ("meta_keys", "chunk_states")  # finished chunks: a decode step returns new rows


def config_spec(config) -> ModelSpec:
    """The spec of a model built from a `BSBRConfig` (either flavor)."""
    inputs = (
        InputSpec("input_ids", "token_ids", high=config.vocab_size),
        InputSpec("attention_mask", "padding_mask", optional=True),
    )
    output = OutputSpec("logits", logits=True) if config.lm_head else OutputSpec("hidden_states")
    if not config.causal:
        return ModelSpec(
            inputs,
            (output,),
            config.chunk_size,
            causal=False,
            block_path="layers",
            num_blocks=config.num_layers,
            note=NOT_CAUSAL + "; the masked validation case compares artifact and eager on the same padded batch",
        )
    h, e = config.num_heads, config.head_dim
    shapes = {
        "meta_keys": ["batch", h, "past_chunks", e],
        "chunk_states": ["batch", h, "past_chunks", config.state_size],
        "keys": ["batch", h, "past_tokens", e],
        "values": ["batch", h, "past_tokens", e],
        "retrieved": ["batch", h, e, e],
    }
    state = StateSpec(
        {f"past.{layer}.{f}": shapes[f] for layer in range(config.num_layers) for f in STATE_FIELDS},
        appended=tuple(f"past.{layer}.{f}" for layer in range(config.num_layers) for f in APPENDED_FIELDS),
    )
    return ModelSpec(inputs, (output,), config.chunk_size, state, block_path="blocks", num_blocks=config.num_layers)
