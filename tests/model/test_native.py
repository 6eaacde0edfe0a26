"""The model keeps DESIGN.md's four properties: causal, any length, linear memory, streaming."""

from __future__ import annotations

import pytest
import torch
from conftest import EDGE_LENGTHS, random_ids, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention import _Sizes
from test_nn import cache_rows

from bsbr_export import UserError, build_model
from bsbr_export.model.native import position_frequencies, sinusoidal_positions


def test_output_shapes(tiny_model):
    ids = random_ids(tiny_model.config, 3, 11)
    assert tiny_model(ids).shape == (3, 11, tiny_model.config.vocab_size)
    encoder = build_model(tiny_config(lm_head=False)).double()
    assert encoder(ids).shape == (3, 11, encoder.config.hidden_size)


@pytest.mark.parametrize("t", [0, 1, 3, 4, 5, 8, 12, 17])
def test_causal(tiny_model, t):
    ids = random_ids(tiny_model.config, 2, 18, seed=t)
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % tiny_model.config.vocab_size
    base, out = tiny_model(ids), tiny_model(changed)
    assert torch.equal(out[:, :t], base[:, :t])
    assert not torch.allclose(out[:, t], base[:, t])


def test_length_one(tiny_model):
    ids = random_ids(tiny_model.config, 2, 1)
    out = tiny_model(ids)
    assert out.shape[1] == 1 and torch.isfinite(out).all()
    # position 0 sees only itself, so it equals the first position of any longer run
    longer = torch.cat([ids, random_ids(tiny_model.config, 2, 9, seed=1)], dim=1)
    assert (tiny_model(longer)[:, :1] - out).abs().max() < 1e-12


def test_right_padded_batch_matches_each_sequence_alone(tiny_model):
    cfg = tiny_model.config
    lengths = [1, 3, 4, 9, 14]
    seqs = [random_ids(cfg, 1, n, seed=n)[0] for n in lengths]
    ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
        ids[i, len(s) :] = (7 * i + 3) % cfg.vocab_size  # junk in the padding
    batched = tiny_model(ids, attention_mask=mask)
    for i, s in enumerate(seqs):
        alone = tiny_model(s[None])
        assert (batched[i, : len(s)] - alone[0]).abs().max() < 1e-12


def test_pad_ids_never_matter(tiny_model):
    # Even at padded positions: the mask zeroes their inputs before any block.
    cfg = tiny_model.config
    ids = random_ids(cfg, 2, 11, seed=3)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    other = ids.clone()
    other[0, 6:] = (other[0, 6:] + 5) % cfg.vocab_size
    assert torch.equal(tiny_model(ids, mask), tiny_model(other, mask))


def test_mask_must_be_right_padding(tiny_model):
    ids = random_ids(tiny_model.config, 2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: positions would be off by two
    with pytest.raises(UserError, match="right padding"):
        tiny_model(ids, mask)


def test_long_input_has_no_maximum_length():
    model = build_model(tiny_config()).eval()
    ids = random_ids(model.config, 1, 6001)
    assert torch.isfinite(model(ids)).all()


def test_no_length_squared_tensor_in_model():
    # LM head off: logits [L, vocab] are a legitimate L x vocab output, not attention.
    model = build_model(tiny_config(chunk_size=8, lm_head=False))
    length = 4 * 8 + 3
    with _Sizes() as sizes:
        model(random_ids(model.config, 1, length))
    square = [s for s in sizes.shapes if sum(d >= length for d in s) >= 2]
    assert not square, f"tensors with two dims >= L: {square}"


def test_positions_are_sinusoids():
    freqs = position_frequencies(6)
    pe = sinusoidal_positions(torch.arange(5), freqs, 6)
    positions = torch.arange(5.0, dtype=torch.float64)
    assert torch.allclose(pe[:, 0], torch.sin(positions))
    assert torch.allclose(pe[:, 1], torch.cos(positions))
    assert torch.allclose(pe[:, 2], torch.sin(positions * 10000 ** (-2 / 6)))
    assert sinusoidal_positions(torch.arange(3), position_frequencies(7), 7).shape == (3, 7)


def test_forward_from_a_later_start_moves_only_the_positions(tiny_model):
    """Training at random starts (tools/train.py) runs `forward` with shifted positions."""
    ids = random_ids(tiny_model.config, 2, 11)
    c = tiny_model.config.chunk_size
    assert torch.equal(tiny_model.forward_from(ids, 0), tiny_model(ids))
    later = tiny_model.forward_from(ids, 3 * c)
    assert later.shape == (2, 11, tiny_model.config.vocab_size)
    assert not torch.allclose(later, tiny_model(ids))
    # Causal still: a later token never changes an earlier output.
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % tiny_model.config.vocab_size
    assert torch.allclose(tiny_model.forward_from(changed, 3 * c)[:, :-1], later[:, :-1])


def _stream(model, ids, pieces):
    state, outputs, at = model.init_state(ids.shape[0]), [], 0
    for size in pieces:
        out, state = model.stream(ids[:, at : at + size], state)
        outputs.append(out)
        at += size
    return torch.cat(outputs, dim=1), state


@st.composite
def splits(draw):
    length = draw(st.integers(1, 30))
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=8))) if length > 1 else []
    bounds = [0, *cuts, length]
    return length, [b - a for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("compression, retrieval", [(None, "sum"), (5, "sum"), (5, "gated")])
@settings(max_examples=25, deadline=None)
@given(split=splits(), seed=st.integers(0, 2**16))
def test_streaming_equals_parallel(compression, retrieval, split, seed):
    model = build_model(tiny_config(compression=compression, retrieval=retrieval), seed=2).double()
    length, pieces = split
    ids = random_ids(model.config, 2, length, seed=seed)
    streamed, state = _stream(model, ids, pieces)
    assert (streamed - model(ids)).abs().max() < 1e-10
    c = model.config.chunk_size
    assert state[0].meta_keys.shape[2] == length // c
    assert state[0].keys.shape[2] == length % c


def test_stream_one_token_at_a_time_float32():
    model = build_model(tiny_config(), seed=3)
    ids = random_ids(model.config, 3, 21)
    streamed, _ = _stream(model, ids, [1] * 21)
    assert (streamed - model(ids)).abs().max() < 1e-5


def test_state_grows_by_one_state_per_chunk(tiny_model):
    cfg = tiny_model.config
    _, state = _stream(tiny_model, random_ids(cfg, 1, 3 * cfg.chunk_size + 1), [5, 8])
    layer = state[0]
    assert layer.chunk_states.shape == (1, cfg.num_heads, 3, cfg.state_size)
    assert layer.retrieved.shape == (1, cfg.num_heads, cfg.head_dim, cfg.head_dim)
    assert layer.keys.shape[2] == 1


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[0, 61]]), "must be in [0, 61)"),
        (torch.tensor([[-1, 2]]), "must be in [0, 61)"),
        (torch.tensor([[0.0, 1.0]]), "must be int64"),
        (torch.tensor([1, 2]), "shape [batch, length >= 1]"),
        (torch.zeros(2, 0, dtype=torch.long), "shape [batch, length >= 1]"),
    ],
)
def test_bad_input_ids(ids, message):
    model = build_model(tiny_config())
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        model(ids)
    with pytest.raises(UserError):
        model.stream(ids, model.init_state(1))


@pytest.mark.parametrize("compression", [None, 5], ids=["plain", "compressed"])
def test_torch_export_is_clean_at_every_length(compression):
    # Plain torch.export with Dim("batch"), Dim("sequence") (DESIGN: "a model is clean
    # when..."): no constraint violation, no runtime assert, both ranges open from 0 up,
    # and the program agrees with eager at lengths and batches it never saw, one chunk
    # and less included.
    from torch.export import Dim
    from torch.utils._sympy.numbers import int_oo

    model = build_model(tiny_config(compression=compression), seed=1).eval()
    c = model.config.chunk_size
    ids = random_ids(model.config, 2, 2 * c + 3)
    dims = {0: Dim("batch"), 1: Dim("sequence")}
    with torch.no_grad():
        program = torch.export.export(model, (ids, torch.ones_like(ids)), dynamic_shapes=(dims, dims))
    ranges = list(program.range_constraints.values())
    assert len(ranges) == 2 and all(r.lower == 0 and r.upper == int_oo for r in ranges), ranges
    checks = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default}
    assert not [node for node in program.graph.nodes if node.target in checks]
    exported = program.module()
    for name, length in EDGE_LENGTHS.items():
        for batch in (1, 3):
            x = random_ids(model.config, batch, length(c), seed=length(c) + batch)
            mask = torch.ones_like(x)
            with torch.no_grad():
                diff = (exported(x, mask) - model(x, mask)).abs().max().item()
            assert diff < 1e-5, (name, batch, diff)


@pytest.mark.parametrize(
    "make_mask, message",
    [
        (lambda ids: torch.full(ids.shape, 2), "only 0 and 1"),
        (lambda ids: torch.ones(ids.shape), "must be int64, int32 or bool"),
        (lambda ids: torch.zeros_like(ids), "right padding|row of only 0s"),
        (lambda ids: torch.ones_like(ids).tolist(), "must be a torch.Tensor"),
        (lambda ids: torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long), "shape"),
    ],
    ids=["mask of 2", "float mask", "all zeros", "mask as a list", "wrong shape"],
)
def test_bad_masks_are_user_errors_naming_the_mask(tiny_model, make_mask, message):
    ids = random_ids(tiny_model.config, 2, 6)
    with pytest.raises(UserError, match=message) as raised:
        tiny_model(ids, make_mask(ids))
    assert "attention_mask" in str(raised.value)


def test_bool_and_int32_masks_give_the_int64_result(tiny_model):
    ids = random_ids(tiny_model.config, 2, 9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    want = tiny_model(ids, mask)
    assert torch.equal(tiny_model(ids, mask.bool()), want) and torch.equal(tiny_model(ids, mask.int()), want)


@pytest.mark.parametrize("batch_size", [-1, 0, 1.5, None, True])
def test_init_state_needs_a_positive_batch_size(tiny_model, batch_size):
    with pytest.raises(UserError, match="batch_size must be an integer >= 1"):
        tiny_model.init_state(batch_size)


@pytest.mark.parametrize(
    "make_state, message",
    [
        (lambda model: None, "state must be the list of LayerState"),
        (lambda model: model.init_state(3), "state is for batch size 3, input_ids has 2 rows"),
        (lambda model: model.init_state(2)[:1], "state has 1 layers, the model has 2"),
        (lambda model: [tuple(layer) for layer in model.init_state(2)], "state must be the list of LayerState"),
    ],
    ids=["None", "another batch size", "too few layers", "plain tuples"],
)
def test_bad_states_are_user_errors_naming_the_state(tiny_model, make_state, message):
    ids = random_ids(tiny_model.config, 2, 5)
    with pytest.raises(UserError, match=message):
        tiny_model.stream(ids, make_state(tiny_model))


@pytest.mark.parametrize("retrieval", ["sum", "gated"])
def test_rows_in_flight_equal_each_sequence_alone(retrieval):
    """In-flight batching as a server runs it: every step advances each active sequence by
    one token, the ones whose token closes a chunk alone through `stream_update` (that
    needs their finished chunks), all others in one `step_rows` call over their fixed-size
    caches; sequences join between steps (their prompt prefilled in one call, one of
    16390 tokens) and leave. Each logit equals the full forward of its own sequence."""
    model = build_model(tiny_config(chunk_size=8, num_heads=4, hidden_size=32, retrieval=retrieval), seed=3).double()
    c, vocab = 8, model.config.vocab_size
    # sequence -> (step it joins at, prompt length, tokens it generates)
    plan = {0: (0, 5, 40), 1: (0, 16390, 30), 2: (3, 1, 25), 3: (7, 8, 20), 4: (7, 23, 33), 5: (20, 7, 9)}
    ids = {
        s: torch.randint(0, vocab, (1, p + n), generator=torch.Generator().manual_seed(s))
        for s, (_, p, n) in plan.items()
    }
    rows, logits = {}, {s: [] for s in plan}  # active sequence -> [position, state]; its logits
    with torch.no_grad():
        for step in range(60):
            for s, (start, prompt, _) in plan.items():
                if start == step:
                    out, updates = model.stream_update(ids[s][:, :prompt], model.init_state(1))
                    rows[s] = [prompt, [st.advance(u) for st, u in zip(model.init_state(1), updates)]]
                    logits[s].append(out[0, -1])
            for s in [s for s, (pos, _) in rows.items() if pos == ids[s].shape[1] - 1]:
                del rows[s]  # done: it leaves, the others go on
            closing = [s for s, (pos, _) in rows.items() if pos % c == c - 1]
            for s in closing:
                pos, state = rows[s]
                out, updates = model.stream_update(ids[s][:, pos : pos + 1], state)
                rows[s] = [pos + 1, [st.advance(u) for st, u in zip(state, updates)]]
                logits[s].append(out[0, -1])
            batch = [s for s in rows if s not in closing]
            if not batch:
                continue
            cache = [cache_rows([rows[s][1][layer] for s in batch], c) for layer in range(model.config.num_layers)]
            positions = torch.tensor([rows[s][0] for s in batch])
            tokens = torch.cat([ids[s][:, pos : pos + 1] for s, (pos, _) in ((s, rows[s]) for s in batch)])
            out, new = model.step_rows(tokens, positions, cache)
            for row, s in enumerate(batch):
                pos, state = rows[s]
                state = [
                    st._replace(
                        keys=torch.cat([st.keys, k[row : row + 1]], -2),
                        values=torch.cat([st.values, v[row : row + 1]], -2),
                    )
                    for st, (k, v) in zip(state, new)
                ]
                rows[s] = [pos + 1, state]
                logits[s].append(out[row, -1])
        assert not rows  # every sequence ran to its end
        for s, (_, prompt, n) in plan.items():
            full = model(ids[s])[0, prompt - 1 : -1]
            assert len(logits[s]) == n
            assert (torch.stack(logits[s]) - full).abs().max() <= 1e-10, s
