"""The public layer `bsbr_export.nn.BSBRAttention` against DESIGN.md's math written densely."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EDGE_LENGTHS

from bsbr_export import UserError
from bsbr_export.compare.cases import stream_pieces
from bsbr_export.model.attention import bsbr_attention
from bsbr_export.nn import BSBRAttention

C = 4  # chunk size of every layer here
VARIANTS = {
    "plain": dict(num_heads=2),
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "compressed": dict(num_heads=2, compression=5),
    "rope": dict(num_heads=2, rope_theta=100.0),
    "gqa-rope-compressed-nobias": dict(num_heads=4, num_kv_heads=1, rope_theta=10000.0, compression=3, bias=False),
    "gated": dict(num_heads=2, retrieval="gated"),
    "gqa-rope-compressed-gated": dict(num_heads=4, num_kv_heads=2, rope_theta=100.0, compression=5, retrieval="gated"),
}


def make_layer(variant: str, seed: int = 0) -> BSBRAttention:
    torch.manual_seed(seed)
    layer = BSBRAttention(hidden_size=16, chunk_size=C, **VARIANTS[variant]).double()
    if layer.retrieval == "gated":  # away from their initial values, so each head's gate and scale count
        with torch.no_grad():
            layer.retrieval_gate.normal_(0.0, 2.0)
            layer.retrieval_norm.normal_(1.0, 0.5)
    return layer.eval()


def hidden(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as a complex rotation: the pair (x_i, x_{i+e/2}) times exp(1j * t * theta^(-2i/e))."""
    length, e = x.shape[-2], x.shape[-1]
    angles = torch.arange(length, dtype=torch.float64)[:, None] * theta ** (-2 * torch.arange(e // 2) / e)
    z = torch.complex(x[..., : e // 2], x[..., e // 2 :]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def dense_reference(layer: BSBRAttention, x: torch.Tensor) -> torch.Tensor:
    """DESIGN.md's formulas as whole-sequence masked matrices (L x L within chunks, n x n
    between chunks), key/value heads repeated for grouped queries."""
    batch, length, _ = x.shape
    h, g, e, c = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.chunk_size

    def heads(t, count):
        return t.view(batch, length, count, e).transpose(1, 2)

    q, k, v = heads(layer.q_proj(x), h), heads(layer.k_proj(x), g), heads(layer.v_proj(x), g)
    r, hk = heads(layer.meta_query_proj(x), h), heads(layer.meta_key_proj(x), g)
    if layer.rope_theta is not None:
        q, k = rotate(q, layer.rope_theta), rotate(k, layer.rope_theta)
    k, v, hk = (t.repeat_interleave(h // g, dim=1) for t in (k, v, hk))

    pos = torch.arange(length)
    chunk = pos // c
    m_in = (chunk[:, None] == chunk[None, :]) & (pos[None, :] <= pos[:, None])  # [L, L]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(e)).masked_fill(~m_in, float("-inf"))
    local = scores.softmax(-1) @ v

    n = math.ceil(length / c)
    member = (chunk[None, :] == torch.arange(n)[:, None]).double()  # [n, L]: token s in chunk j
    f = torch.einsum("js,bhse,bhsf->bhjef", member, k, v).flatten(-2)  # F_j = K_j^T V_j
    if layer.compression is not None:
        f = f @ layer.compress.weight.T
    last = torch.clamp((torch.arange(n) + 1) * c - 1, max=length - 1)  # h_j's token (j < i only is read)
    prev = torch.clamp(torch.arange(n) * c - 1, min=0)  # r_i's token, for i >= 1
    meta = r[:, :, prev] @ hk[:, :, last].transpose(-1, -2) / math.sqrt(e)  # [B, H, n, n]
    m_out = torch.arange(n)[None, :] < torch.arange(n)[:, None]
    weights = meta.masked_fill(~m_out, float("-inf")).softmax(-1).nan_to_num()  # row 0: S_0 = 0
    s = weights @ f
    if layer.compression is not None:
        s = s @ layer.decompress.weight.T
    s = s.unflatten(-1, (e, e))[:, :, chunk]  # [B, H, L, e, e]: S_i of each token's chunk
    read = (q.unsqueeze(-2) @ s).squeeze(-2)  # q_t S_i
    if layer.retrieval == "sum":
        o = local + read  # o_t = local_t + q_t S_i
    else:  # o_t = (1 - g_h) local_t + g_h RMSNorm_h(q_t S_i)
        g = torch.sigmoid(layer.retrieval_gate)[:, None, None]
        rms = (read.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        o = (1 - g) * local + g * read / rms * layer.retrieval_norm[:, None, :]
    return layer.out_proj(o.transpose(1, 2).flatten(-2))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("which", EDGE_LENGTHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_dense_reference(variant, which, batch):
    layer = make_layer(variant)
    x = hidden(batch, EDGE_LENGTHS[which](C), seed=batch)
    with torch.no_grad():
        got, want = layer(x), dense_reference(layer, x)
    assert got.shape == x.shape
    assert (got - want).abs().max().item() <= 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", [0, 3, 4, 5, 13])
def test_causal(variant, t):
    layer = make_layer(variant)
    x = hidden(2, 3 * C + 5, seed=t)
    changed = x.clone()
    changed[:, t] += 1.0
    with torch.no_grad():
        base, out = layer(x), layer(changed)
    assert torch.equal(out[:, :t], base[:, :t])
    assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("variant", VARIANTS)
def test_right_padded_batch_matches_each_sequence_alone(variant):
    layer = make_layer(variant)
    lengths = [1, C - 1, C, 3 * C + 5]
    x = hidden(len(lengths), max(lengths), seed=7)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    junk = x.clone()
    junk[mask == 0] = 1e3  # anything in the padding
    with torch.no_grad():
        batched, with_junk = layer(x, mask), layer(junk, mask)
        for i, n in enumerate(lengths):
            assert (batched[i, :n] - layer(x[i : i + 1, :n])[0]).abs().max() < 1e-12
    assert torch.equal(batched, with_junk)  # padded inputs are zeroed, so even pad outputs agree


def test_mask_must_match_and_be_right_padding():
    layer = make_layer("plain")
    x = hidden(2, 6)
    with pytest.raises(UserError, match="attention_mask shape"):
        layer(x, torch.ones(2, 5, dtype=torch.long))
    left = torch.ones(2, 6, dtype=torch.long)
    left[1, :2] = 0
    with pytest.raises(UserError, match="right padding"):
        layer(x, left)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("length", [1, C - 1, 3 * C + 5, 7 * C + 2])
def test_stream_in_uneven_pieces_equals_forward(variant, length):
    layer = make_layer(variant)
    x = hidden(3, length, seed=length)
    state, outputs, at = layer.init_state(3), [], 0
    with torch.no_grad():
        for size in stream_pieces(length, C):
            out, state = layer.stream(x[:, at : at + size], state)
            outputs.append(out)
            at += size
        full = layer(x)
    assert (torch.cat(outputs, dim=1) - full).abs().max() < 1e-10
    # The state keeps key/value heads only: grouped-query heads shrink it by H / G.
    g, e = layer.num_kv_heads, layer.head_dim
    assert state.meta_keys.shape == (3, g, length // C, e)
    assert state.chunk_states.shape == (3, g, length // C, layer.state_size)
    assert state.keys.shape == state.values.shape == (3, g, length % C, e)


@pytest.mark.parametrize("which", EDGE_LENGTHS)
@pytest.mark.parametrize("compressed", [False, True])
def test_grouped_op_equals_op_on_repeated_heads(which, compressed):
    length, (heads, kv_heads, e) = EDGE_LENGTHS[which](C), (6, 2, 4)
    g = torch.Generator().manual_seed(length)
    q, mq = (torch.randn(2, heads, length, e, generator=g, dtype=torch.float64) for _ in range(2))
    k, v, mk = (torch.randn(2, kv_heads, length, e, generator=g, dtype=torch.float64) for _ in range(3))
    compression = ()
    if compressed:
        compression = (
            torch.randn(5, e * e, generator=g, dtype=torch.float64),
            torch.randn(e * e, 5, generator=g, dtype=torch.float64),
        )
    grouped = bsbr_attention(q, k, v, mq, mk, C, *compression)
    k, v, mk = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v, mk))
    assert (grouped - bsbr_attention(q, k, v, mq, mk, C, *compression)).abs().max() <= 1e-12


def test_op_rejects_kv_heads_that_do_not_divide():
    q = torch.randn(1, 4, 5, 2)
    k = torch.randn(1, 3, 5, 2)
    with pytest.raises(UserError, match="3 key/value heads do not divide 4"):
        bsbr_attention(q, k, k, q, k, C)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads 3 must divide num_heads 4"),
        (dict(num_heads=3), "not divisible by num_heads 3"),
        (dict(num_heads=16, rope_theta=1e4), "even head dim"),
        (dict(num_heads=2, compression=0), "compression must be"),
        (dict(num_heads=2, retrieval="normed"), "retrieval must be one of 'sum', 'gated'"),
    ],
)
def test_bad_arguments_are_one_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        BSBRAttention(hidden_size=16, chunk_size=C, **kwargs)


@pytest.mark.parametrize("variant", ["plain", "gqa-rope-compressed-nobias", "gqa-rope-compressed-gated"])
def test_torch_export_is_clean_and_runs_at_other_shapes(variant):
    from torch.export import Dim

    layer = make_layer(variant).float()
    example = hidden(2, 3 * C + 1).float()
    program = torch.export.export(layer, (example,), dynamic_shapes=({0: Dim("batch"), 1: Dim("sequence")},))
    exported = program.module()
    with torch.no_grad():
        for batch, length in [(1, 1), (3, C - 1), (1, C), (3, C + 1), (2, 9 * C + 3)]:
            x = hidden(batch, length, seed=length).float()
            assert (exported(x) - layer(x)).abs().max() < 1e-5


def cache_rows(states, chunk_size: int):
    """Each row's current chunk padded to c - 1 rows, and its S_i, stacked over rows."""

    def pad(x):
        return torch.nn.functional.pad(x, (0, 0, 0, chunk_size - 1 - x.shape[-2]))

    return (
        torch.cat([pad(s.keys) for s in states]),
        torch.cat([pad(s.values) for s in states]),
        torch.cat([s.retrieved for s in states]),
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_rows_advances_each_row_as_its_own_stream(variant):
    """One token for rows at positions 0 .. 7c+2 (each its own fill of the current chunk
    and its own count of finished chunks) equals each row's own `step`."""
    layer = make_layer(variant)
    positions = [0, 1, C - 2, C, C + 1, 3 * C + 2, 7 * C + 2]  # never the last of a chunk
    x = [hidden(1, p + 1, seed=p) for p in positions]
    states, expected = [], []
    with torch.no_grad():
        for p, xs in zip(positions, x):
            state = layer.init_state(1)
            if p:
                _, state = layer.stream(xs[:, :p], state)
            states.append(state)
            expected.append(layer.step(xs[:, p:], state))
        out, keys, values = layer.step_rows(
            torch.cat([xs[:, p:] for p, xs in zip(positions, x)]), torch.tensor(positions), *cache_rows(states, C)
        )
    for row, (want, update) in enumerate(expected):
        assert (out[row] - want[0]).abs().max() <= 1e-12
        assert (keys[row, :, -1] - update.keys[0, :, -1]).abs().max() <= 1e-12
        assert (values[row, :, -1] - update.values[0, :, -1]).abs().max() <= 1e-12


def test_gated_form_reads_nothing_in_the_first_chunk_and_learns_its_gate():
    """S_0 = 0: the first chunk's tokens get (1 - g) local and no NaN from the norm; the
    gate and norm scale get gradients (they are what the form learns)."""
    layer = make_layer("gated")
    x = hidden(2, 3 * C + 1, seed=3)
    out = layer(x)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert layer.retrieval_gate.grad.abs().min() > 0 and layer.retrieval_norm.grad.abs().sum() > 0
    with torch.no_grad():
        layer.retrieval_norm.mul_(7.0)  # scales only the retrieved term
        scaled = layer(x)
    assert torch.equal(scaled[:, :C], out[:, :C]) and not torch.allclose(scaled[:, C:], out[:, C:])
