"""In-flight batching: many sequences advanced together, one row step per iteration.

    from bsbr_export.runtime.batching import load_batcher

    batcher = load_batcher("export/bsbr-stdlib")  # model.rows.onnx + model.decode.onnx
    for generation in batcher.generate_many(["def main(", "import ", "class Parser:"], max_new_tokens=60):
        print(generation.text)

Two layers. `Sequences` holds the state of many sequences, each under a key, and feeds
them tokens: every sequence fed one token that does not close its chunk goes into one call
of the export's row step (`model.rows.onnx`: each row at its own position, reading only
its current chunk and `S_i`, so the call costs the same at any context); a token that
closes its chunk needs the finished chunks for the next `S_i` and goes through the decode
step, once per `c` tokens (one batched call for the sequences that close a chunk at the
same position), as do prompt pieces (chunk-parallel, never token by token). The rows'
caches sit in one pool whose first slots are the open sequences (a closed one's slot takes
the last one's), so a step over all of them reads the pool without a copy. `Batcher`
schedules and samples on top: each `step` gives every generating sequence its next token
first, then spends what is left of a token budget on joining prompts, in pieces ending on
chunk boundaries, so a long prompt joining never stalls the running generations; a
finished generation leaves at once, and every one generates what `runtime.generate`
generates for it alone.

Numpy and onnxruntime only (no torch): Triton's Python-backend models run this module.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bsbr_export.defaults import DEFAULT_TOKEN_BUDGET, MAX_PROMPT_TOKENS, MAX_SEQUENCES, MAX_STATE_BYTES
from bsbr_export.errors import Busy, UserError
from bsbr_export.formats import FORMATS, artifact_name
from bsbr_export.manifest import read_manifest
from bsbr_export.model.spec import ROW_POSITIONS, ModelSpec, present_name
from bsbr_export.runtime.onnx import OnnxRunner
from bsbr_export.runtime.requests import DecodeState, Generation, Prompts, Request, Token, logits_output
from bsbr_export.runtime.state import StreamState, reserved_chunks


@dataclass
class Held:
    """One open sequence: its tokens so far, its pool slot, and its finished chunks (the
    `past.*` entries a decode step appends, which only a chunk-closing token reads,
    appended in place)."""

    position: int
    slot: int
    chunks: StreamState


class Sequences:
    """Open sequences of an export with a row step and a decode step, by key."""

    def __init__(
        self,
        export_dir: str | Path,
        threads: int | None = None,
        capacity: int = 8,
        graphs: str = "onnx",
        runner_options: dict | None = None,
        manifest: dict | None = None,
    ) -> None:
        """`graphs`: the format whose row and decode steps run ("web" for the web page's
        opset-18 ones); `runner_options`: how ONNX Runtime runs them (`OnnxRunner`'s
        provider, optimization level...; an engine's); `manifest`: the export's, when the
        caller has read and verified it already."""
        export_dir = Path(export_dir)
        manifest = manifest or read_manifest(export_dir)  # every file checked against its sha256
        listed = {a["name"] for a in manifest["artifacts"]}
        rows_graph, decode_graph = (artifact_name(FORMATS[graphs], kind) for kind in ("rows", "decode"))
        if manifest.get("state") is None:
            raise UserError(f"{export_dir} has no streaming graphs: export with --streaming to generate")
        if not {rows_graph, decode_graph} <= listed:
            raise UserError(
                f"{export_dir} has no {rows_graph} and {decode_graph}: export a model with step_rows "
                "(the native presets) with --format onnx --streaming"
            )
        self.export_dir, self.manifest = export_dir, manifest
        self.spec = spec = ModelSpec.from_dict(manifest["spec"])
        self.logits = logits_output(spec, export_dir)
        self.chunk_size = spec.chunk_size
        state = spec.state
        options = runner_options or {}
        self.decode_runner = OnnxRunner(
            export_dir / decode_graph,
            [spec.tokens.name, *state.inputs],
            spec.output_names + state.update_names(),
            threads=threads,
            **options,
        )
        self.rows_runner = OnnxRunner(export_dir / rows_graph, threads=threads, **options)
        self.cache_shapes = state.cache_inputs(self.chunk_size)
        # cache.* name -> its past.* entry, and the axis of the current chunk's rows (if any)
        self.past = {name: name.replace("cache.", "past.", 1) for name in self.cache_shapes}
        self.token_axis = {
            name: state.inputs[past].index("past_tokens")
            for name, past in self.past.items()
            if "past_tokens" in state.inputs[past]
        }
        self.pool = {name: np.zeros([capacity, *shape[1:]], np.float32) for name, shape in self.cache_shapes.items()}
        # A sequence's state in bytes: its pool slot, plus one row of each appended entry per finished chunk.
        self.slot_bytes = sum(pool[0].nbytes for pool in self.pool.values())
        self.chunk_bytes = sum(
            4
            * int(
                np.prod([d for i, d in enumerate(state.inputs[name]) if i != state.append_axis and isinstance(d, int)])
            )
            for name in state.appended
        )
        self.held: dict[Hashable, Held] = {}
        self.order: list[Hashable] = []  # slot -> key

    def __contains__(self, key: Hashable) -> bool:
        return key in self.held

    def __len__(self) -> int:
        return len(self.held)

    def open(self, key: Hashable, ids: Sequence[int] = (), tokens: int = 0) -> np.ndarray | None:
        """Open a sequence under `key`, empty or with its prompt `ids` (one decode call):
        their logits, [tokens, vocab] (None when opened empty; `feed` it the prompt).
        `tokens`: how many it is expected to reach, when known (room for its finished
        chunks is reserved at once, and memory only taken as they come)."""
        if key in self.held:
            raise UserError(f"sequence {key!r} is already open")
        slot = self._slot()
        for pool in self.pool.values():  # a closed sequence left its state there
            pool[slot] = 0
        empty = DecodeState(self.spec).past
        chunks = StreamState(
            {n: empty[n] for n in self.spec.state.appended},
            self.spec.state.append_axis,
            reserved_chunks(tokens, self.chunk_size),
        )
        self.held[key] = Held(0, slot, chunks)
        self.order.append(key)
        return self._decode([key], [list(ids)])[key] if len(ids) else None

    def feed(self, tokens: dict[Hashable, Sequence[int]]) -> dict[Hashable, np.ndarray]:
        """Feed open sequences their next tokens; each one's logits, [tokens, vocab]. The
        sequences fed one token that leaves its chunk open go through one row-step call;
        the others through the decode step, one call for those at the same position fed as
        many tokens (streams that close their chunks together)."""
        missing = [key for key in tokens if key not in self.held]
        if missing:
            raise UserError(f"sequence {missing[0]!r} is not open")
        c = self.chunk_size
        rows = [key for key, ids in tokens.items() if len(ids) == 1 and self.held[key].position % c != c - 1]
        logits = self._rows(rows, [tokens[key][0] for key in rows]) if rows else {}
        groups: dict[tuple[int, int], list[Hashable]] = {}
        for key, ids in tokens.items():
            if key not in logits:
                groups.setdefault((self.held[key].position, len(ids)), []).append(key)
        for keys in groups.values():
            logits.update(self._decode(keys, [list(tokens[key]) for key in keys]))
        return logits

    def close(self, key: Hashable) -> None:
        """Forget a sequence: the last slot's sequence moves into its slot."""
        slot = self.held.pop(key).slot
        last = len(self.order) - 1
        if slot != last:
            moved = self.order[last]
            for pool in self.pool.values():
                pool[slot] = pool[last]
            self.order[slot] = moved
            self.held[moved].slot = slot
        self.order.pop()

    def position(self, key: Hashable) -> int:
        """How many tokens a sequence has been fed."""
        return self.held[key].position

    def state_bytes(self, key: Hashable | None = None, position: int | None = None) -> int:
        """Bytes of one sequence's state: its pool slot plus its finished chunks; of `key`'s,
        or of any sequence at `position` tokens."""
        chunks = (self.held[key].position if position is None else position) // self.chunk_size
        return self.slot_bytes + chunks * self.chunk_bytes

    def _rows(self, keys: list[Hashable], tokens: list[int]) -> dict[Hashable, np.ndarray]:
        """One row-step call for `keys` (none closing its chunk); their logits, [1, vocab]."""
        held = [self.held[key] for key in keys]
        slots = np.array([h.slot for h in held])
        positions = np.array([h.position for h in held], np.int64)
        in_order = np.array_equal(slots, np.arange(len(slots)))  # the pool's first rows: no gather
        feeds = {
            self.spec.tokens.name: np.array(tokens, np.int64)[:, None],
            ROW_POSITIONS: positions,
            **{name: pool[: len(slots)] if in_order else pool[slots] for name, pool in self.pool.items()},
        }
        outputs = self.rows_runner.infer(feeds)
        fills = positions % self.chunk_size
        for name, axis in self.token_axis.items():  # each row's new key / value into its slot of the chunk
            index = [slice(None)] * self.pool[name].ndim
            index[0], index[axis] = slots, fills
            self.pool[name][tuple(index)] = outputs[name.replace("cache.", "row.", 1)].take(0, axis=axis)
        for h in held:
            h.position += 1
        logits = outputs[self.logits]
        return {key: logits[row] for row, key in enumerate(keys)}

    def _decode(self, keys: list[Hashable], ids: list[list[int]]) -> dict[Hashable, np.ndarray]:
        """Feed sequences at the same position as many tokens each through one decode-step
        call, batched, with their whole state (their finished chunks and their pool slots'
        current chunk); each one's logits, [tokens, vocab]."""
        held = [self.held[key] for key in keys]
        fill = held[0].position % self.chunk_size
        slots = np.array([h.slot for h in held])
        # One sequence's finished chunks go in as they are: at 16k tokens they are 67 MB, a copy
        # per chunk-closing token would cost more than the call.
        chunks = [h.chunks.past for h in held]
        past = {
            name: chunks[0][name] if len(held) == 1 else np.concatenate([c[name] for c in chunks]) for name in chunks[0]
        }
        for name, pool in self.pool.items():
            entry = pool[slots]
            past[self.past[name]] = (
                entry.take(range(fill), axis=self.token_axis[name]) if name in self.token_axis else entry
            )
        outputs = self.decode_runner.infer({self.spec.tokens.name: np.array(ids, np.int64), **past})
        for row, h in enumerate(held):
            h.chunks.advance({name: value[row : row + 1] for name, value in outputs.items()})
            h.position += len(ids[row])
            for name, past_name in self.past.items():
                self._write(name, h.slot, outputs[present_name(past_name)][row])
        logits = outputs[self.logits]
        return {key: logits[row] for row, key in enumerate(keys)}

    def _write(self, name: str, slot: int, value: np.ndarray) -> None:
        """A sequence's cache entry into its pool slot (the current chunk's rows first)."""
        if name in self.token_axis:
            axis = self.token_axis[name] - 1  # the pool slot holds one row: no batch axis
            index = [slice(None)] * value.ndim
            index[axis] = slice(0, value.shape[axis])
            self.pool[name][slot][tuple(index)] = value
        else:
            self.pool[name][slot] = value

    def _slot(self) -> int:
        """The pool slot of an opening sequence (the pool doubles when full)."""
        slot = len(self.order)
        for name, pool in self.pool.items():
            if slot == pool.shape[0]:
                self.pool[name] = np.concatenate([pool, np.zeros_like(pool)])
        return slot


@dataclass(frozen=True)
class Limits:
    """How many sequences, and how many bytes of their state, a serving process holds at
    once, and the longest prompt it takes (`defaults.py`)."""

    max_sequences: int = MAX_SEQUENCES
    max_state_bytes: int = MAX_STATE_BYTES
    max_prompt_tokens: int = MAX_PROMPT_TOKENS

    def check_open(self, sequences: Sequences, tokens: int, final_tokens: int) -> None:
        """Refuse a new sequence of `tokens` prompt tokens (`final_tokens` when it ends)
        beside the open `sequences` when it would pass a limit: UserError for a prompt over
        `max_prompt_tokens`, Busy (retry later) when the sequences or their state are full."""
        if tokens > self.max_prompt_tokens:
            raise UserError(
                f"the prompt has {tokens} tokens, over this model's max_prompt_tokens ({self.max_prompt_tokens})"
            )
        if len(sequences) >= self.max_sequences:
            raise Busy(f"{len(sequences)} sequences are open, this model's max_sequences: retry when one ends")
        held = sum(sequences.state_bytes(key) for key in sequences.held)
        needed = sequences.state_bytes(position=final_tokens)
        if held + needed > self.max_state_bytes:
            raise Busy(
                f"the open sequences hold {held} state bytes; this one needs {needed} more, "
                f"over this model's max_state_bytes ({self.max_state_bytes}): retry when one ends"
            )

    def describe(self, sequences: Sequences) -> str:
        """One line for a server's log: the state one sequence holds, and the limits."""
        per = {n: sequences.state_bytes(position=n) for n in (0, 4096, 65536)}
        return (
            f"state per sequence: {per[0]} bytes at 0 tokens, {per[4096]} at 4096, {per[65536]} at 65536; "
            f"at most {self.max_sequences} sequences and {self.max_state_bytes} state bytes"
        )


class Batcher:
    """Generations over `Sequences`, scheduled one iteration per `step` (as vLLM's chunked
    prefill): every generation past its prompt gets its next token first (the row step);
    what is left of `token_budget` goes to prompts still being prefilled, oldest first, in
    pieces that end on a chunk boundary (the decode step, chunk-parallel), so a long prompt
    spans iterations while the running generations keep producing tokens. While nothing is
    generating, nobody waits on a prompt: it is prefilled whole. A finished generation
    leaves at once; each one generates what `runtime.generate` generates for it alone."""

    def __init__(
        self,
        export_dir: str | Path,
        threads: int | None = None,
        capacity: int = 8,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        runner_options: dict | None = None,
        manifest: dict | None = None,
    ) -> None:
        """Arguments as `Sequences`'; `token_budget`: the tokens one `step` feeds at most
        (beyond every generating sequence's one)."""
        if not isinstance(token_budget, int) or token_budget < 1:
            raise UserError(f"token_budget must be an integer >= 1, got {token_budget!r}")
        self.sequences = Sequences(export_dir, threads, capacity, runner_options=runner_options, manifest=manifest)
        self.prompts = Prompts(export_dir, self.sequences.spec, self.sequences.manifest)
        self.token_budget = token_budget
        self.active: dict[int, Request] = {}  # key in `sequences` -> its request, prefilling or generating
        self.prefilling: dict[int, float] = {}  # key -> seconds its prompt's calls took so far, oldest first
        self.next_token: dict[int, int] = {}  # key -> the token it is fed next (generating ones)
        self._keys = iter(range(2**62))

    def add(self, prompt: str | Sequence[int], max_new_tokens: int = 20, **options) -> Generation:
        """Queue a generation (options as `Generator.generate`: temperature, top_k, top_p,
        seed, stop): its prompt is prefilled over the next `step`s, then it gets a token every
        step until it stops. Returns its `Generation`, which fills as it goes."""
        request = self.prompts.request(prompt, max_new_tokens, **options)
        self.start(request)
        return request.result

    def start(self, request: Request) -> int:
        """Queue a checked `Request` (see `Prompts.request`); its key while it runs (in
        `active`, and in what `step` returns)."""
        key = next(self._keys)
        self.sequences.open(key, tokens=len(request.result.prompt) + request.max_new_tokens)
        self.active[key], self.prefilling[key] = request, 0.0
        return key

    def step(self) -> list[tuple[int, Token]]:
        """One iteration: a token for every generating sequence, then prompt pieces within
        the budget; the tokens made, by key (a prompt's first token once it is all in; a
        generation whose token was its last has left `active`)."""
        made = self._generate()
        budget = self.token_budget - len(made) if made else None  # None: nobody generating, no limit
        for n, key in enumerate(list(self.prefilling)):
            piece = self._piece(key, budget, first=n == 0)
            if not piece:
                break
            begin = time.perf_counter()
            logits = self.sequences.feed({key: piece})[key]
            self.prefilling[key] += time.perf_counter() - begin
            budget = None if budget is None else budget - len(piece)
            if self.sequences.position(key) == len(self.active[key].result.prompt):
                made.append((key, self._take(key, logits[-1], self.prefilling.pop(key))))
        return made

    def cancel(self, key: int) -> None:
        """Stop a generation now (finished, or its client went away) and free its state."""
        del self.active[key]
        self.prefilling.pop(key, None)
        self.next_token.pop(key, None)
        self.sequences.close(key)

    def generate_many(
        self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 20, **options
    ) -> list[Generation]:
        """Generate from every prompt at once (options as `add`; `seed` seeds the first, the
        next ones `seed + 1`...), until all are done."""
        seed = options.pop("seed", 0)
        results = [self.add(prompt, max_new_tokens, seed=seed + i, **options) for i, prompt in enumerate(prompts)]
        while self.active:
            self.step()
        return results

    def _generate(self) -> list[tuple[int, Token]]:
        """The generating sequences' next tokens, one row-step call for all of them (a call
        per position for those that close their chunk)."""
        if not self.next_token:
            return []
        begin = time.perf_counter()
        # In slot order, so the row step reads the pool's first rows as they are.
        keys = [key for key in self.sequences.order if key in self.next_token]
        logits = self.sequences.feed({key: [self.next_token[key]] for key in keys})
        seconds = time.perf_counter() - begin
        return [(key, self._take(key, logits[key][-1], seconds)) for key in keys]

    def _piece(self, key: int, budget: int | None, first: bool) -> list[int]:
        """The next piece of `key`'s prompt within `budget` tokens (None: no limit): the rest,
        or up to the last chunk boundary it reaches; at least up to the next boundary when it
        is the iteration's `first` piece, so every prompt gets on."""
        prompt, position = self.active[key].result.prompt, self.sequences.position(key)
        rest = len(prompt) - position
        if budget is None or rest <= budget:
            return prompt[position:]
        c = self.sequences.chunk_size
        size = (position + budget) // c * c - position
        if size <= 0:
            size = c - position % c if first else 0
        return prompt[position : position + size]

    def _take(self, key: int, logits: np.ndarray, seconds: float) -> Token:
        request = self.active[key]
        token = request.take(logits, seconds)
        if request.done:
            self.cancel(key)
        else:
            self.next_token[key] = token.id
        return token


def load_batcher(
    export_dir: str | Path, threads: int | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET
) -> Batcher:
    """A `Batcher` over `export_dir` (written by `bsbr-export export MODEL --format onnx
    --streaming` for a model with `step_rows`, e.g. the native presets), its iterations
    taking `token_budget` tokens."""
    return Batcher(export_dir, threads, token_budget=token_budget)
