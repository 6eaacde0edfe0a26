"""Generation from an export directory: text or token ids in, tokens out as they are made.

    from bsbr_export.runtime.generate import load_generator

    generator = load_generator("export/bsbr-stdlib")  # ONNX Runtime on the CPU by default
    print(generator.generate("def main(", max_new_tokens=60).text)
    for token in generator.generate("import ", max_new_tokens=60, temperature=0.8, top_k=40, seed=1, stream=True):
        print(token.text, end="", flush=True)

ONNX Runtime engines generate as the servers do, through `runtime.batching.Batcher` where
the export has a row step (`model.rows.onnx`): the prompt in chunk-parallel pieces, then
each token through the row step, which reads only the current chunk and `S_i`, and a
chunk's last token through the decode step. Other engines (and exports without a row step)
feed the prompt with one call of the export's decode graph (`model.decode.*`, else the
full-state `model.streaming.*`), then each call one token and the state the last one
returned: a decode step returns the current chunk's `present.*` state and the `new.*` rows
of the chunks it finished (usually none), which are appended here. Text goes in and out
through the export's tokenizer: UTF-8 bytes for byte-level models, the `tokenizers`
library over the export's `tokenizer.json` otherwise. Any engine of
`runtime.engines.ENGINES` that runs an exported format can generate, where the directory
holds that format's decode (or streaming) graph.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bsbr_export.errors import UserError
from bsbr_export.formats import FORMATS, ONNX, artifact_name
from bsbr_export.manifest import read_manifest
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.base import Runner
from bsbr_export.runtime.batching import Batcher
from bsbr_export.runtime.engines import ENGINES, Engine, open_engine_file, why_not
from bsbr_export.runtime.requests import DecodeState, Generation, Prompts, Request, Token, logits_output

GRAPH_KINDS = ("decode", "streaming")  # the graph a generator runs, preferred first
DEFAULT_ENGINE = "ort-cpu-all"


class Generator:
    """An export directory's decode (or streaming) graph on one engine, and its tokenizer."""

    def __init__(self, export_dir: str | Path, engine: str = DEFAULT_ENGINE, threads: int | None = None) -> None:
        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)  # every file checked against its sha256
        self.spec = ModelSpec.from_dict(manifest["spec"])
        if manifest.get("state") is None:
            raise UserError(f"{self.export_dir} has no streaming graphs: export with --streaming to generate")
        self.logits = logits_output(self.spec, self.export_dir)
        self.engine, self.kind, self.runner, self.batcher = _open(self.export_dir, manifest, self.spec, engine, threads)
        self.prompts = Prompts(self.export_dir, self.spec, manifest)
        self.vocab_size = self.spec.tokens.high

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """The prompt's token ids: text through the export's tokenizer, or ids as given (checked)."""
        return self.prompts.encode(prompt)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 20,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop: Sequence[str | int] = (),
        stream: bool = False,
    ) -> Generation | Iterator[Token]:
        """Generate up to `max_new_tokens` after `prompt` (text, or token ids), sampled as
        `Sampling` says. Stops early at the model's end-of-text id or at any of `stop`
        (token ids, or strings the generated text ends with). `stream=True` returns an
        iterator of `Token`s as they are made; else the finished `Generation`."""
        request = self.request(
            prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop
        )
        tokens = self._tokens(request)
        if stream:
            return tokens
        for _ in tokens:
            pass
        return request.result

    def request(self, prompt: str | Sequence[int], max_new_tokens: int = 20, **options) -> Request:
        """A generation's `Request` (arguments as `generate`), every one of them checked."""
        return self.prompts.request(prompt, max_new_tokens, **options)

    def _tokens(self, request: Request) -> Iterator[Token]:
        if self.batcher is not None:
            yield from self._batched_tokens(request)
            return
        feed = request.result.prompt
        state = DecodeState(self.spec, len(feed) + request.max_new_tokens)
        while not request.done:
            start = time.perf_counter()
            outputs = self.runner.infer({self.spec.tokens.name: np.array([feed], np.int64), **state.past})
            seconds = time.perf_counter() - start
            state.advance(outputs)
            token = request.take(outputs[self.logits][0, -1], seconds)
            yield token
            feed = [token.id]

    def _batched_tokens(self, request: Request) -> Iterator[Token]:
        key = self.batcher.start(request)
        try:
            while not request.done:
                for _, token in self.batcher.step():
                    yield token
        finally:
            if key in self.batcher.active:  # the caller stopped reading: free the sequence
                self.batcher.cancel(key)


def _row_batcher(export_dir: Path, manifest: dict, engine: Engine, threads: int | None) -> Batcher | None:
    """A one-sequence `Batcher` on `engine`'s ONNX Runtime settings when it runs the ONNX
    graphs and the export has a row step and a decode step; else None (the decode loop)."""
    listed = {a["name"] for a in manifest["artifacts"]}
    steps = {artifact_name(ONNX, kind) for kind in ("rows", "decode")}
    if engine.runs != ONNX.name or engine.artifact != artifact_name(ONNX) or not steps <= listed:
        return None
    options = {"provider": engine.provider, **engine.options}
    return Batcher(export_dir, threads, capacity=1, runner_options=options, manifest=manifest)


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


def _open(
    export_dir: Path, manifest: dict, spec: ModelSpec, engine_name: str, threads: int | None
) -> tuple[Engine, str, Runner, Batcher | None]:
    """The engine, the kind of graph it runs, its runner, and the `Batcher` when it takes the
    row path (whose decode runner it then is: the graph is loaded once)."""
    usable = _usable(export_dir, manifest)
    engine = ENGINES.get(engine_name)
    if engine is None or engine_name not in usable:
        reason = "unknown" if engine is None else why_not(engine, export_dir) or "has no streaming graph to run here"
        raise UserError(
            f"engine {engine_name!r} cannot generate from {export_dir} ({reason}): "
            f"use one of {', '.join(usable) or 'none (export with --streaming)'}"
        )
    batcher = _row_batcher(export_dir, manifest, engine, threads)
    if batcher is not None:
        return engine, "rows", batcher.sequences.decode_runner, batcher
    name = _graph(engine, manifest)
    kind = next(k for k in GRAPH_KINDS if name == artifact_name(FORMATS[engine.runs], k))
    state = spec.state
    outputs = spec.output_names + (state.update_names() if kind == "decode" else list(state.outputs))
    runner = open_engine_file(engine, export_dir / name, [spec.tokens.name, *state.inputs], outputs, threads)
    return engine, kind, runner, None


def load_generator(export_dir: str | Path, engine: str = DEFAULT_ENGINE, threads: int | None = None) -> Generator:
    """A `Generator` over `export_dir` (written by `bsbr-export export ... --streaming`)
    on `engine` (any of `generation_engines(export_dir)`), with `threads` ONNX Runtime threads."""
    return Generator(export_dir, engine, threads)
