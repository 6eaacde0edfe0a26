"""A streaming graph's state between calls, as numpy arrays: how it starts and how a
step's outputs advance it. One rule for every caller (generation, parity checks, bench)."""

from __future__ import annotations

import ctypes
import math

import numpy as np

from bsbr_export.defaults import MAX_RESERVED_TOKENS
from bsbr_export.model.spec import present_name


def empty_state_tensor(shape: list, batch: int) -> np.ndarray:
    """One tensor of the initial (empty) state: its named dims are 0 except `batch`."""
    dims = [batch if d == "batch" else (d if isinstance(d, int) else 0) for d in shape]
    return np.zeros(dims, dtype=np.float32)


def reserved_chunks(tokens: int, chunk_size: int) -> int:
    """The finished chunks a sequence expected to reach `tokens` tokens gets room for when it
    opens: those of at most `MAX_RESERVED_TOKENS` tokens."""
    return min(tokens, MAX_RESERVED_TOKENS) // chunk_size


def appended_rows(name: str, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """A decode step's `new.*` rows for the `past.*` entry `name` (None: the step returns
    that entry whole, as `present.*`)."""
    return outputs.get(name.replace("past.", "new.", 1))


def advance_state(state: dict[str, np.ndarray], outputs: dict[str, np.ndarray], axis: int = 2) -> dict[str, np.ndarray]:
    """The `past.*` feeds for the next step: `present.*` outputs replace their entry; a
    decode graph's `new.*` rows (chunks it finished) are appended along `axis`, and only
    when there are any, so a step that finishes no chunk copies nothing. (A sequence that
    lives long holds its state in a `StreamState`, which appends in place.)"""
    advanced = {}
    for name, value in state.items():
        appended = appended_rows(name, outputs)
        if appended is None:
            advanced[name] = outputs[present_name(name)]
        else:
            advanced[name] = np.concatenate([value, appended], axis=axis) if appended.shape[axis] else value
    return advanced


class FinishedChunks:
    """One state entry that grows by the chunks each step finishes (rows along `axis`),
    held in a buffer with room to spare. Appending moves what is there to its new place in
    that buffer (each block before `axis` shifts up by the rows added to the blocks before
    it, last block first), not into a new array: at 16k tokens of bsbr-stdlib a
    concatenate of the 65 MB took 11-12 ms, the shift about 4 ms. Room for `reserve` rows
    is taken at once (the rows a sequence will reach, when known): memory is only faulted
    in as rows fill it, and a first touch is the dearest part on some machines (64 MB: 156
    ms, against 3 ms written again, on a 2-core VM), so a buffer that grows by copying
    touches its bytes again at every growth. `value` is a contiguous view, valid until the
    next `append`."""

    GROWTH = 1.5  # the buffer's growth when full: amortized copies, at most 1.5x the bytes held

    def __init__(self, value: np.ndarray, axis: int, reserve: int = 0) -> None:
        self.axis = axis
        self.shape = list(value.shape)
        room = list(value.shape)
        room[axis] = max(room[axis], reserve)
        self.buffer = np.empty(math.prod(room), value.dtype)
        self.buffer[: value.size] = value.reshape(-1)

    @property
    def value(self) -> np.ndarray:
        return self.buffer[: math.prod(self.shape)].reshape(self.shape)

    def append(self, rows: np.ndarray) -> None:
        """Add `rows` (the same shape but along `axis`) after the rows held."""
        added = rows.shape[self.axis]
        if not added:
            return
        blocks = math.prod(self.shape[: self.axis])
        inner = math.prod(self.shape[self.axis + 1 :])
        held = self.shape[self.axis]
        grown = held + added
        size = blocks * grown * inner
        if size > self.buffer.size:
            old = self.value.reshape(blocks, held, inner)
            self.buffer = np.empty(max(size, int(self.buffer.size * self.GROWTH)), self.buffer.dtype)
            self.buffer[:size].reshape(blocks, grown, inner)[:, :held] = old
        else:
            # Blocks overlap their new places: memmove (C's, which allows that) moves each
            # in one pass, where numpy would copy an overlapping source to a temporary first.
            item, base = self.buffer.itemsize, self.buffer.ctypes.data
            for block in range(blocks - 1, 0, -1):
                ctypes.memmove(
                    base + block * grown * inner * item, base + block * held * inner * item, held * inner * item
                )
        self.buffer[:size].reshape(blocks, grown, inner)[:, held:] = rows.reshape(blocks, added, inner)
        self.shape[self.axis] = grown


class StreamState:
    """One sequence's `past.*` state, advanced in place by each step's outputs (the rule of
    `advance_state`): the entries a decode step appends to are `FinishedChunks` (with room
    for `reserve` rows: the chunks the sequence will finish, when known), the others
    replaced by the step's `present.*` outputs."""

    def __init__(self, past: dict[str, np.ndarray], axis: int, reserve: int = 0) -> None:
        self.entries: dict[str, np.ndarray | FinishedChunks] = dict(past)
        self.axis = axis
        self.reserve = reserve

    @property
    def past(self) -> dict[str, np.ndarray]:
        """The feeds of the next step (views: valid until the state advances)."""
        return {n: e.value if isinstance(e, FinishedChunks) else e for n, e in self.entries.items()}

    def advance(self, outputs: dict[str, np.ndarray]) -> None:
        """Take one step's outputs (of a batch-1 call, or one row of a batched one's)."""
        for name, entry in self.entries.items():
            appended = appended_rows(name, outputs)
            if appended is None:
                self.entries[name] = outputs[present_name(name)]
            elif appended.shape[self.axis]:
                if not isinstance(entry, FinishedChunks):
                    entry = self.entries[name] = FinishedChunks(entry, self.axis, self.reserve)
                entry.append(appended)
