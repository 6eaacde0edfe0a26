"""The one cases policy: lengths where chunked code breaks, stream splits that never
line up with chunks, and an artifact's own limits."""

import pytest

from bsbr_export.compare.cases import (
    Case,
    artifact_cases,
    default_cases,
    default_lengths,
    edge_lengths,
    self_check_length,
    stream_pieces,
)


@pytest.mark.parametrize("c", [1, 4, 64])
def test_lengths_cover_the_chunk_edges(c):
    assert {1, max(c - 1, 1), c, c + 1, 3 * c + 5} == set(edge_lengths(c))
    assert default_lengths(c, 2048) == sorted({*edge_lengths(c), 2048})
    assert self_check_length(c) % c != 0 or c == 1


@pytest.mark.parametrize("length,c", [(1, 4), (37, 4), (300, 64)])
def test_stream_pieces_sum_to_the_length_and_straddle_chunks(length, c):
    pieces = stream_pieces(length, c)
    assert sum(pieces) == length and all(p >= 1 for p in pieces)
    assert pieces[0] == 1  # the first piece leaves a chunk half full


def test_full_graphs_get_a_masked_case_and_streaming_graphs_splits():
    full = default_cases(4, streaming=False, long_length=30)
    assert full[-1] == Case(3, 30, masked=True) and not any(k.pieces for k in full)
    streamed = default_cases(4, streaming=True, long_length=30)
    assert all(sum(k.pieces) == k.length for k in streamed) and not any(k.masked for k in streamed)


def test_an_artifact_is_checked_within_its_limits():
    assert artifact_cases(4, False, {"static_shape": [2, 10]}) == [Case(2, 10)]
    limited = artifact_cases(4, False, {"max_length": 20, "max_batch": 2}, long_length=50)
    assert max(k.length for k in limited) == 20 and max(k.batch for k in limited) == 2
    # Shapes asked for are kept past the limits: the artifact must refuse them itself.
    asked = artifact_cases(4, False, {"max_length": 20}, lengths=[50], batches=(1,))
    assert Case(1, 50) in asked
