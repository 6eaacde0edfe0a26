"""One generation, numpy only: its prompt as token ids, how it samples, when it stops,
and its text. `Prompts` turns an export's prompts into `Request`s; each step's logits go
to `Request.take`, which picks the next token. Shared by `runtime.generate` (one sequence)
and `runtime.batching` (many); imports no torch, so a serving process runs it as is.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bsbr_export.errors import UserError
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.state import StreamState, empty_state_tensor, reserved_chunks

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits: the most likely when `temperature`
    is 0 (greedy), else a draw from softmax(logits / temperature), over the `top_k` most
    likely and the smallest set whose probability reaches `top_p`, when given, from a
    numpy generator seeded by `seed` (the same seed gives the same tokens)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):  # also refuses nan
            raise UserError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise UserError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed must be an integer >= 0, got {self.seed!r}")


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token id from one position's logits [vocab] (see `Sampling`)."""
    logits = np.asarray(logits, dtype=np.float64).ravel()
    if sampling.temperature == 0:
        return int(logits.argmax())
    scaled = logits / sampling.temperature
    if sampling.top_k:
        scaled = np.where(scaled >= np.sort(scaled)[-sampling.top_k], scaled, -np.inf)
    weights = np.exp(scaled - scaled.max())
    probs = weights / weights.sum()
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        # Keep the most likely tokens up to and including the one that reaches top_p.
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), sampling.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(len(probs), p=probs))


class ByteText:
    """Byte-level models: a token id is one UTF-8 byte."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def decoder(self, prompt: list[int]):
        """A step(id) -> text callable: a multi-byte character comes out whole, with its last byte."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: utf8.decode(bytes([token]))


class TokenizerText:
    """A `tokenizers` tokenizer.json: its `encode`, and its `DecodeStream` for text that
    comes out as soon as the ids form it."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer  # optional: only exports with a tokenizer.json need it
        except ImportError:
            raise UserError(f"{path} is read by the tokenizers library: pip install tokenizers") from None
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type, with serde's message
            raise UserError(f"{path} is not a tokenizers file: {str(exc).splitlines()[0]}") from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decoder(self, prompt: list[int]):
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=False)
        for token in prompt:  # the prompt's ids set the context (a leading space, a split character)
            stream.step(self.tokenizer, token)
        return lambda token: stream.step(self.tokenizer, token) or ""


def export_text(export_dir: Path, spec: ModelSpec) -> ByteText | TokenizerText | None:
    """How an export's token ids map to text, from its spec's tokenizer (None: ids only)."""
    if spec.tokenizer == "bytes":
        return ByteText()
    if spec.tokenizer == TOKENIZER_FILE:
        return TokenizerText(export_dir / TOKENIZER_FILE)
    return None


@dataclass(frozen=True)
class Token:
    """One generated token: its id, the text it completes (may be empty while a character's
    bytes are still coming), and the seconds of the call that computed its logits."""

    id: int
    text: str
    seconds: float


@dataclass
class Generation:
    """A finished generation: the prompt's ids, the new ids and their text (all of them
    decoded at the end: a character whose bytes never all came shows as U+FFFD, where the
    streamed pieces leave it out), why it stopped ("length", "eos" or "stop"), and the
    prompt's call and every one-token call, in seconds."""

    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    stopped: str = "length"
    prefill_seconds: float = 0.0
    token_seconds: list[float] = field(default_factory=list)


class DecodeState(StreamState):
    """One sequence's state for a streaming or decode graph, as numpy arrays (see
    `runtime.state`): empty to start, advanced in place by each step's outputs, with room
    for the finished chunks of `tokens` tokens when the caller knows how far it goes."""

    def __init__(self, spec: ModelSpec, tokens: int = 0) -> None:
        empty = {name: empty_state_tensor(shape, 1) for name, shape in spec.state.inputs.items()}
        super().__init__(empty, spec.state.append_axis, reserved_chunks(tokens, spec.chunk_size))


@dataclass
class Request:
    """One generation under way: its result so far, how it samples (its own seeded
    generator) and when it stops; `take` turns each step's logits into its next token."""

    result: Generation
    max_new_tokens: int
    sampling: Sampling
    stop_ids: set[int]
    stop_texts: list[str]
    eos_ids: set[int]
    text: ByteText | TokenizerText | None
    rng: np.random.Generator = field(init=False)
    decode: object = field(init=False)  # step(id) -> the text a token completes (None: ids only)
    done: bool = False

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sampling.seed)
        self.decode = self.text.decoder(self.result.prompt) if self.text is not None else None

    def take(self, logits: np.ndarray, seconds: float) -> Token:
        """The next token from the logits of the call that took `seconds` (the prompt's
        call for the first); once it is the last, `done` and the result says why, its whole
        text decoded."""
        result = self.result
        if result.ids:
            result.token_seconds.append(seconds)
        else:
            result.prefill_seconds = seconds
        token = pick(logits, self.sampling, self.rng)
        piece = self.decode(token) if self.decode is not None else ""
        result.ids.append(token)
        result.text += piece
        if token in self.eos_ids:
            result.stopped, self.done = "eos", True
        elif token in self.stop_ids or any(result.text.endswith(s) for s in self.stop_texts):
            result.stopped, self.done = "stop", True
        elif len(result.ids) == self.max_new_tokens:
            result.stopped, self.done = "length", True
        if self.done and self.text is not None:
            result.text = self.text.decode(result.ids)
        return Token(token, piece, seconds)


def logits_output(spec: ModelSpec, export_dir: Path) -> str:
    """The name of the output that holds the logits, or a UserError: generation needs them."""
    name = next((o.name for o in spec.outputs if o.logits), None)
    if name is None:
        raise UserError(
            f"{export_dir}'s model outputs {', '.join(spec.output_names)}, no logits: "
            "generation needs a model with its LM head"
        )
    return name


class Prompts:
    """An export's tokenizer, vocabulary and end-of-text ids: prompts in, `Request`s out."""

    def __init__(self, export_dir: str | Path, spec: ModelSpec, manifest: dict) -> None:
        self.export_dir = Path(export_dir)
        self.text = export_text(self.export_dir, spec)
        self.vocab_size = spec.tokens.high
        eos = (manifest.get("source") or {}).get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """The prompt's token ids: text through the export's tokenizer, or ids as given (checked)."""
        if isinstance(prompt, str):
            if self.text is None:
                raise UserError(
                    f"{self.export_dir} has no tokenizer (neither byte-level nor a tokenizer.json): "
                    "pass the prompt as token ids"
                )
            ids = self.text.encode(prompt)
        else:
            ids = list(prompt)
            bad = [i for i in ids if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0]
            if bad:
                raise UserError(f"token id {bad[0]!r} is not a non-negative integer")
        if not ids:
            raise UserError("the prompt is empty")
        if self.vocab_size is not None and max(ids) >= self.vocab_size:
            raise UserError(f"token id {max(ids)} is out of range: this model's vocabulary is [0, {self.vocab_size})")
        return [int(i) for i in ids]

    def request(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 20,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop: Sequence[str | int] = (),
    ) -> Request:
        """A generation's `Request` (arguments as `Generator.generate`), every one of them checked."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        sampling = Sampling(temperature, top_k, top_p, seed)
        return Request(
            Generation(self.encode(prompt)),
            max_new_tokens,
            sampling,
            {s for s in stop if isinstance(s, int)},
            [s for s in stop if isinstance(s, str) and s],
            self.eos_ids,
            self.text,
        )
