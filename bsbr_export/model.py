"""The native BSBR model: DESIGN.md's math, top to bottom.

Token embedding + sinusoidal positions (any length), pre-LayerNorm blocks
(BSBR attention, then a GELU feed-forward), final LayerNorm, optional LM head tied
to the embedding. `forward` runs a whole (right-padded) batch; `stream` feeds it
piece by piece, carrying a `LayerState` per layer, and gives the same outputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsbr_export.attention import (
    bsbr_attention_at_boundaries,
    boundaries,
    chunked_attention,
    pad_to_chunks,
    to_chunks,
)
from bsbr_export.config import BSBRConfig
from bsbr_export.errors import UserError


class LayerState(NamedTuple):
    """One layer's streaming state after `P` finished chunks and `t < c` more tokens.

    The boundary token of the last finished chunk is not kept as such: its meta query
    is applied the moment its chunk finishes, and the result is `retrieved`, so a token
    inside a chunk costs O(c*e + e^2) instead of O(P*e^2).
    """

    meta_keys: Tensor  # [B, H, P, e]  h_j of finished chunks
    chunk_states: Tensor  # [B, H, P, s]  F_j of finished chunks (compressed when m is set)
    keys: Tensor  # [B, H, t, e]  the current chunk's keys so far
    values: Tensor  # [B, H, t, e]  and values
    retrieved: Tensor  # [B, H, e, e]  S_i of the current chunk i

    def advance(self, update: LayerUpdate) -> LayerState:
        """The state after a step: finished chunks appended, current chunk replaced."""
        return LayerState(
            meta_keys=torch.cat([self.meta_keys, update.new_meta_keys], dim=-2),
            chunk_states=torch.cat([self.chunk_states, update.new_chunk_states], dim=-2),
            keys=update.keys,
            values=update.values,
            retrieved=update.retrieved,
        )


class LayerUpdate(NamedTuple):
    """What one streaming step changes in a layer's state: the `k` chunks it finished
    (to append) and the whole, small, current-chunk part. Returning this instead of the
    grown state lets a runtime keep the finished chunks where they are."""

    new_meta_keys: Tensor  # [B, H, k, e]
    new_chunk_states: Tensor  # [B, H, k, s]
    keys: Tensor  # [B, H, t', e]
    values: Tensor  # [B, H, t', e]
    retrieved: Tensor  # [B, H, e, e]


def position_frequencies(dim: int) -> Tensor:
    """10000^(-2i/dim) for i < ceil(dim / 2), computed in float64.

    Precomputed rather than an `exp` inside the graph: ONNX Runtime's and torch's
    float32 `exp` differ enough to move encodings at long positions by ~6e-5.
    """
    return torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))


def sinusoidal_positions(positions: Tensor, frequencies: Tensor, dim: int) -> Tensor:
    """The classic sin/cos table at the given positions: [L] -> [L, dim], for any L."""
    angles = positions.to(frequencies.dtype)[:, None] * frequencies  # [L, ceil(dim / 2)]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[:, :dim]


def check_input_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Raise UserError unless `input_ids` is an integer [batch, length] tensor in range."""
    if not isinstance(input_ids, Tensor):
        raise UserError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise UserError(f"input_ids must be int64 (or int32), got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise UserError(f"input_ids must have shape [batch, length >= 1], got {list(input_ids.shape)}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise UserError(
            f"input_ids must be in [0, {vocab_size}), got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )


def check_attention_mask(attention_mask: Tensor, input_ids: Tensor) -> None:
    """Raise UserError unless `attention_mask` is an integer/bool 0/1 tensor shaped like
    `input_ids`, right padding (1s, then only 0s) with at least one token per row."""
    if not isinstance(attention_mask, Tensor):
        raise UserError(f"attention_mask must be a torch.Tensor (or None), got {type(attention_mask).__name__}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise UserError(f"attention_mask must be int64, int32 or bool (1 = token, 0 = pad), got {attention_mask.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise UserError(
            f"attention_mask shape {list(attention_mask.shape)} != input_ids shape {list(input_ids.shape)}"
        )
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise UserError(f"attention_mask must hold only 0 and 1, got values in [{int(mask.min())}, {int(mask.max())}]")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        # Positions count from each row's start, so only right padding keeps them right.
        raise UserError("attention_mask must be right padding: 1s, then only 0s, in every row")
    if bool((mask[:, 0] == 0).any()):
        raise UserError("attention_mask has a row of only 0s: every row needs at least one token")


def check_state(state, model: BSBRModel, batch: int) -> None:
    """Raise UserError unless `state` is a stream state of `model` for `batch` sequences."""
    cfg = model.config
    if not isinstance(state, (list, tuple)) or not all(isinstance(layer, LayerState) for layer in state):
        raise UserError(
            f"state must be the list of LayerState from model.init_state(batch_size) or model.stream(), "
            f"got {type(state).__name__}"
        )
    if len(state) != cfg.num_layers:
        raise UserError(f"state has {len(state)} layers, the model has {cfg.num_layers}")
    if state[0].keys.shape[0] != batch:
        raise UserError(
            f"state is for batch size {state[0].keys.shape[0]}, input_ids has {batch} rows: "
            f"start from model.init_state({batch})"
        )


def is_eager() -> bool:
    """False while tracing, scripting or compiling: data-dependent checks would be
    frozen into (or break) the graph, so they run in eager mode only."""
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())


class BSBRAttention(nn.Module):
    """Multi-head BSBR attention: within-chunk softmax plus block retrieval."""

    def __init__(self, config: BSBRConfig) -> None:
        super().__init__()
        self.config = config
        hidden, e2 = config.hidden_size, config.head_dim**2
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.meta_query_proj = nn.Linear(hidden, hidden)  # W_r
        self.meta_key_proj = nn.Linear(hidden, hidden)  # W_h
        self.out_proj = nn.Linear(hidden, hidden)
        if config.compression is not None:
            self.compress = nn.Linear(e2, config.compression, bias=False)
            self.decompress = nn.Linear(config.compression, e2, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        """[B, L, hidden] -> [B, H, L, e]"""
        return x.unflatten(-1, (self.config.num_heads, self.config.head_dim)).transpose(1, 2)

    def _compression(self) -> tuple[Tensor | None, Tensor | None]:
        if self.config.compression is None:
            return None, None
        return self.compress.weight, self.decompress.weight

    def _meta(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Meta queries r and keys h from each chunk's last token: [B, H, n, e] each.
        x: [B, n*c, hidden]."""
        last = boundaries(x, self.config.chunk_size)  # [B, n, hidden]
        return self._heads(self.meta_query_proj(last)), self._heads(self.meta_key_proj(last))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, n*c, hidden] (pre-normed, whole chunks) -> [B, n*c, hidden]."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        meta_queries, meta_keys = self._meta(x)
        o = bsbr_attention_at_boundaries(
            q, k, v, meta_queries, meta_keys, self.config.chunk_size, *self._compression()
        )
        return self.out_proj(o.transpose(1, 2).flatten(-2))

    def step(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerUpdate]:
        """Streaming: x [B, T, hidden] continues the sequence that `state` summarizes.

        The current chunk's `t` cached tokens and the `T` new ones form a block that
        starts on a chunk boundary; cached positions get zero queries and their outputs
        are dropped. Chunks the block finishes are returned for the state to append.
        """
        c = self.config.chunk_size
        t = state.keys.shape[-2]
        q = F.pad(self._heads(self.q_proj(x)), (0, 0, t, 0))
        k = torch.cat([state.keys, self._heads(self.k_proj(x))], dim=-2)
        v = torch.cat([state.values, self._heads(self.v_proj(x))], dim=-2)
        meta_queries, meta_keys = self._meta(pad_to_chunks(F.pad(x, (0, 0, t, 0)), c))
        total = k.shape[-2]
        finished = total // c  # chunks this block completes; the last may be partial
        out = chunked_attention(
            to_chunks(pad_to_chunks(q, c), c),
            to_chunks(pad_to_chunks(k, c), c),
            to_chunks(pad_to_chunks(v, c), c),
            meta_queries,
            meta_keys,
            state.retrieved,
            state.meta_keys,
            state.chunk_states,
            *self._compression(),
            finished=finished,
        )
        o = out.output.flatten(-3, -2)[..., t:total, :]
        update = LayerUpdate(
            new_meta_keys=meta_keys[..., :finished, :],
            new_chunk_states=out.states[..., :finished, :],
            keys=k[..., finished * c :, :],
            values=v[..., finished * c :, :],
            retrieved=out.retrieved[:, :, finished],
        )
        return self.out_proj(o.transpose(1, 2).flatten(-2)), update


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ff(ln(x))."""

    def __init__(self, config: BSBRConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = BSBRAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ff = nn.Sequential(
            nn.Linear(config.hidden_size, config.ff_size),
            nn.GELU(),
            nn.Linear(config.ff_size, config.hidden_size),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x)))
        return x + self.dropout(self.ff(self.ln_2(x)))

    def step(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerUpdate]:
        a, update = self.attn.step(self.ln_1(x), state)
        x = x + self.dropout(a)
        return x + self.dropout(self.ff(self.ln_2(x))), update


class BSBRModel(nn.Module):
    """A causal BSBR language model (or encoder of hidden states when `lm_head` is off)."""

    block_path = "blocks"  # where the blocks live: module scopes in exported graphs

    def __init__(self, config: BSBRConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # A function of hidden size only (no length limit); not saved in checkpoints.
        self.register_buffer("position_freqs", position_frequencies(config.hidden_size).float(), persistent=False)
        self.apply(_init_weights)

    def _embed(self, input_ids: Tensor, start: int | Tensor) -> Tensor:
        x = self.embedding(input_ids)  # [B, L, hidden]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + start
        return self.dropout(x + sinusoidal_positions(positions, self.position_freqs, x.shape[-1]).to(x.dtype))

    def _head(self, x: Tensor) -> Tensor:
        x = self.ln_f(x)
        return x @ self.embedding.weight.T if self.config.lm_head else x

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids [B, L] (right-padded; `attention_mask` [B, L] 1 = token, 0 = pad)
        -> logits [B, L, vocab] (hidden states [B, L, hidden] without the LM head)."""
        if is_eager():
            check_input_ids(input_ids, self.config.vocab_size)
            if attention_mask is not None:
                check_attention_mask(attention_mask, input_ids)
        x = self._embed(input_ids, 0)
        if attention_mask is not None:
            # Causality already keeps right padding out of every valid position; zeroing
            # the padded inputs also makes the outputs there independent of the pad ids.
            x = x * attention_mask[..., None].to(x.dtype)
        # Pad once to whole chunks and keep that length through the blocks: padding sits
        # after every real position, so causality keeps it out of their outputs.
        x = pad_to_chunks(x, self.config.chunk_size)
        for block in self.blocks:
            x = block(x)
        return self._head(x[:, : input_ids.shape[1]])

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> list[LayerState]:
        """The empty state a stream starts from: no finished chunks, no cached tokens."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        cfg = self.config
        device = device or self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        h, e = cfg.num_heads, cfg.head_dim

        def empty(*shape: int) -> Tensor:
            return torch.zeros(batch_size, h, *shape, device=device, dtype=dtype)

        return [
            LayerState(empty(0, e), empty(0, cfg.state_size), empty(0, e), empty(0, e), empty(e, e))
            for _ in range(cfg.num_layers)
        ]

    def stream(self, input_ids: Tensor, state: list[LayerState]) -> tuple[Tensor, list[LayerState]]:
        """Feed the next tokens [B, T] of every sequence; returns (logits [B, T, ...], state).

        Any split of a sequence gives the same outputs as one `forward` over it.
        """
        out, updates = self.stream_update(input_ids, state)
        return out, [layer.advance(update) for layer, update in zip(state, updates)]

    def stream_update(self, input_ids: Tensor, state: list[LayerState]) -> tuple[Tensor, list[LayerUpdate]]:
        """`stream`, returning per layer only what changed (`LayerUpdate`): a runtime
        that appends the finished chunks itself never copies the whole state per token."""
        if is_eager():
            check_input_ids(input_ids, self.config.vocab_size)
            check_state(state, self, input_ids.shape[0])
        first = state[0]
        seen = first.meta_keys.shape[-2] * self.config.chunk_size + first.keys.shape[-2]
        x = self._embed(input_ids, seen)
        updates = []
        for block, layer_state in zip(self.blocks, state):
            x, update = block.step(x, layer_state)
            updates.append(update)
        return self._head(x), updates


def _init_weights(module: nn.Module) -> None:
    # GPT-2 style small init keeps activations O(1) in a randomly initialized preset.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
