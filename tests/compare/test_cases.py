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
    assert len(pieces) <= 4 * 9  # a long rollout stays a few dozen calls


def test_a_long_stream_mixes_small_uneven_pieces_with_long_ones():
    pieces = stream_pieces(2048, 8)
    assert pieces[:4] == [1, 10, 7, 8 * 32 + 1] and len(pieces) < 40
    assert all(p % 8 for p in pieces if p > 1)  # no piece spans whole chunks exactly


def test_full_graphs_get_a_masked_case_and_streaming_graphs_splits():
    full = default_cases(4, "full", long_length=30)
    assert full[-1] == Case(3, 30, masked=True) and not any(k.pieces for k in full)
    streamed = default_cases(4, "decode", long_length=30)
    assert all(sum(k.pieces) == k.length for k in streamed) and not any(k.masked for k in streamed)


def test_an_artifact_is_checked_within_its_limits():
    assert artifact_cases(4, "full", {"static_shape": [2, 10]}) == [Case(2, 10)]
    limited = artifact_cases(4, "full", {"max_length": 20, "max_batch": 2}, long_length=50)
    assert max(k.length for k in limited) == 20 and max(k.batch for k in limited) == 2
    # Shapes asked for are kept past the limits: the artifact must refuse them itself.
    asked = artifact_cases(4, "full", {"max_length": 20}, lengths=[50], batches=(1,))
    assert Case(1, 50) in asked


@pytest.mark.parametrize("c", [2, 4, 64])
def test_row_cases_mix_contexts_and_never_close_a_chunk(c):
    cases = default_cases(c, "rows", long_length=2048)
    positions = {p for k in cases for p in k.rows}
    assert all(k.batch == len(k.rows) for k in cases) and [k.batch for k in cases[:3]] == [1, 2, 3]
    assert all(p % c != c - 1 for p in positions)  # a chunk's last token goes through the decode step
    assert {0, c} <= positions and max(positions) > 16384  # fills and contexts from 0 to past 16384
    assert c == 2 or 1 in positions  # (with c = 2, position 1 closes its chunk)
    assert len(set(cases[-1].rows)) == len(cases[-1].rows) > 3  # one batch holds the whole mix
