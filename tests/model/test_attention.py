"""The functional op against a slow, obviously-correct loop over DESIGN.md's equations."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EDGE_LENGTHS
from torch.utils._python_dispatch import TorchDispatchMode

from bsbr_export.model.attention import bsbr_attention


def reference(q, k, v, meta_q, meta_k, c, compress=None, decompress=None):
    """DESIGN.md's math, one token at a time, in plain loops."""
    batch, heads, length, e = q.shape
    n = math.ceil(length / c)
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            states = []  # F_j, summed token by token
            for j in range(n):
                f = torch.zeros(e, e, dtype=q.dtype)
                for s in range(j * c, min((j + 1) * c, length)):
                    f += torch.outer(k[b, h, s], v[b, h, s])
                states.append(f.flatten() if compress is None else compress @ f.flatten())
            for i in range(n):
                if i == 0:
                    retrieved = torch.zeros(e, e, dtype=q.dtype)
                else:
                    r = meta_q[b, h, i * c - 1]  # last token of the previous chunk
                    scores = torch.stack([r @ meta_k[b, h, (j + 1) * c - 1] / math.sqrt(e) for j in range(i)])
                    weights = scores.softmax(0)
                    mixed = sum(weights[j] * states[j] for j in range(i))
                    if decompress is not None:
                        mixed = decompress @ mixed
                    retrieved = mixed.reshape(e, e)
                for t in range(i * c, min((i + 1) * c, length)):
                    keys = range(i * c, t + 1)  # same chunk, s <= t
                    scores = torch.stack([q[b, h, t] @ k[b, h, s] / math.sqrt(e) for s in keys])
                    weights = scores.softmax(0)
                    local = sum(w * v[b, h, s] for w, s in zip(weights, keys))
                    out[b, h, t] = local + q[b, h, t] @ retrieved
    return out


def _inputs(length, e=4, batch=2, heads=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, e, generator=g, dtype=dtype) for _ in range(5)]


@pytest.mark.parametrize("c", [1, 3, 4, 7])
@pytest.mark.parametrize("which", EDGE_LENGTHS)
@pytest.mark.parametrize("compressed", [False, True])
def test_matches_loop_reference(c, which, compressed):
    length = EDGE_LENGTHS[which](c)
    q, k, v, mq, mk = _inputs(length, seed=length * 31 + c)
    compress = decompress = None
    if compressed:
        g = torch.Generator().manual_seed(c)
        compress = torch.randn(6, 16, generator=g, dtype=torch.float64)
        decompress = torch.randn(16, 6, generator=g, dtype=torch.float64)
    got = bsbr_attention(q, k, v, mq, mk, c, compress, decompress)
    want = reference(q, k, v, mq, mk, c, compress, decompress)
    assert got.shape == (2, 2, length, 4)
    assert (got - want).abs().max().item() <= 1e-10


def test_float32_close_to_float64():
    q, k, v, mq, mk = _inputs(29, seed=5)
    got = bsbr_attention(*(t.float() for t in (q, k, v, mq, mk)), 4)
    want = bsbr_attention(q, k, v, mq, mk, 4)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 1e-5


def test_changing_a_later_position_leaves_earlier_outputs_alone():
    c, length = 4, 19
    inputs = _inputs(length, seed=3)
    base = bsbr_attention(*inputs, c)
    for t in (0, 3, 4, 7, 8, 18):  # chunk starts, ends and the middle
        changed = [x.clone() for x in inputs]
        for x in changed:
            x[:, :, t] += 1.0
        out = bsbr_attention(*changed, c)
        assert torch.equal(out[:, :, :t], base[:, :, :t])
        assert not torch.equal(out[:, :, t:], base[:, :, t:])


class _Sizes(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for r in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(r, torch.Tensor):
                self.shapes.append(tuple(r.shape))
        return result


def test_never_builds_length_squared_tensor():
    c, e = 8, 4
    length = 4 * c + 3
    inputs = _inputs(length, e=e, batch=1, heads=1)
    with _Sizes() as sizes:
        bsbr_attention(*inputs, c)
    assert sizes.shapes, "the dispatch mode saw no ops"
    biggest = max(math.prod(s) for s in sizes.shapes)
    assert biggest < length * length, f"a tensor of {biggest} elements >= L^2 = {length**2}"
    # Per chunk, e x e states and (unless SDPA's fused kernel keeps them internal) c x c
    # blocks are the largest things built.
    assert (1, 1, 5, e * e) in sizes.shapes
    assert biggest <= max(5 * c * c, 5 * c * e)
