"""Which inputs an artifact is checked on: the one policy of lengths, batches, padding
and stream splits, for export's self-check and for validate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from bsbr_export.model.probe import example_inputs
from bsbr_export.model.spec import ModelSpec, row_inputs

DEFAULT_BATCHES = (1, 2, 3)
DEFAULT_LONG_LENGTH = 2048  # the long case of validation and of export's checks


@dataclass(frozen=True)
class Case:
    """One input shape to check: right-padded with a mask when `masked`, streamed in
    `pieces` for streaming graphs; for a row step, one token per row at `rows` positions."""

    batch: int
    length: int
    masked: bool = False
    pieces: tuple[int, ...] = ()
    rows: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        if self.rows:
            return f"{self.batch} rows at positions {', '.join(map(str, self.rows))}"
        text = f"batch {self.batch} x length {self.length}"
        if self.masked:
            text += " (right-padded, masked)"
        if self.pieces:
            text += f" streamed {'+'.join(map(str, self.pieces))}"
        return text


def edge_lengths(chunk_size: int) -> list[int]:
    """Where chunked code breaks: 1, c-1, c, c+1 and 3c+5 (k*c + r)."""
    c = chunk_size
    return sorted({1, max(c - 1, 1), c, c + 1, 3 * c + 5})


def default_lengths(chunk_size: int, long_length: int = DEFAULT_LONG_LENGTH) -> list[int]:
    """The edge lengths and a long one."""
    return sorted({*edge_lengths(chunk_size), long_length})


def self_check_length(chunk_size: int) -> int:
    """The long length an artifact is checked at before it is written (4c+3: a few
    chunks and a ragged tail, never the example's 2c + c/2, and quick to run)."""
    return 4 * chunk_size + 3


def stream_pieces(length: int, chunk_size: int) -> list[int]:
    """Split `length` into pieces that never line up with chunk boundaries: 1, c+2, c-1
    (the splits that catch state bugs), then k*c + 1 tokens across many chunks at once
    (about an eighth of `length`), and again. A rollout costs one call per piece: the long
    piece keeps a 2048-token check of a small-chunk model to tens of calls, not hundreds."""
    c = chunk_size
    sizes, out = (1, c + 2, max(c - 1, 1), c * max(1, length // (8 * c)) + 1), []
    while length > 0:
        out.append(min(sizes[len(out) % len(sizes)], length))
        length -= out[-1]
    return out


def row_positions(chunk_size: int, long_length: int) -> list[int]:
    """Positions of a row step's checks, a mix of contexts from 0 to past 16384: fills 0,
    1 and c - 2 of a chunk, 0, 1, 3 and many finished chunks, never a chunk's last token."""
    c = chunk_size
    wanted = [0, 1, max(c - 2, 0), c, c + 1, 3 * c + 5, long_length, 16384 + 3]
    return list(dict.fromkeys(p - 1 if p % c == c - 1 else p for p in wanted))


def default_cases(
    chunk_size: int,
    kind: str = "full",
    long_length: int = DEFAULT_LONG_LENGTH,
    lengths: list[int] | None = None,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
) -> list[Case]:
    """Every length x batch, plus a right-padded masked batch (full graphs) or uneven
    stream splits (streaming graphs); for a row step, each batch of rows at a mix of
    positions, and all of the mix in one batch."""
    if kind == "rows":
        mix = row_positions(chunk_size, max(lengths or [long_length]))
        picks = [tuple(mix[(i * 3 + b) % len(mix)] for i in range(b)) for b in batches]
        return [Case(len(rows), max(rows) + 1, rows=rows) for rows in [*picks, tuple(mix)]]
    lengths = lengths or default_lengths(chunk_size, long_length)
    cases = [Case(batch, length) for length in lengths for batch in batches]
    if kind != "full":
        return [dataclasses.replace(k, pieces=tuple(stream_pieces(k.length, chunk_size))) for k in cases]
    return [*cases, Case(max(batches), max(lengths), masked=True)]


def artifact_cases(
    chunk_size: int,
    kind: str,
    settings: dict,
    *,
    lengths: list[int] | None = None,
    batches: tuple[int, ...] | None = None,
    long_length: int = DEFAULT_LONG_LENGTH,
) -> list[Case]:
    """The cases of one artifact, from the settings its manifest entry records: its
    static shape alone, or the default cases (`lengths` and `batches` when asked for),
    clamped to its largest batch and length where it has them. Shapes asked for past
    those limits are kept, so the artifact refuses them in a failing case."""
    static = settings.get("static_shape")
    if static:
        cases = [Case(*static)]
    else:
        cases = default_cases(chunk_size, kind, long_length, lengths, batches or DEFAULT_BATCHES)
    return fit_cases(
        cases,
        chunk_size,
        settings.get("max_batch") if batches is None else None,
        settings.get("max_length") if lengths is None else None,
    )


def fit_cases(cases: list[Case], chunk_size: int, max_batch: int | None, max_length: int | None) -> list[Case]:
    """Cases clamped to an artifact's largest batch and length (an ExecuTorch program
    has its memory planned up to them), duplicates dropped: the limit itself is checked
    instead of shapes the artifact refuses by design."""
    fitted = []
    for case in cases:
        if case.rows:  # one token per row: no length to clamp
            fitted.append(case)
            continue
        batch, length = min(case.batch, max_batch or case.batch), min(case.length, max_length or case.length)
        pieces = tuple(stream_pieces(length, chunk_size)) if case.pieces else ()
        fitted.append(dataclasses.replace(case, batch=batch, length=length, pieces=pieces))
    return list(dict.fromkeys(fitted))


def make_inputs(case: Case, spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Fresh random inputs for one case, drawn as the spec says (token ids below their
    vocabulary, floats, and a right-padding mask that pads only `masked` cases; a row
    step's tokens, positions and caches)."""
    if case.rows:
        return row_inputs(spec, list(case.rows), seed)
    inputs = example_inputs(spec, case.batch, case.length, seed=seed, masked=case.masked)
    return {name: tensor.numpy() for name, tensor in inputs.items()}
