"""In-flight batching: many generations advanced together, one row step per iteration.

    from bsbr_export.runtime.batching import load_batcher

    batcher = load_batcher("export/bsbr-stdlib")  # model.rows.onnx + model.decode.onnx
    for generation in batcher.generate_many(["def main(", "import ", "class Parser:"], max_new_tokens=60):
        print(generation.text)

Each iteration advances every active sequence by one token with one call of the export's
row step (`model.rows.onnx`: each row at its own position, reading only its current chunk
and `S_i`, so the call costs the same at any context). A row whose token closes its chunk
needs its finished chunks for the next `S_i`: its token goes through the decode step alone,
once per `c` tokens. A new sequence joins at the next iteration (its prompt prefilled in
one decode call), a finished one leaves at once; the rows' caches sit in one pool whose
first `rows` slots are the active sequences, so the row step reads them without a copy.
Every sequence generates what `runtime.generate` generates for it alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bsbr_export.errors import UserError
from bsbr_export.model.spec import ROW_POSITIONS
from bsbr_export.runtime.generate import DEFAULT_ENGINE, DecodeState, Generation, Generator, Request, Token
from bsbr_export.runtime.onnx import OnnxRunner
from bsbr_export.runtime.state import advance_state

ROWS_GRAPH = "model.rows.onnx"


@dataclass
class Running:
    """One generation in the batch: its request, the token it feeds next and at which
    position, and its finished chunks (the `past.*` entries a decode step appends)."""

    request: Request
    position: int
    next_token: int = 0
    chunks: dict[str, np.ndarray] = field(default_factory=dict)


class Batcher:
    """An export's row step and decode step, and the sequences being generated."""

    def __init__(self, export_dir: str | Path, threads: int | None = None, capacity: int = 8) -> None:
        self.generator = Generator(export_dir, DEFAULT_ENGINE, threads)  # checks every file's sha256
        if self.generator.kind != "decode" or not (Path(export_dir) / ROWS_GRAPH).is_file():
            raise UserError(f"{export_dir} has no {ROWS_GRAPH} and model.decode.onnx: export a model with step_rows "
                            "(the native presets) with --format onnx --streaming")
        spec = self.generator.spec
        self.spec, self.chunk_size = spec, spec.chunk_size
        self.rows_runner = OnnxRunner(Path(export_dir) / ROWS_GRAPH, threads=threads)
        state = spec.state
        self.cache_shapes = state.cache_inputs(self.chunk_size)
        # cache.* name -> its past.* entry, and the axis of the current chunk's rows (if any)
        self.past = {name: name.replace("cache.", "past.", 1) for name in self.cache_shapes}
        self.token_axis = {name: state.inputs[past].index("past_tokens") for name, past in self.past.items()
                           if "past_tokens" in state.inputs[past]}
        self.pool = {name: np.zeros([capacity, *shape[1:]], np.float32) for name, shape in self.cache_shapes.items()}
        self.active: list[Running] = []

    def add(self, prompt: str | Sequence[int], max_new_tokens: int = 20, *, temperature: float = 0.0,
            top_k: int | None = None, top_p: float | None = None, seed: int = 0,
            stop: Sequence[str | int] = ()) -> Generation:
        """Start a generation (options as `Generator.generate`): its prompt is prefilled now
        and its first token picked; it goes on with every `step` until it stops. Returns its
        `Generation`, which fills as it goes."""
        request = self.generator.request(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                         seed=seed, stop=stop)
        ids = request.result.prompt
        state = DecodeState(self.spec)
        start = time.perf_counter()
        outputs = self.generator.runner.infer({self.spec.tokens.name: np.array([ids], np.int64), **state.past})
        seconds = time.perf_counter() - start
        state.update(outputs)
        token = request.take(outputs[self.generator.logits][0, -1], seconds)
        if not request.done:
            slot = self._slot()
            for name, past in self.past.items():
                self._write(name, slot, state.past[past][0])
            chunks = {n: v for n, v in state.past.items() if n in self.spec.state.appended}
            self.active.append(Running(request, len(ids), token.id, chunks))
        return request.result

    def step(self) -> list[tuple[Generation, Token]]:
        """Advance every active sequence by one token: one row-step call for all of them,
        a decode call for each whose token closes its chunk. Returns the tokens made."""
        rows = len(self.active)
        if not rows:
            return []
        start = time.perf_counter()
        positions = np.array([s.position for s in self.active], np.int64)
        feeds = {self.spec.tokens.name: np.array([[s.next_token] for s in self.active], np.int64),
                 ROW_POSITIONS: positions, **{name: pool[:rows] for name, pool in self.pool.items()}}
        outputs = self.rows_runner.infer(feeds)
        logits = outputs[self.generator.logits][:, 0]
        fills = positions % self.chunk_size
        closing = fills == self.chunk_size - 1
        open_rows = np.flatnonzero(~closing)
        for name, axis in self.token_axis.items():  # each row's new key / value into its slot of the chunk
            index = [slice(None)] * self.pool[name].ndim
            index[0], index[axis] = open_rows, fills[open_rows]
            self.pool[name][tuple(index)] = outputs[name.replace("cache.", "row.", 1)][open_rows].take(0, axis=axis)
        logits = logits.copy()
        for row in np.flatnonzero(closing):
            logits[row] = self._close_chunk(row)
        seconds = time.perf_counter() - start
        made, done = [], []
        for row, sequence in enumerate(self.active):
            token = sequence.request.take(logits[row], seconds)
            sequence.position, sequence.next_token = sequence.position + 1, token.id
            made.append((sequence.request.result, token))
            if sequence.request.done:
                done.append(row)
        for row in reversed(done):
            self._leave(row)
        return made

    def generate_many(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 20,
                      **options) -> list[Generation]:
        """Generate from every prompt at once (options as `add`; `seed` seeds the first, the
        next ones `seed + 1`...), until all are done."""
        seed = options.pop("seed", 0)
        results = [self.add(prompt, max_new_tokens, seed=seed + i, **options) for i, prompt in enumerate(prompts)]
        while self.active:
            self.step()
        return results

    def _close_chunk(self, row: int) -> np.ndarray:
        """Feed a row's token that closes its chunk through the decode step (it needs the
        row's finished chunks); append the finished chunk, reset the row's cache."""
        sequence, fill = self.active[row], self.chunk_size - 1
        past = dict(sequence.chunks)
        for name, pool in self.pool.items():
            entry = pool[row:row + 1]
            past[self.past[name]] = entry.take(range(fill), axis=self.token_axis[name]) \
                if name in self.token_axis else entry
        outputs = self.generator.runner.infer({self.spec.tokens.name: np.array([[sequence.next_token]], np.int64),
                                               **past})
        past = advance_state(past, outputs, self.spec.state.append_axis)
        sequence.chunks = {n: past[n] for n in sequence.chunks}
        for name, past_name in self.past.items():
            self._write(name, row, past[past_name][0])
        return outputs[self.generator.logits][0, -1]

    def _write(self, name: str, slot: int, value: np.ndarray) -> None:
        """A row's cache entry into its pool slot (the current chunk's rows first)."""
        if name in self.token_axis:
            axis = self.token_axis[name] - 1  # the pool slot holds one row: no batch axis
            index = [slice(None)] * value.ndim
            index[axis] = slice(0, value.shape[axis])
            self.pool[name][slot][tuple(index)] = value
        else:
            self.pool[name][slot] = value

    def _slot(self) -> int:
        """The pool slot of a joining sequence (the pool doubles when full)."""
        slot = len(self.active)
        for name, pool in self.pool.items():
            if slot == pool.shape[0]:
                self.pool[name] = np.concatenate([pool, np.zeros_like(pool)])
        return slot

    def _leave(self, row: int) -> None:
        """Drop a finished sequence: the last active one moves into its slot."""
        last = len(self.active) - 1
        if row != last:
            for pool in self.pool.values():
                pool[row] = pool[last]
        self.active[row] = self.active[last]
        self.active.pop()


def load_batcher(export_dir: str | Path, threads: int | None = None) -> Batcher:
    """A `Batcher` over `export_dir` (written by `bsbr-export export MODEL --format onnx
    --streaming` for a model with `step_rows`, e.g. the native presets)."""
    return Batcher(export_dir, threads)
