"""Generation from an export directory: text or token ids in, tokens out as they are made.

    from bsbr_export.runtime.generate import load_generator

    generator = load_generator("export/bsbr-stdlib")  # ONNX Runtime on the CPU by default
    print(generator.generate("def main(", max_new_tokens=60).text)
    for token in generator.generate("import ", max_new_tokens=60, temperature=0.8, top_k=40, seed=1, stream=True):
        print(token.text, end="", flush=True)

The prompt goes in with one call of the export's decode graph (`model.decode.*`, else the
full-state `model.streaming.*`); then each call feeds one token and the state the last one
returned. A decode step returns the current chunk's `present.*` state and the `new.*` rows
of the chunks it finished (usually none), which are appended here, so a token costs the
same at any context. Text goes in and out through the export's tokenizer: UTF-8 bytes for
byte-level models, the `tokenizers` library over the export's `tokenizer.json` otherwise.
Any engine of `runtime.engines.ENGINES` that runs an exported format can generate, where
the directory holds that format's decode (or streaming) graph.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bsbr_export.errors import UserError
from bsbr_export.formats import FORMATS, artifact_name
from bsbr_export.manifest import read_manifest
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.base import Runner
from bsbr_export.runtime.engines import ENGINES, Engine, open_engine_file, why_not
from bsbr_export.runtime.state import advance_state, empty_state_tensor

GRAPH_KINDS = ("decode", "streaming")  # the graph a generator runs, preferred first
DEFAULT_ENGINE = "ort-cpu-all"
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


class DecodeState:
    """One sequence's state for a streaming or decode graph, as numpy arrays (see
    `runtime.state`): empty to start, advanced by each step's outputs."""

    def __init__(self, spec: ModelSpec) -> None:
        self.append_axis = spec.state.append_axis
        self.past = {name: empty_state_tensor(shape, 1) for name, shape in spec.state.inputs.items()}

    def update(self, outputs: dict[str, np.ndarray]) -> None:
        self.past = advance_state(self.past, outputs, self.append_axis)


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


class Generator:
    """An export directory's decode (or streaming) graph on one engine, and its tokenizer."""

    def __init__(self, export_dir: str | Path, engine: str = DEFAULT_ENGINE, threads: int | None = None) -> None:
        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)  # every file checked against its sha256
        self.spec = ModelSpec.from_dict(manifest["spec"])
        if manifest.get("state") is None:
            raise UserError(f"{self.export_dir} has no streaming graphs: export with --streaming to generate")
        self.logits = next((o.name for o in self.spec.outputs if o.logits), None)
        if self.logits is None:
            raise UserError(f"{self.export_dir}'s model outputs {', '.join(self.spec.output_names)}, no logits: "
                            "generation needs a model with its LM head")
        self.engine, self.kind, self.runner = _open(self.export_dir, manifest, self.spec, engine, threads)
        self.text = export_text(self.export_dir, self.spec)
        self.vocab_size = self.spec.tokens.high
        eos = (manifest.get("source") or {}).get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """The prompt's token ids: text through the export's tokenizer, or ids as given (checked)."""
        if isinstance(prompt, str):
            if self.text is None:
                raise UserError(f"{self.export_dir} has no tokenizer (neither byte-level nor a tokenizer.json): "
                                "pass the prompt as token ids")
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

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 20, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop: Sequence[str | int] = (), stream: bool = False) -> Generation | Iterator[Token]:
        """Generate up to `max_new_tokens` after `prompt` (text, or token ids), sampled as
        `Sampling` says. Stops early at the model's end-of-text id or at any of `stop`
        (token ids, or strings the generated text ends with). `stream=True` returns an
        iterator of `Token`s as they are made; else the finished `Generation`."""
        request = self.request(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               stop=stop)
        tokens = self._tokens(request)
        if stream:
            return tokens
        for _ in tokens:
            pass
        return request.result

    def request(self, prompt: str | Sequence[int], max_new_tokens: int = 20, *, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                stop: Sequence[str | int] = ()) -> Request:
        """A generation's `Request` (arguments as `generate`), every one of them checked."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        sampling = Sampling(temperature, top_k, top_p, seed)
        return Request(Generation(self.encode(prompt)), max_new_tokens, sampling,
                       {s for s in stop if isinstance(s, int)}, [s for s in stop if isinstance(s, str) and s],
                       self.eos_ids, self.text)

    def _tokens(self, request: Request) -> Iterator[Token]:
        state = DecodeState(self.spec)
        feed = request.result.prompt
        while not request.done:
            start = time.perf_counter()
            outputs = self.runner.infer({self.spec.tokens.name: np.array([feed], np.int64), **state.past})
            seconds = time.perf_counter() - start
            state.update(outputs)
            token = request.take(outputs[self.logits][0, -1], seconds)
            yield token
            feed = [token.id]


def generation_engines(export_dir: str | Path) -> list[str]:
    """The engines that can generate from `export_dir` here, in the engine table's order."""
    return _usable(Path(export_dir), read_manifest(export_dir, verify=False))


def _usable(export_dir: Path, manifest: dict) -> list[str]:
    return [e.name for e in ENGINES.values() if _graph(e, manifest) and why_not(e, export_dir) is None]


def _graph(engine: Engine, manifest: dict) -> str | None:
    """The streaming graph file `engine` would run from an export with `manifest`: its
    format's decode graph, else its full-state step; None when it runs no exported format
    as is (eager, a reduced-precision file) or the export has neither graph."""
    fmt = FORMATS.get(engine.runs)
    if fmt is None or engine.artifact != artifact_name(fmt, "full"):
        return None
    listed = {a["name"] for a in manifest["artifacts"]}
    return next((artifact_name(fmt, k) for k in GRAPH_KINDS if artifact_name(fmt, k) in listed), None)


def _open(export_dir: Path, manifest: dict, spec: ModelSpec, engine_name: str,
          threads: int | None) -> tuple[Engine, str, Runner]:
    usable = _usable(export_dir, manifest)
    engine = ENGINES.get(engine_name)
    if engine is None or engine_name not in usable:
        reason = "unknown" if engine is None else why_not(engine, export_dir) or "has no streaming graph to run here"
        raise UserError(f"engine {engine_name!r} cannot generate from {export_dir} ({reason}): "
                        f"use one of {', '.join(usable) or 'none (export with --streaming)'}")
    name = _graph(engine, manifest)
    kind = next(k for k in GRAPH_KINDS if name == artifact_name(FORMATS[engine.runs], k))
    state = spec.state
    outputs = spec.output_names + (state.update_names() if kind == "decode" else list(state.outputs))
    runner = open_engine_file(engine, export_dir / name, [spec.tokens.name, *state.inputs], outputs, threads)
    return engine, kind, runner


def load_generator(export_dir: str | Path, engine: str = DEFAULT_ENGINE, threads: int | None = None) -> Generator:
    """A `Generator` over `export_dir` (written by `bsbr-export export ... --streaming`)
    on `engine` (any of `generation_engines(export_dir)`), with `threads` ONNX Runtime threads."""
    return Generator(export_dir, engine, threads)
