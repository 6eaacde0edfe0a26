"""Checkpoints of the PyPI package `bsbr` 0.1.1, with its numerics (flavor "bsbr-0.1.1").

People trained BSBR models with that package; this module loads its `state_dict` as-is
and reproduces its `BSBRModel.forward` to float32 round-off, quirks included on
purpose (DESIGN.md, "The upstream reference implementation"):

- **Not causal.** Inside a chunk a token attends to itself and the *later* tokens of
  its chunk (`M_in` upper-triangular); chunk `i` retrieves from chunks `j >= i`
  (`M_out = triu`). So an output depends on every token of its own and later chunks,
  and the model cannot stream.
- Meta queries `R` and meta keys `H` both come from each chunk's last *real* token.
- Chunk states are per chunk, `F_j = K_j^T V_j` (not cumulative); compression is a
  linear map with bias `e^2 -> m` and back, `m = hidden // compression_factor`.
- The last chunk is padded with zero keys/values that are *not* masked: each adds
  `exp(0 - max)` to its queries' softmax.
- `attention_mask` is accepted and ignored, exactly as the package ignores it.
- Positions come from its float32 sinusoid table `pos_encoding.pe` of 5000 rows:
  longer inputs are refused unless `config.max_positions` extends the table (rows
  from 5000 on computed in float32 the way the package builds its table).

Unlike the package it never builds the padded `L x L` score matrix: the within-chunk
scores are `[B, H, n, c, c]` blocks and the chunk scores `[B, H, n, n]`, all chunks in
one batched op, so memory is linear in `L` and traced/exported graphs run at any
length. Masked scores are filled with the package's finite -1e9 (never -inf): its
exp underflows to exactly 0, and no row is ever fully masked (the diagonal is
always allowed in both masks), so excluding them is what the package computes.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from bsbr_export.errors import UserError
from bsbr_export.model.attention import num_chunks, pad_to_chunks, to_chunks
from bsbr_export.model.config import UPSTREAM_POSITIONS, BSBRConfig
from bsbr_export.model.native import check_input_ids, is_eager
from bsbr_export.model.weights import load_state_dict, state_dict_problems

FLAVOR = "bsbr-0.1.1"
MASKED = -1e9  # the package's masked_fill value
NOT_CAUSAL = (
    "flavor bsbr-0.1.1 reproduces the bsbr 0.1.1 package: it is NOT causal (each output "
    "depends on later tokens of its chunk and on all later chunks), ignores attention_mask "
    "(padding changes outputs at valid positions), and cannot stream"
)


def cannot_stream() -> UserError:
    """The one-line refusal for any streaming request on this flavor."""
    return UserError(f"{FLAVOR} models are not causal, so they cannot stream; drop --streaming")


def sinusoid_table(rows: int, dim: int) -> Tensor:
    """The package's positional table, rows [0, rows): [rows, dim], float32.

    Built in float32 in the same order as the package (angles = p * exp(2i * -ln(1e4)/dim),
    then sin/cos), so its first 5000 rows equal a checkpoint's `pos_encoding.pe`.
    """
    position = torch.arange(rows, dtype=torch.float32)[:, None]  # [rows, 1]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    angles = position * inv_freq  # [rows, dim / 2]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # sin at 2i, cos at 2i+1


def last_real_tokens(x: Tensor, chunk_size: int) -> Tensor:
    """Each chunk's last real token: [B, L, D] -> [B, n, D] (index min((i+1)c, L) - 1).

    The tail is padded with copies of the last token, so the last (partial) chunk's
    final slot holds it; no data-dependent indexing, so tracing keeps `n` symbolic.
    """
    length = x.shape[1]
    pad = num_chunks(length, chunk_size) * chunk_size - length
    x = torch.cat([x, x[:, -1:, :].expand(-1, pad, -1)], dim=1)
    return x.unflatten(1, (-1, chunk_size))[:, :, -1, :]


class UpstreamPositions(nn.Module):
    """`pos_encoding`: adds rows [0, L) of the package's table, then dropout."""

    def __init__(self, config: BSBRConfig) -> None:
        super().__init__()
        rows = config.max_positions or UPSTREAM_POSITIONS
        table = sinusoid_table(rows, config.hidden_size)
        self.register_buffer("pe", table[None, :UPSTREAM_POSITIONS].clone())  # the checkpoint's buffer
        # Rows past the package's 5000 (empty unless max_positions extends the table).
        self.register_buffer("extension", table[UPSTREAM_POSITIONS:].clone(), persistent=False)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def rows(self) -> int:
        return self.pe.shape[1] + self.extension.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        table = self.pe[0]
        if self.extension.shape[0]:
            table = torch.cat([table, self.extension])
        positions = torch.arange(x.shape[1], device=x.device)
        return self.dropout(x + table[positions].to(x.dtype))  # a gather: no `L <= rows` guard in graphs


class UpstreamAttention(nn.Module):
    """bsbr 0.1.1's `BSBRAttention`, chunk-wise (see the module docstring)."""

    def __init__(self, config: BSBRConfig) -> None:
        super().__init__()
        self.config = config
        hidden, e2 = config.hidden_size, config.head_dim**2
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.meta_r_proj = nn.Linear(hidden, hidden)  # R: meta queries
        self.meta_h_proj = nn.Linear(hidden, hidden)  # H: meta keys
        if config.compression is not None:
            self.compress_proj = nn.Linear(e2, config.compression)
            self.decompress_proj = nn.Linear(config.compression, e2)
        self.dropout_layer = nn.Dropout(config.dropout)  # used twice, like the package's

    def _heads(self, x: Tensor) -> Tensor:
        """[B, T, hidden] -> [B, H, T, e]"""
        return x.unflatten(-1, (self.config.num_heads, self.config.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """x: [B, L, hidden] (after layer_norm1) -> [B, L, hidden]. `attention_mask` is
        accepted and ignored, as the package ignores it."""
        c, e = self.config.chunk_size, self.config.head_dim
        length = x.shape[1]
        q = to_chunks(pad_to_chunks(self._heads(self.q_proj(x)), c), c)  # [B, H, n, c, e], zero rows past L
        k = to_chunks(pad_to_chunks(self._heads(self.k_proj(x)), c), c)
        v = to_chunks(pad_to_chunks(self._heads(self.v_proj(x)), c), c)

        # Within-chunk attention: M_in keeps s >= t (upper triangle, diagonal included).
        # Padded keys stay in: score exactly 0, value 0, as in the package.
        scores = q @ k.transpose(-1, -2) / math.sqrt(e)  # [B, H, n, c, c]
        m_in = torch.ones(c, c, dtype=torch.bool, device=x.device).triu()
        local = self.dropout_layer(scores.masked_fill(~m_in, MASKED).softmax(dim=-1)) @ v

        # Block retrieval: chunk i reads chunks j >= i (M_out = triu, diagonal included).
        rep = last_real_tokens(x, c)  # [B, n, hidden]
        r, h = self._heads(self.meta_r_proj(rep)), self._heads(self.meta_h_proj(rep))  # [B, H, n, e]
        f = (k.transpose(-1, -2) @ v).flatten(-2)  # F_j = K_j^T V_j: [B, H, n, e^2]
        if self.config.compression is not None:
            f = self.compress_proj(f)  # [B, H, n, m]
        chunk_scores = r @ h.transpose(-1, -2) / math.sqrt(e)  # [B, H, n, n]
        chunks = torch.arange(chunk_scores.shape[-1], device=x.device)
        m_out = chunks[None, :] >= chunks[:, None]
        weights = self.dropout_layer(chunk_scores.masked_fill(~m_out, MASKED).softmax(dim=-1))
        g = weights @ f  # [B, H, n, e^2 or m]
        if self.config.compression is not None:
            g = self.decompress_proj(g)
        retrieved = q @ g.unflatten(-1, (e, e))  # q_t G_i, no scaling: [B, H, n, c, e]

        o = (retrieved + local).flatten(-3, -2)[:, :, :length]  # [B, H, L, e]
        return self.out_proj(o.transpose(1, 2).flatten(-2))


class UpstreamLayer(nn.Module):
    """bsbr 0.1.1's `BSBRLayer`: pre-LN attention, then a GELU feed-forward."""

    def __init__(self, config: BSBRConfig) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.attention = UpstreamAttention(config)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.ff = nn.Sequential(  # indices 0 and 3 hold weights, as in the package
            nn.Linear(hidden, config.ff_size),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.ff_size, hidden),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.layer_norm1(x))
        return x + self.ff(self.layer_norm2(x))


class UpstreamBSBRModel(nn.Module):
    """bsbr 0.1.1's `BSBRModel` (config.flavor == "bsbr-0.1.1"): ids -> hidden states.

    Its `state_dict` has exactly the package's keys. Not causal; see the module docstring.
    """

    block_path = "layers"  # the package's name for its blocks: module scopes in exported graphs

    def __init__(self, config: BSBRConfig) -> None:
        super().__init__()
        if config.flavor != FLAVOR:
            raise UserError(f"UpstreamBSBRModel needs config.flavor {FLAVOR!r}, got {config.flavor!r}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_encoding = UpstreamPositions(config)
        self.layers = nn.ModuleList(UpstreamLayer(config) for _ in range(config.num_layers))
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def blocks(self) -> nn.ModuleList:
        """The layers, under the name the native model (and `localize`) uses."""
        return self.layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids [B, L] -> hidden states [B, L, hidden]. `attention_mask` is ignored,
        as bsbr 0.1.1 ignores it (right padding changes outputs at valid positions)."""
        if is_eager():
            check_input_ids(input_ids, self.config.vocab_size)
            if attention_mask is not None and attention_mask.shape != input_ids.shape:
                raise UserError(
                    f"attention_mask shape {list(attention_mask.shape)} != input_ids shape {list(input_ids.shape)}"
                )
            rows = self.pos_encoding.rows
            if input_ids.shape[1] > rows:
                raise UserError(
                    f"sequence length {input_ids.shape[1]} exceeds the {rows} positions of the {FLAVOR} "
                    "positional table: set max_positions in the checkpoint's config.json (or import "
                    "with --max-positions N) to extend the sinusoid"
                )
        x = self.pos_encoding(self.embedding(input_ids))
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)

    def init_state(self, *args, **kwargs):
        raise cannot_stream()

    def stream(self, *args, **kwargs):
        raise cannot_stream()


# ---------------------------------------------------------------------------
# Importing a package state dict


def expected_keys(config: BSBRConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the package's state dict for `config`, with its shape."""
    with torch.device("meta"):
        model = UpstreamBSBRModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_config(
    state: dict[str, Tensor], num_heads: int, chunk_size: int, max_positions: int | None = None
) -> BSBRConfig:
    """A bsbr-0.1.1 config from a package state dict's shapes plus what shapes cannot
    tell (heads, chunk size). Raises one UserError naming every problem."""
    embedding = state.get("embedding.weight")
    if embedding is None or embedding.dim() != 2:
        found = "missing" if embedding is None else f"of shape {list(embedding.shape)}"
        raise UserError(
            f"not a bsbr 0.1.1 BSBRModel state dict: embedding.weight [vocab, hidden] is {found} "
            f"(keys start {sorted(state)[:3]})"
        )
    vocab, hidden = embedding.shape
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    num_layers = max(layer_ids) + 1 if layer_ids else 0
    ff = state.get("layers.0.ff.0.weight")
    compress = state.get("layers.0.attention.compress_proj.weight")
    problems = []
    if num_layers == 0:
        problems.append("no layers.N.* keys")
    if ff is None or ff.dim() != 2:
        problems.append("layers.0.ff.0.weight [ff_dim, hidden] is missing or not 2-D")
    if num_heads < 1 or hidden % num_heads:
        problems.append(f"--heads {num_heads} does not divide hidden size {hidden}: pass a divisor of {hidden}")
    elif compress is not None and compress.dim() == 2 and compress.shape[1] != (hidden // num_heads) ** 2:
        side = math.isqrt(compress.shape[1])
        hint = f": pass --heads {hidden // side}" if side * side == compress.shape[1] and hidden % side == 0 else ""
        problems.append(
            f"compress_proj takes {compress.shape[1]} inputs (head_dim^2), but --heads {num_heads} "
            f"gives head_dim {hidden // num_heads}{hint}"
        )
    if compress is not None and (compress.dim() != 2 or compress.shape[0] < 1):
        problems.append(
            f"compress_proj.weight has shape {list(compress.shape)}; a compressed width of 0 "
            "(compression_factor > hidden) is not supported"
        )
    if chunk_size < 1:
        problems.append(f"--chunk-size must be >= 1 (got {chunk_size})")
    if problems:
        if any(k.startswith("blocks.") for k in state):
            problems.append("its keys look like a bsbr-export checkpoint: use its directory directly")
        raise UserError("cannot import as a bsbr 0.1.1 BSBRModel: " + "; ".join(problems))
    return BSBRConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        chunk_size=chunk_size,
        ff_size=ff.shape[0],
        compression=compress.shape[0] if compress is not None else None,
        lm_head=False,
        dropout=0.0,
        layer_norm_eps=1e-5,  # the package's nn.LayerNorm default
        flavor=FLAVOR,
        max_positions=max_positions,
    )


def check_keys(state: dict[str, Tensor], config: BSBRConfig, source: str) -> None:
    """Every key and shape of `state` against the package's layout; one UserError."""
    expected = expected_keys(config)
    problems = state_dict_problems(state, expected)
    pe = state.get("pos_encoding.pe")
    if not problems and pe is not None:
        diff = (pe[0].float() - sinusoid_table(pe.shape[1], config.hidden_size)).abs().max().item()
        if diff > 1e-4:
            problems.append(f"pos_encoding.pe is not the package's sinusoid table (max diff {diff:.2e})")
    if problems:
        raise UserError(
            f"{source} is not a bsbr 0.1.1 BSBRModel state dict for {config.num_layers} layers, hidden "
            f"{config.hidden_size}, --heads {config.num_heads}: " + "; ".join(problems)
        )


def import_upstream(
    checkpoint: str | os.PathLike,
    num_heads: int,
    chunk_size: int,
    max_positions: int | None = None,
) -> UpstreamBSBRModel:
    """A bsbr 0.1.1 `BSBRModel.state_dict()` file (.pt/.bin with weights_only, or
    .safetensors) -> an eval-mode `UpstreamBSBRModel` holding its weights."""
    state = load_state_dict(checkpoint)
    config = infer_config(state, num_heads, chunk_size, max_positions)
    check_keys(state, config, Path(checkpoint).name)
    model = UpstreamBSBRModel(config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return model.eval()


# ---------------------------------------------------------------------------
# The package's modules in memory: whole models, and its layers inside a user's model

SWAP_LENGTHS = (1, 5, 3)  # in chunks + 2 tokens: a ragged tail, several chunks


def _attention_config(attention: nn.Module, **extra) -> BSBRConfig:
    """A bsbr-0.1.1 config for one of the package's `BSBRAttention` modules."""
    compress = getattr(attention, "compress_proj", None)
    return BSBRConfig(
        vocab_size=1,
        hidden_size=attention.hidden_dim,
        num_layers=1,
        num_heads=attention.num_heads,
        chunk_size=attention.chunk_size,
        compression=compress.out_features if compress is not None else None,
        lm_head=False,
        dropout=0.0,
        flavor=FLAVOR,
        **extra,
    )


def _twin(original: nn.Module) -> nn.Module | None:
    """Our chunk-wise twin of a package `BSBRAttention` / `BSBRLayer`, weights copied
    (the twins keep the package's parameter names), or None for any other module."""
    import bsbr  # optional: the upstream package, only to read its layers

    if isinstance(original, bsbr.BSBRAttention):
        twin = UpstreamAttention(_attention_config(original))
    elif isinstance(original, bsbr.BSBRLayer):
        attention = original.attention
        twin = UpstreamLayer(
            _attention_config(attention, ff_size=original.ff[0].out_features, layer_norm_eps=original.layer_norm1.eps)
        )
    else:
        return None
    twin.load_state_dict(original.state_dict())
    return twin.to(next(original.parameters()).dtype).train(original.training)


def _check_twin(name: str, original: nn.Module, twin: nn.Module) -> float:
    """Max abs difference between the package's module and its twin on random inputs at
    lengths with a ragged tail (UserError past float32 round-off)."""
    config = twin.config if isinstance(twin, UpstreamAttention) else twin.attention.config
    hidden, c = config.hidden_size, config.chunk_size
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for chunks in SWAP_LENGTHS:
            x = torch.randn(2, chunks * c + 2, hidden, generator=generator).to(next(original.parameters()).dtype)
            want, got = original.eval()(x), twin.eval()(x)
            worst = max(worst, float((want - got).abs().max()))
    scale = 1e-4 * max(1.0, float(want.abs().max()))
    if not worst <= scale:
        raise UserError(
            f"the chunk-wise twin of {name} ({type(original).__name__}) differs from it by {worst:.2e}: "
            "not swapped; please report this"
        )
    return worst


def swap_upstream_layers(module: nn.Module) -> list[dict]:
    """Replace every bsbr 0.1.1 `BSBRAttention` / `BSBRLayer` inside `module` by its
    chunk-wise, linear-memory twin with the same numerics, in place: the package's
    layers build an `L x L` mask in a Python loop over chunks, so their exports run only
    at the example's chunk count. Each twin is checked against the original before it
    is accepted. Returns what was swapped (for the manifest); [] without the package.
    """
    if importlib.util.find_spec("bsbr") is None:  # no package, so none of its layers
        return []
    swapped = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            qualified = f"{prefix}{child_name}"
            twin = _twin(child)
            if twin is None:
                walk(child, qualified + ".")
                continue
            max_abs = _check_twin(qualified, child, twin)
            setattr(parent, child_name, twin)
            swapped.append(
                {
                    "module": qualified,
                    "from": f"bsbr.{type(child).__name__}",
                    "to": f"bsbr_export.model.upstream.{type(twin).__name__}",
                    "max_abs": max_abs,
                }
            )

    walk(module, "")
    return swapped


def from_upstream(model: nn.Module) -> UpstreamBSBRModel:
    """A bsbr 0.1.1 `BSBRModel` object in memory -> an eval-mode `UpstreamBSBRModel`,
    heads and chunk size read from its layers (nothing to re-enter by hand)."""
    import bsbr  # optional: the upstream package, only to read its layers

    if not isinstance(model, bsbr.BSBRModel):
        raise UserError(f"from_upstream takes a bsbr.BSBRModel, got {type(model).__name__}")
    attention = model.layers[0].attention
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    config = infer_config(state, attention.num_heads, attention.chunk_size)
    check_keys(state, config, "the bsbr.BSBRModel")
    imported = UpstreamBSBRModel(config)
    imported.load_state_dict(state)
    return imported.eval()
