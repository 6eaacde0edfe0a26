"""BSBR attention as a layer for any architecture, public as `bsbr_export.nn.BSBRAttention`.

The native model's attention is this layer (`bsbr_export.model.native.NativeAttention`
only configures it from a `BSBRConfig`), so a user's model gets the same math, the same
streaming state and the same export behavior: no Python loop over chunks, no `.item()`,
integer chunk arithmetic, so `torch.export` with a dynamic batch and sequence keeps both
symbolic.

    attn = BSBRAttention(hidden_size=256, num_heads=8, chunk_size=64, num_kv_heads=2, rope_theta=1e4)
    y = attn(x)  # [batch, length, 256] at any length
    state = attn.init_state(batch)
    y1, state = attn.stream(x[:, :10], state)  # any split gives the forward's outputs
    y2, state = attn.stream(x[:, 10:], state)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsbr_export.errors import UserError
from bsbr_export.model.attention import (
    RetrievalMix,
    combine,
    pack_chunks,
    packed_bsbr_attention,
    packed_stream_attention,
    pad_to_chunks,
    repeat_kv,
    unpack_chunks,
)
from bsbr_export.model.config import RETRIEVAL_FORMS

__all__ = ["BSBRAttention", "LayerState", "LayerUpdate"]


class LayerState(NamedTuple):
    """One layer's streaming state after `P` finished chunks and `t < c` more tokens
    (`G` key/value heads, `H` query heads).

    The boundary token of the last finished chunk is not kept as such: its meta query
    is applied the moment its chunk finishes, and the result is `retrieved`, so a token
    inside a chunk costs O(c*e + e^2) instead of O(P*e^2).
    """

    meta_keys: Tensor  # [B, G, P, e]  h_j of finished chunks
    chunk_states: Tensor  # [B, G, P, s]  F_j of finished chunks (compressed when m is set)
    keys: Tensor  # [B, G, t, e]  the current chunk's keys so far
    values: Tensor  # [B, G, t, e]  and values
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

    new_meta_keys: Tensor  # [B, G, k, e]
    new_chunk_states: Tensor  # [B, G, k, s]
    keys: Tensor  # [B, G, t', e]
    values: Tensor  # [B, G, t', e]
    retrieved: Tensor  # [B, H, e, e]


def is_eager() -> bool:
    """False while tracing, scripting or compiling: data-dependent checks would be
    frozen into (or break) the graph, so they run in eager mode only."""
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())


def check_attention_mask(attention_mask: Tensor, shape: torch.Size, input_name: str) -> None:
    """Raise UserError unless `attention_mask` is an integer/bool 0/1 [batch, length]
    right-padding mask (1s, then only 0s) of the input's batch and length, with at least
    one token per row. Call in eager mode only."""
    if not isinstance(attention_mask, Tensor):
        raise UserError(f"attention_mask must be a torch.Tensor (or None), got {type(attention_mask).__name__}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise UserError(f"attention_mask must be int64, int32 or bool (1 = token, 0 = pad), got {attention_mask.dtype}")
    if attention_mask.shape != shape:
        raise UserError(f"attention_mask shape {list(attention_mask.shape)} != {input_name} shape {list(shape)}")
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise UserError(f"attention_mask must hold only 0 and 1, got values in [{int(mask.min())}, {int(mask.max())}]")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        # Positions count from each row's start, so only right padding keeps them right.
        raise UserError("attention_mask must be right padding: 1s, then only 0s, in every row")
    if mask.shape[1] and bool((mask[:, 0] == 0).any()):
        raise UserError("attention_mask has a row of only 0s: every row needs at least one token")


def rope_frequencies(head_dim: int, theta: float) -> Tensor:
    """theta^(-2i/e) for i < e/2, in float64 (an `exp` inside the graph would differ
    between runtimes, as the model's sinusoidal positions do)."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def apply_rope(x: Tensor, positions: Tensor, frequencies: Tensor) -> Tensor:
    """Rotary position embedding (the rotate-half layout of GPT-NeoX / Llama): the pair
    (x_i, x_{i + e/2}) is turned by the angle `position * frequency_i`.
    x: [B, heads, L, e]; positions: [L], or [B, L] (each row at its own) -> [B, heads, L, e]."""
    angles = positions.to(frequencies.dtype)[..., None] * frequencies  # [L, e/2] or [B, L, e/2]
    if positions.dim() == 2:
        angles = angles.unsqueeze(1)  # [B, 1, L, e/2]: the same for every head
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class BSBRAttention(nn.Module):
    """Causal multi-head BSBR attention: within-chunk softmax plus block retrieval
    (DESIGN.md, "The model, exactly"), for any architecture.

    Args (named like `BSBRConfig`'s fields):
        hidden_size: width of the input and output.
        num_heads: query heads `H`; the head dim is `e = hidden_size / num_heads`.
        chunk_size: tokens per chunk `c`.
        num_kv_heads: key/value heads `G` (grouped-query attention): keys, values, meta
            keys and chunk states have `G` heads, each shared by `H / G` query heads.
            None means `G = H`.
        compression: compress each chunk state `e^2 -> m` (None: no compression).
        bias: whether the projections have biases.
        rope_theta: rotary position embedding of q and k with this base (e.g. 10000);
            None: no positions inside the layer. Positions count from the sequence's
            start, also when streaming. Meta queries and keys are not rotated.
        retrieval: how a token's output joins the local and retrieved terms: "sum"
            (`local + q S`, the brief's and upstream bsbr's) or "gated" (`(1 - g) local
            + g RMSNorm(q S)`, a learned gate and norm scale per head; trains far better).
            Both carry the same streaming state.

    `forward` takes `[batch, length, hidden]` at any length (with an optional
    right-padding `attention_mask` [batch, length]); `init_state` / `stream` process a
    sequence in pieces with the same outputs.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        chunk_size: int,
        num_kv_heads: int | None = None,
        compression: int | None = None,
        bias: bool = True,
        rope_theta: float | None = None,
        retrieval: str = "sum",
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_arguments(hidden_size, num_heads, chunk_size, num_kv_heads, compression, rope_theta, retrieval)
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.chunk_size, self.compression, self.rope_theta = chunk_size, compression, rope_theta
        self.retrieval = retrieval
        self.head_dim = e = hidden_size // num_heads
        kv_size = num_kv_heads * e
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.k_proj = nn.Linear(hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(hidden_size, kv_size, bias=bias)
        self.meta_query_proj = nn.Linear(hidden_size, hidden_size, bias=bias)  # W_r
        self.meta_key_proj = nn.Linear(hidden_size, kv_size, bias=bias)  # W_h
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        if compression is not None:
            self.compress = nn.Linear(e * e, compression, bias=False)
            self.decompress = nn.Linear(compression, e * e, bias=False)
        if retrieval == "gated":
            self.retrieval_gate = nn.Parameter(torch.zeros(num_heads))  # beta_h: g_h = 1/2, an even mix
            self.retrieval_norm = nn.Parameter(torch.ones(num_heads, e))  # RMSNorm_h's scale

    @property
    def state_size(self) -> int:
        """Width of one stored chunk state: m when compressed, else e^2."""
        return self.compression if self.compression is not None else self.head_dim**2

    def _heads(self, x: Tensor) -> Tensor:
        """[B, L, heads*e] -> [B, heads, L, e]"""
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def _compression(self) -> tuple[Tensor | None, Tensor | None]:
        if self.compression is None:
            return None, None
        return self.compress.weight, self.decompress.weight

    def _mix(self) -> RetrievalMix | None:
        """The gate and norm of retrieval form `gated`; None for `sum`."""
        return RetrievalMix(self.retrieval_gate, self.retrieval_norm) if self.retrieval == "gated" else None

    def _qkv(self, x: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, L, e], k and v [B, G, L, e] of x [B, L, hidden] at positions start..
        (`start` [B, 1]: each row from its own)."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.rope_theta is not None:
            # Computed from the arguments, not kept in a buffer: transformers (v5) builds a
            # model on the meta device and leaves buffers no checkpoint holds uninitialized.
            # Rounded to float32 as the exported graphs hold them; float64 inputs compute on.
            dtype = torch.promote_types(x.dtype, torch.float32)
            freqs = rope_frequencies(self.head_dim, self.rope_theta).float().to(x.device, dtype)
            positions = torch.arange(x.shape[1], device=x.device) + start
            q, k = apply_rope(q, positions, freqs), apply_rope(k, positions, freqs)
        return q, k, v

    def _packed(self, x: Tensor) -> Tensor:
        """[B, heads, n*c, e] -> [B*n, heads, c, e] (see `pack_chunks`)."""
        return pack_chunks(x.transpose(1, 2), self.chunk_size).transpose(1, 2)

    def _packed_meta(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Meta queries r [B*n, H, e] and keys h [B*n, G, e] from each chunk's last token.
        x: [B, n*c, hidden]."""
        last = pack_chunks(x, self.chunk_size)[:, -1]  # [B*n, hidden]
        return (
            self.meta_query_proj(last).unflatten(-1, (-1, self.head_dim)),
            self.meta_key_proj(last).unflatten(-1, (-1, self.head_dim)),
        )

    def attend(self, x: Tensor) -> Tensor:
        """x: [B, n*c, hidden] (whole chunks, starting at position 0) -> [B, n*c, hidden].

        `forward` without the padding: a model that pads once to whole chunks and keeps
        that length through its layers calls this, so its graph has no per-layer pad or
        slice."""
        q, k, v = self._qkv(x, 0)  # [B, H|G, n*c, e]
        o = packed_bsbr_attention(
            self._packed(q),
            self._packed(k),
            self._packed(v),
            *self._packed_meta(x),
            x.shape[1] // self.chunk_size,
            *self._compression(),
            self._mix(),
        )
        return unpack_chunks(self.out_proj(o.transpose(1, 2).flatten(-2)), x.shape[0])

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """hidden_states [B, L, hidden] at any L >= 1 (right-padded; `attention_mask`
        [B, L], 1 = token, 0 = pad) -> [B, L, hidden]. Outputs at valid positions do not
        depend on padded ones."""
        if attention_mask is not None:
            if is_eager():
                check_attention_mask(attention_mask, hidden_states.shape[:2], "hidden_states")
            # Causality already keeps right padding out of every valid position; zeroing
            # the padded inputs also makes the outputs there independent of their values.
            hidden_states = hidden_states * attention_mask[..., None].to(hidden_states.dtype)
        # Gather the real positions rather than slice: a slice makes torch.export guard
        # that padding is non-zero (the length is not a multiple of c).
        real = torch.arange(hidden_states.shape[1], device=hidden_states.device)
        return self.attend(pad_to_chunks(hidden_states, self.chunk_size)).index_select(1, real)

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LayerState:
        """The empty state a stream starts from: no finished chunks, no cached tokens.
        Device and dtype default to the layer's weights'."""
        device = device or self.q_proj.weight.device
        dtype = dtype or self.q_proj.weight.dtype
        g, e = self.num_kv_heads, self.head_dim

        def empty(heads: int, *shape: int) -> Tensor:
            return torch.zeros(batch_size, heads, *shape, device=device, dtype=dtype)

        return LayerState(
            empty(g, 0, e), empty(g, 0, self.state_size), empty(g, 0, e), empty(g, 0, e), empty(self.num_heads, e, e)
        )

    def stream(self, hidden_states: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """Feed the next inputs [B, T, hidden] of every sequence; returns (outputs
        [B, T, hidden], state). Any split of a sequence gives `forward`'s outputs."""
        out, update = self.step(hidden_states, state)
        return out, state.advance(update)

    def step(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerUpdate]:
        """`stream`, returning only what changed (`LayerUpdate`).

        The current chunk's `t` cached tokens and the `T` new ones form a block that
        starts on a chunk boundary; cached positions get zero queries and their outputs
        are dropped. Chunks the block finishes are returned for the state to append.
        The block is padded to whole chunks (the last, when the block ends inside it, is
        the one the next step goes on with), and runs in the packed layout: no chunk
        count is a dim on its own, so torch.export raises no guard on it (see `pack_chunks`).
        """
        c, batch = self.chunk_size, x.shape[0]
        t = state.keys.shape[-2]
        q, new_k, new_v = self._qkv(x, state.meta_keys.shape[-2] * c + t)
        k = torch.cat([state.keys, new_k], dim=-2)  # [B, G, t+T, e]
        v = torch.cat([state.values, new_v], dim=-2)
        total = k.shape[-2]
        finished = total // c
        chunks = (total + c - 1) // c  # the last one partial when the block ends inside it
        padded = chunks * c

        def pad(y: Tensor, front: int = 0) -> Tensor:  # to `padded` rows, each size from y's own shape:
            # torch.export sees the keys' and values' lengths as two symbols, so a pad from
            # the keys' would leave the values' padded length unknown (and guarded).
            return F.pad(y, (0, 0, front, padded - front - y.shape[-2]))

        out = packed_stream_attention(
            self._packed(pad(q, t)),
            self._packed(pad(k)),
            self._packed(pad(v)),
            *self._packed_meta(pad(x, t)),
            batch,
            finished,
            chunks,
            state.retrieved,
            state.meta_keys,
            state.chunk_states,
            *self._compression(),
            self._mix(),
        )
        # Gather rather than slice the new tokens' outputs and the unfinished chunk's keys:
        # a slice makes torch.export guard on where it starts and ends.
        o = unpack_chunks(out.output.transpose(1, 2).flatten(-2), batch)  # [B, n*c, hidden]
        o = o.index_select(1, torch.arange(x.shape[1], device=x.device) + t)
        rest = torch.arange(total - finished * c, device=x.device) + finished * c
        update = LayerUpdate(
            new_meta_keys=out.meta_keys,
            new_chunk_states=out.states,
            keys=k.index_select(2, rest),
            values=v.index_select(2, rest),
            retrieved=out.retrieved,
        )
        return self.out_proj(o), update

    def step_rows(
        self, x: Tensor, positions: Tensor, keys: Tensor, values: Tensor, retrieved: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One token for each of B sequences, each at its own position (in-flight batching).

        x [B, 1, hidden]; positions [B], the tokens' positions, none the last of its chunk
        (`positions % c < c - 1`: a token that closes a chunk needs the sequence's finished
        chunks, `step` does that); keys / values [B, G, c - 1, e], each row's current chunk
        with its first `positions % c` rows filled (the rest is never read); retrieved
        [B, H, e, e], each row's S_i. The cost is the same at any context: nothing of the
        finished chunks is read. Returns (out [B, 1, hidden], the tokens' keys and values
        [B, G, 1, e]), which the caller writes at row `positions % c` of its cache.
        """
        q, k, v = self._qkv(x, positions[:, None])
        fill = positions % self.chunk_size
        slots = torch.arange(keys.shape[-2], device=x.device)
        cached = slots[None, :] < fill[:, None]  # [B, c - 1]: the rows of the chunk so far
        heads, scale = q.shape[1], q.shape[-1] ** -0.5
        # softmax over [the cached rows, the token itself], computed apart: the cache is read
        # in place (joining it with the token would copy every row's cache, every layer).
        scores = (q @ repeat_kv(keys, heads).transpose(-1, -2)) * scale  # [B, H, 1, c - 1]
        scores = scores.masked_fill(~cached[:, None, None, :], float("-inf"))
        own = (q * repeat_kv(k, heads)).sum(-1, keepdim=True) * scale  # [B, H, 1, 1]
        weights = torch.softmax(torch.cat([scores, own], dim=-1), dim=-1)
        local = weights[..., :-1] @ repeat_kv(values, heads) + weights[..., -1:] * repeat_kv(v, heads)
        o = combine(local, q @ retrieved, self._mix())
        return self.out_proj(o.transpose(1, 2).flatten(-2)), k, v


def _check_arguments(
    hidden_size: int,
    num_heads: int,
    chunk_size: int,
    num_kv_heads: int,
    compression: int | None,
    rope_theta: float | None,
    retrieval: str,
) -> None:
    """Collect every problem with the layer's arguments and raise one UserError."""
    problems = []
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_heads", num_heads),
        ("chunk_size", chunk_size),
        ("num_kv_heads", num_kv_heads),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive integer (got {value!r})")
    if not problems:
        if hidden_size % num_heads:
            problems.append(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if num_heads % num_kv_heads:
            problems.append(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
        if rope_theta is not None and (hidden_size // num_heads) % 2:
            problems.append(f"rope_theta needs an even head dim (hidden_size / num_heads = {hidden_size // num_heads})")
    if compression is not None and (
        not isinstance(compression, int) or isinstance(compression, bool) or compression < 1
    ):
        problems.append(f"compression must be a positive integer or None (got {compression!r})")
    if rope_theta is not None and (
        isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 1
    ):
        problems.append(f"rope_theta must be a number > 1 or None (got {rope_theta!r})")
    if retrieval not in RETRIEVAL_FORMS:
        problems.append(f"retrieval must be one of {', '.join(map(repr, RETRIEVAL_FORMS))} (got {retrieval!r})")
    if problems:
        raise UserError("invalid BSBRAttention arguments: " + "; ".join(problems))
