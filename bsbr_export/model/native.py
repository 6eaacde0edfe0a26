"""The native BSBR model: DESIGN.md's math, top to bottom.

Token embedding + sinusoidal positions (any length), pre-LayerNorm blocks
(BSBR attention, then a GELU feed-forward), final LayerNorm, optional LM head tied
to the embedding. `forward` runs a whole (right-padded) batch; `stream` feeds it
piece by piece, carrying a `LayerState` per layer, and gives the same outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsbr_export.errors import UserError
from bsbr_export.model.attention import pad_to_chunks
from bsbr_export.model.config import BSBRConfig
from bsbr_export.model.layers import BSBRAttention, LayerState, LayerUpdate, check_attention_mask, is_eager


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
            f"input_ids must be in [0, {vocab_size}), got values in [{int(input_ids.min())}, {int(input_ids.max())}]"
        )


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


class NativeAttention(BSBRAttention):
    """The native model's attention: the public layer configured by a `BSBRConfig`,
    called on inputs the model has already padded to whole chunks."""

    def __init__(self, config: BSBRConfig) -> None:
        super().__init__(
            config.hidden_size,
            config.num_heads,
            config.chunk_size,
            compression=config.compression,
            retrieval=config.retrieval,
        )
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, n*c, hidden] (pre-normed, whole chunks) -> [B, n*c, hidden]."""
        return self.attend(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ff(ln(x))."""

    def __init__(self, config: BSBRConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = NativeAttention(config)
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

    def step_rows(self, x: Tensor, positions: Tensor, cache: tuple[Tensor, Tensor, Tensor]):
        a, key, value = self.attn.step_rows(self.ln_1(x), positions, *cache)
        x = x + self.dropout(a)
        return x + self.dropout(self.ff(self.ln_2(x))), (key, value)


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
        # F.linear, not `x @ weight.T`: exporters then see the tied weight itself as a
        # linear layer's weight (XNNPACK delegates only those), not a transposed copy.
        return F.linear(x, self.embedding.weight) if self.config.lm_head else x

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids [B, L] (right-padded; `attention_mask` [B, L] 1 = token, 0 = pad)
        -> logits [B, L, vocab] (hidden states [B, L, hidden] without the LM head)."""
        if is_eager():
            check_input_ids(input_ids, self.config.vocab_size)
            if attention_mask is not None:
                check_attention_mask(attention_mask, input_ids.shape, "input_ids")
        return self.forward_from(input_ids, 0, attention_mask)

    def forward_from(self, input_ids: Tensor, start: int, attention_mask: Tensor | None = None) -> Tensor:
        """`forward` of a window whose first token sits at position `start`: training on
        windows at random starts teaches the positions of sequences longer than the window."""
        x = self._embed(input_ids, start)
        if attention_mask is not None:
            # Causality already keeps right padding out of every valid position; zeroing
            # the padded inputs also makes the outputs there independent of the pad ids.
            x = x * attention_mask[..., None].to(x.dtype)
        # Pad once to whole chunks and keep that length through the blocks: padding sits
        # after every real position, so causality keeps it out of their outputs.
        x = pad_to_chunks(x, self.config.chunk_size)
        for block in self.blocks:
            x = block(x)
        # Gather the real positions rather than slice: a slice makes torch.export guard
        # that padding is non-zero (the length is not a multiple of c).
        return self._head(x.index_select(1, torch.arange(input_ids.shape[1], device=x.device)))

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> list[LayerState]:
        """The empty state a stream starts from: no finished chunks, no cached tokens."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        device = device or self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        return [block.attn.init_state(batch_size, device, dtype) for block in self.blocks]

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

    def step_rows(
        self, input_ids: Tensor, positions: Tensor, cache: list[tuple[Tensor, Tensor, Tensor]]
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """One token for each of B sequences at their own positions, none closing its chunk
        (see `BSBRAttention.step_rows`): input_ids [B, 1], positions [B], per layer the
        rows' (keys, values [B, H, c - 1, e], retrieved [B, H, e, e]). Returns the logits
        [B, 1, vocab] and per layer the tokens' (key, value) [B, H, 1, e] for the cache."""
        x = self.dropout(
            self.embedding(input_ids)
            + sinusoidal_positions(positions, self.position_freqs, self.config.hidden_size)[:, None]
        )
        rows = []
        for block, layer_cache in zip(self.blocks, cache):
            x, row = block.step_rows(x, positions, layer_cache)
            rows.append(row)
        return self._head(x), rows


def _init_weights(module: nn.Module) -> None:
    # GPT-2 style small init keeps activations O(1) in a randomly initialized preset.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
