"""runtime/state.py: a streaming state advanced in place (finished chunks appended in a
buffer with room to grow) equals the state `advance_state` builds by concatenating."""

from __future__ import annotations

import numpy as np
import pytest

from bsbr_export.defaults import MAX_RESERVED_TOKENS
from bsbr_export.runtime.state import FinishedChunks, StreamState, advance_state, reserved_chunks


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_finished_chunks_equal_concatenation_through_growth_and_shifts(axis):
    """Appends of 0-3 rows, each block shifted in place or the buffer grown, hold exactly
    what concatenating every append gives, as a contiguous array."""
    rng = np.random.default_rng(axis)
    shape = [2, 3, 4, 5]
    shape[axis] = 0
    expected = np.zeros(shape, np.float32)
    chunks = FinishedChunks(expected, axis)
    grown, shifted = 0, 0
    for added in [1, 0, 2, 1, 1, 3, 1, 1, 1, 2, 1, 1, 1, 1]:
        shape[axis] = added
        rows = rng.standard_normal(shape).astype(np.float32)
        before = chunks.buffer
        chunks.append(rows)
        expected = np.concatenate([expected, rows], axis=axis)
        grown += chunks.buffer is not before
        shifted += added > 0 and chunks.buffer is before
        assert np.array_equal(chunks.value, expected)
        assert chunks.value.flags.c_contiguous and chunks.value.base is not None  # a view, no copy
    assert grown >= 2 and shifted >= 5  # both paths taken
    assert chunks.buffer.nbytes >= expected.nbytes


def test_stream_state_advances_as_advance_state():
    """Steps that finish no chunk, one, or two give the feeds `advance_state` gives; the
    `present.*` entries are replaced."""
    rng = np.random.default_rng(0)
    past = {"past.0.chunk_states": np.zeros([1, 2, 0, 3], np.float32), "past.0.keys": np.zeros([1, 2, 1, 3])}
    state, expected = StreamState(past, axis=2), dict(past)
    for finished in [0, 1, 0, 2, 1, 1]:
        outputs = {
            "new.0.chunk_states": rng.standard_normal([1, 2, finished, 3]).astype(np.float32),
            "present.0.keys": rng.standard_normal([1, 2, 1 + finished, 3]),
        }
        state.advance(outputs)
        expected = advance_state(expected, outputs, axis=2)
        assert state.past.keys() == expected.keys()
        for name, value in expected.items():
            assert np.array_equal(state.past[name], value), name
    assert state.past["past.0.chunk_states"].shape == (1, 2, 5, 3)


def test_reserved_room_takes_every_append_without_a_new_buffer():
    """Room reserved for the rows a sequence will reach: appends up to it shift in place
    (one buffer all along), past it the buffer grows, and the rows are right throughout."""
    rng = np.random.default_rng(1)
    state = StreamState({"past.0.chunk_states": np.zeros([1, 4, 0, 6], np.float32)}, axis=2, reserve=10)
    expected, buffers = np.zeros([1, 4, 0, 6], np.float32), set()
    for added in [3, 1, 1, 4, 1, 2]:  # 10 rows, then 12
        rows = rng.standard_normal([1, 4, added, 6]).astype(np.float32)
        state.advance({"new.0.chunk_states": rows})
        expected = np.concatenate([expected, rows], axis=2)
        chunks = state.entries["past.0.chunk_states"]
        buffers.add(id(chunks.buffer))
        assert np.array_equal(state.past["past.0.chunk_states"], expected)
        if expected.shape[2] <= 10:
            assert len(buffers) == 1 and chunks.buffer.nbytes == 4 * 10 * 6 * 4
    assert len(buffers) == 2


def test_a_generation_asked_for_forever_reserves_no_more_than_the_cap():
    """Room up front is for the tokens a sequence will reach, up to MAX_RESERVED_TOKENS."""
    assert reserved_chunks(100, 8) == 12
    assert reserved_chunks(10**12, 64) == MAX_RESERVED_TOKENS // 64
