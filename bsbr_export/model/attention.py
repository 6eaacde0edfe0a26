"""BSBR attention as pure tensor functions (DESIGN.md, "The model, exactly").

Shapes: `B` batch, `H` heads, `L` length, `c` chunk size, `n = ceil(L / c)` chunks,
`e` head dim, `s` stored state width (`e^2`, or `m` when compressed).

Grouped-query heads: keys, values, meta keys and chunk states may have `G` heads, `G`
dividing `H`; query head `h` reads key/value head `h // (H / G)` (as in Llama).

All chunks are computed at once on a `[B, H, n, c, e]` view, so a traced graph has no
loop and its chunk count follows the input length. The only tensors that grow faster
than `L` are the `[.., n, c, c]` within-chunk blocks and the `[.., n, n]` chunk-level
scores (`n = L / c` is small). Nothing of size `L x L` is built.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from bsbr_export.errors import UserError

RMS_EPS = 1e-6  # RMSNorm_h's epsilon: S_0 = 0 reads 0, and 0 stays 0


class RetrievalMix(NamedTuple):
    """The learned numbers of retrieval form `gated`, per query head `h` (`H` heads, head dim `e`)."""

    gate_logits: Tensor  # [H] beta_h, the gate g_h = sigmoid(beta_h)
    norm_scale: Tensor  # [H, e] RMSNorm_h's scale


def combine(local: Tensor, read: Tensor, mix: RetrievalMix | None = None) -> Tensor:
    """A token's output from its local term and what it reads from the retrieved state,
    `read = q_t S_i`; both [B, H, .., e] (heads on dim 1).

    Form `sum` (`mix` None): `o_t = local_t + q_t S_i`, the brief's and upstream's.
    Form `gated`: `o_t = (1 - g_h) local_t + g_h RMSNorm_h(q_t S_i)`. The unnormalized
    read sums `(q . k_s) v_s` over every token of the retrieved chunks, so it swamps the
    local term and its gradients are unbounded; normed and gated, it is one more input
    of the local term's size (TransNormer's NormAttention, Infini-attention's gate).
    """
    if mix is None:
        return local + read
    per_head = (-1,) + (1,) * (local.dim() - 2)
    gate = torch.sigmoid(mix.gate_logits).to(local.dtype).view(per_head)
    scale = mix.norm_scale.to(local.dtype).view(mix.norm_scale.shape[0], *(1,) * (local.dim() - 3), -1)
    normed = read * torch.rsqrt(read.pow(2).mean(-1, keepdim=True) + RMS_EPS) * scale
    return (1 - gate) * local + gate * normed


def num_chunks(length: int, chunk_size: int) -> int:
    """n = ceil(L / c), in integer math so tracing keeps it symbolic."""
    return (length + chunk_size - 1) // chunk_size


def pad_to_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """[.., L, e] -> [.., n*c, e]: right-pad the length with zeros to whole chunks."""
    length = x.shape[-2]
    return F.pad(x, (0, 0, 0, num_chunks(length, chunk_size) * chunk_size - length))


def to_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """[.., n*c, e] -> [.., n, c, e], a view. The length must be whole chunks (see
    `pad_to_chunks`): a model pads once and keeps that length through its blocks, so
    its graph has no per-layer pad or slice copies."""
    return x.unflatten(-2, (-1, chunk_size))


def boundaries(x: Tensor, chunk_size: int) -> Tensor:
    """The last position of every chunk: [.., n*c, e] -> [.., n, e].

    The last chunk's entry is padding when the real length is not whole chunks; the
    math never uses it (it would only feed a chunk after the sequence's end).
    """
    return to_chunks(x, chunk_size)[..., -1, :]


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """[B, G, ...] -> [B, heads, ...]: each of the `G` key/value heads serves `heads / G`
    consecutive query heads (grouped-query attention). `x` itself when `G == heads`."""
    kv_heads = x.shape[1]
    if kv_heads == heads:
        return x
    if heads % kv_heads:
        raise UserError(f"{kv_heads} key/value heads do not divide {heads} query heads: use a divisor of {heads}")
    return x.unsqueeze(2).expand(-1, -1, heads // kv_heads, *x.shape[2:]).flatten(1, 2)


def within_chunk_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention inside each chunk under the causal mask `M_in`.

    q: [B, H, n, c, e]; k, v: [B, G, n, c, e] -> [B, H, n, c, e]. Padded keys sit after
    every real query of their chunk, so `M_in` already hides them.
    """
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    # Chunks become extra heads of one causal SDPA: its mask is M_in exactly, and
    # ONNX opset 23 exports it as a single fused Attention node.
    heads, n = q.shape[1], q.shape[2]
    out = F.scaled_dot_product_attention(q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2), is_causal=True)
    return out.unflatten(1, (heads, n))


def chunk_states(k: Tensor, v: Tensor, compress: Tensor | None = None) -> Tensor:
    """F_j = K_j^T V_j, flattened: [B, H, n, c, e] -> [B, H, n, s].

    With `compress` ([m, e^2]) each state is mapped to m numbers.
    """
    states = (k.transpose(-1, -2) @ v).flatten(-2)  # [B, H, n, e^2]
    return states if compress is None else states @ compress.T


def batched_matmul(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """a [.., H, n, m] @ b [.., G, m, p] (b [.., G, p, m] with `transpose_b`) -> [.., H, n, p],
    equal leading dims, `G` dividing `H` (grouped-query heads: `G = H` is plain batching).

    `@` on sizes that can be 0 or 1 (a stream's past chunks, the chunks a step finishes)
    makes torch.export pin them to the example's value: aten.matmul's decomposition
    reshapes a transposed operand, and `repeat_kv`'s expanded copy is reshaped too. One
    `bmm` over operands reshaped while still in their own layout does not, so the step's
    AOTInductor package runs at every state. The `H / G` query heads that share a
    key/value head (consecutive, as in `repeat_kv`) become extra rows of that head's
    product, so shared keys are never copied per query head."""
    *lead, heads, n, m = a.shape
    groups = b.shape[-3]
    batch = math.prod(lead) * groups
    b3 = b.reshape(batch, *b.shape[-2:])
    out = torch.bmm(a.reshape(batch, (heads // groups) * n, m), b3.transpose(1, 2) if transpose_b else b3)
    return out.reshape(*lead, heads, n, out.shape[-1])


def retrieve(
    meta_queries: Tensor,
    meta_keys: Tensor,
    states: Tensor,
    past_meta_keys: Tensor | None = None,
    past_states: Tensor | None = None,
    decompress: Tensor | None = None,
) -> Tensor:
    """Block retrieval under the strictly causal chunk mask `M_out`.

    meta_queries: [B, H, r, e] (r <= n), row `a` is the query that chunk `a + 1` asks
    with (from the last token of chunk `a`); meta_keys: [B, G, n, e] and states:
    [B, G, n, s] are this block's chunks. A stream's `P` earlier chunks come as past_meta_keys
    [B, G, P, e] and past_states [B, G, P, s]. Row `a` attends to every past chunk and
    to this block's chunks `0..a`: all chunks before chunk `a + 1`. Returns the
    retrieved states `S_{a+1}`: [B, H, r, e, e] (decompressed with `decompress`
    ([e^2, m]) if given).

    Past and new parts are weighted separately (one softmax over their joined scores),
    so a streaming step reads the past states without copying them.
    """
    e = meta_queries.shape[-1]
    rows = torch.arange(meta_queries.shape[-2], device=meta_queries.device)
    cols = torch.arange(meta_keys.shape[-2], device=meta_queries.device)
    m_out = cols[None, :] <= rows[:, None]  # [rows, n]: this block's chunks 0..a
    scores = (batched_matmul(meta_queries, meta_keys, transpose_b=True) / math.sqrt(e)).masked_fill(
        ~m_out, float("-inf")
    )
    if past_meta_keys is None:
        retrieved = batched_matmul(scores.softmax(dim=-1), states)  # [B, H, n, s]
    else:
        past_scores = batched_matmul(meta_queries, past_meta_keys, transpose_b=True) / math.sqrt(e)  # [B, H, n, P]
        weights = torch.cat([past_scores, scores], dim=-1).softmax(dim=-1)
        # Gathered, not sliced: a slice's strides would be reshaped (see batched_matmul).
        past, joined = past_meta_keys.shape[-2], torch.arange(weights.shape[-1], device=weights.device)
        retrieved = batched_matmul(weights.index_select(-1, joined[:past]), past_states) + batched_matmul(
            weights.index_select(-1, joined[past:]), states
        )
    if decompress is not None:
        retrieved = retrieved @ decompress.T
    return retrieved.unflatten(-1, (e, e))


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    meta_queries: Tensor,
    meta_keys: Tensor,
    first_retrieved: Tensor,
    compress: Tensor | None = None,
    decompress: Tensor | None = None,
    mix: RetrievalMix | None = None,
) -> Tensor:
    """BSBR over a block of whole chunks that starts a sequence.

    q: [B, H, n, c, e]; k, v: [B, G, n, c, e]; meta_queries: [B, H, n, e] and meta_keys:
    [B, G, n, e] taken at each chunk's last token; first_retrieved: [B, H, e, e] is `S` of
    the block's first chunk (zeros at the start of a sequence). Retrieval runs for the
    `n - 1` rows the block's own chunks read, and no more. Returns [B, H, n, c, e].
    """
    local = within_chunk_attention(q, k, v)
    states = chunk_states(k, v, compress)
    following = retrieve(meta_queries[..., : q.shape[-3] - 1, :], meta_keys, states, decompress=decompress)
    per_chunk = torch.cat([first_retrieved.unsqueeze(-3), following], dim=-3)  # S_i of each chunk
    return combine(local, q @ per_chunk, mix)


def pack_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """[B, n*c, ..] -> [B*n, c, ..]: every chunk becomes a batch row.

    Whole-sequence code works in this layout so that the chunk count `n` is never a dim
    on its own: torch.export would guard `n != 1` (and more) on every such dim, and a
    plain `Dim("sequence")` export would then reject lengths up to one chunk. `B*n` and
    `n*c` are never 1 for a symbolic batch, so they raise no guard. Flatten, then split
    off `c`: a direct reshape would have to decide whether `B` divides `B*n` evenly.
    """
    return x.flatten(0, 1).unflatten(0, (-1, chunk_size))


def unpack_chunks(x: Tensor, batch: int) -> Tensor:
    """The inverse of `pack_chunks`: [B*n, c, ..] -> [B, n*c, ..]."""
    return x.flatten(0, 1).unflatten(0, (batch, -1))


def packed_retrieval_weights(meta_queries: Tensor, meta_keys: Tensor, chunks: int) -> Tensor:
    """The chunk weights `a_ij` of every chunk row in the `pack_chunks` layout: meta_queries
    [B*n, H, e] and meta_keys [B*n, H, e] from each chunk's last token, `chunks` = n ->
    [H, B*n, B*n]; row `i` weighs the chunks before it in its own sequence (`M_out`), and a
    sequence's first chunk's row is all zeros (`S_0 = 0`).

    Every chunk row is scored against every row of the batch: the extra `B`x work is on
    the small chunk-level term only, and `n` alone never becomes a dim.
    """
    e = meta_queries.shape[-1]
    rows = torch.arange(meta_queries.shape[0], device=meta_queries.device)
    sequence = rows // chunks
    chunk = rows - sequence * chunks  # not `%`: the ONNX exporter has no remainder by a symbolic size
    first = chunk == 0  # a sequence's first chunk reads nothing: S_0 = 0
    # Chunk i asks with r_i, the meta query from chunk i - 1's last token, and reads chunks
    # 0..i-1 of its own sequence (M_out). The queries move down one row, not the result:
    # they are [B*n, H, e], the retrieved states [B*n, H, e^2].
    asking = meta_queries.index_select(0, (rows - 1).clamp(min=0))
    m_out = (sequence[None, :] == sequence[:, None]) & (rows[None, :] < rows[:, None])
    # A first chunk's row keeps its own column, so its softmax is finite; its weights are zeroed.
    m_out = m_out | (first[:, None] & (rows[None, :] == rows[:, None]))
    scores = asking.transpose(0, 1) @ meta_keys.permute(1, 2, 0) / math.sqrt(e)  # [H, B*n, B*n]
    return scores.masked_fill(~m_out, float("-inf")).softmax(dim=-1).masked_fill(first[:, None], 0.0)


def packed_bsbr_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    meta_queries: Tensor,
    meta_keys: Tensor,
    chunks: int,
    compress: Tensor | None = None,
    decompress: Tensor | None = None,
    mix: RetrievalMix | None = None,
) -> Tensor:
    """Causal BSBR over whole sequences in the `pack_chunks` layout.

    q: [B*n, H, c, e], k, v: [B*n, G, c, e]; meta_queries [B*n, H, e], meta_keys
    [B*n, G, e] from each chunk's last token (G key/value heads dividing H); `chunks` = n.
    Returns [B*n, H, c, e]. Retrieval runs under `M_out` restricted to each row's own
    sequence (see `packed_retrieval_weights`).
    """
    e, heads = q.shape[-1], q.shape[1]
    k, v, meta_keys = repeat_kv(k, heads), repeat_kv(v, heads), repeat_kv(meta_keys, heads)
    local = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # M_in, one fused op per chunk row
    states = chunk_states(k, v, compress)  # [B*n, H, s]
    retrieved = packed_retrieval_weights(meta_queries, meta_keys, chunks) @ states.transpose(0, 1)  # [H, B*n, s]
    if decompress is not None:
        retrieved = retrieved @ decompress.T
    return combine(local, q @ retrieved.transpose(0, 1).unflatten(-1, (e, e)), mix)


class StreamOutput(NamedTuple):
    """What one streaming block produces (see `packed_stream_attention`)."""

    output: Tensor  # [B*n, H, c, e]
    meta_keys: Tensor  # [B, G, finished, e] h_j of the chunks the block finished
    states: Tensor  # [B, G, finished, s] and their states F_j
    retrieved: Tensor  # [B, H, e, e] S of the chunk the next step continues


def packed_stream_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    meta_queries: Tensor,
    meta_keys: Tensor,
    batch: int,
    finished: int,
    chunks: int,
    first_retrieved: Tensor,
    past_meta_keys: Tensor,
    past_states: Tensor,
    compress: Tensor | None = None,
    decompress: Tensor | None = None,
    mix: RetrievalMix | None = None,
) -> StreamOutput:
    """One streaming block in the `pack_chunks` layout: its `n = chunks` chunks are the
    `finished` complete ones and, when the block ends inside a chunk, that partial chunk
    (a block ending on a boundary computes no empty chunk for the next step: a chunk's
    last token or a prompt piece costs its own chunks only).

    q: [B*n, H, c, e]; k, v: [B*n, G, c, e]; meta_queries [B*n, H, e] and meta_keys
    [B*n, G, e] from each chunk's last token; first_retrieved [B, H, e, e] is `S` of the
    block's first chunk; past_meta_keys / past_states ([B, G, P, e] / [B, G, P, s]) the
    chunks earlier steps finished. Retrieval runs for the finished chunks' rows only, so a
    step that finishes none never reads the past states.
    """
    local = F.scaled_dot_product_attention(q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), is_causal=True)

    def finished_rows(x: Tensor) -> Tensor:  # [B*n, heads, ..] -> [B, heads, finished, ..]
        # Transposed before the gather, so the result is a fresh contiguous tensor.
        return x.unflatten(0, (batch, -1)).transpose(1, 2).index_select(2, torch.arange(finished, device=x.device))

    new_meta_keys = finished_rows(meta_keys)
    new_states = finished_rows(chunk_states(k, v, compress))
    following = retrieve(
        finished_rows(meta_queries), new_meta_keys, new_states, past_meta_keys, past_states, decompress
    )  # [B, H, finished, e, e]: S of chunks 1..finished
    # S of chunks 0..finished: the block's own, then the one the next step continues.
    per_chunk = torch.cat([first_retrieved.unsqueeze(1), following.transpose(1, 2)], dim=1)
    own = per_chunk.index_select(1, torch.arange(chunks, device=q.device))  # [B, n, H, e, e]
    output = combine(local, batched_matmul(q, own.flatten(0, 1)), mix)
    return StreamOutput(output, new_meta_keys, new_states, per_chunk[:, -1])


def bsbr_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    meta_q: Tensor,
    meta_k: Tensor,
    chunk_size: int,
    compress: Tensor | None = None,
    decompress: Tensor | None = None,
    mix: RetrievalMix | None = None,
) -> Tensor:
    """Causal BSBR attention over a whole sequence of any length.

    q, meta_q: [B, H, L, e]; k, v, meta_k: [B, G, L, e] with `G` dividing `H`
    (grouped-query heads; `G = H` is plain multi-head). Meta queries and keys come for
    every position; only chunk-boundary positions are read: `h_j` from the last token of
    chunk `j`, `r_i` from the last token of chunk `i - 1`. Returns [B, H, L, e].
    Optional compression: `compress` [m, e^2] and `decompress` [e^2, m]; `mix` gives
    retrieval form `gated` (see `combine`).
    """
    length = q.shape[-2]
    q, k, v, meta_q, meta_k = (pad_to_chunks(t, chunk_size) for t in (q, k, v, meta_q, meta_k))
    return bsbr_attention_at_boundaries(
        q,
        k,
        v,
        boundaries(meta_q, chunk_size),
        boundaries(meta_k, chunk_size),
        chunk_size,
        compress,
        decompress,
        mix,
    )[..., :length, :]


def bsbr_attention_at_boundaries(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    meta_queries: Tensor,
    meta_keys: Tensor,
    chunk_size: int,
    compress: Tensor | None = None,
    decompress: Tensor | None = None,
    mix: RetrievalMix | None = None,
) -> Tensor:
    """`bsbr_attention` on whole chunks, with meta queries/keys already taken at chunk
    boundaries.

    q: [B, H, n*c, e]; k, v: [B, G, n*c, e]; meta_queries: [B, H, n, e]; meta_keys:
    [B, G, n, e]. The model calls this
    form so it projects only the `n` boundary tokens, not all `L`. Returns [B, H, n*c, e].
    """
    batch, heads, _, e = q.shape
    first = q.new_zeros(batch, heads, e, e)  # S_0 = 0
    out = chunked_attention(
        to_chunks(q, chunk_size),
        to_chunks(k, chunk_size),
        to_chunks(v, chunk_size),
        meta_queries,
        meta_keys,
        first,
        compress=compress,
        decompress=decompress,
        mix=mix,
    )
    return out.flatten(-3, -2)
