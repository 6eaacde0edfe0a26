"""Latency and memory, side by side: every engine on the same inputs, in the same run.

Each engine runs in its own subprocess (`python -m bsbr_export.proof.bench --worker ...`)
so one engine's allocator arena or spinning threads never pollute another's figures.
Lengths run in increasing order, so the process's peak RSS after a length is that
length's peak. Functions return data; `report.py` writes it out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bsbr_export.compare.parity import compare, output_scale
from bsbr_export.defaults import DEFAULT_THREADS
from bsbr_export.errors import UserError
from bsbr_export.formats import ONNX, artifact_name
from bsbr_export.manifest import manifest_spec
from bsbr_export.proof.evaltext import bits_per_byte, heldout_text, scores_text, text_feeds
from bsbr_export.runtime.base import Runner
from bsbr_export.runtime.engines import open_engine
from bsbr_export.runtime.onnx import OnnxRunner
from bsbr_export.runtime.state import advance_state, empty_state_tensor

WARMUP = 3  # untimed runs per engine and length (TorchScript's profiling executor needs ~2)
MIN_ITERS = 10  # timed runs before the spread means anything
TARGET_SPREAD = 0.10  # stop timing a length early once p10-p90 is within this share of the median
MAX_ITERS = 500
NOISY_SPREAD = 0.25  # p10-p90 wider than this share of the median: the figure is flagged


@dataclass(frozen=True)
class Timing:
    """One engine at one input shape."""

    length: int
    batch: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    tokens_per_s: float
    peak_rss_mib: float
    p10_ms: float = 0.0
    spread: float = 0.0  # (p90 - p10) / p50: how far apart the timed runs were

    @property
    def noisy(self) -> bool:
        """Whether the runs disagree so much that the median is not to be trusted."""
        return self.spread > NOISY_SPREAD


@dataclass(frozen=True)
class EngineResult:
    """One engine's timings, and its outputs' distance from eager on the same inputs."""

    engine: str
    ok: bool
    timings: tuple[Timing, ...] = ()
    error: str | None = None
    load_rss_mib: float = 0.0
    max_abs: float | None = None  # vs eager at the shortest length, after timing
    top1: float | None = None
    logit_scale: float = 1.0  # max |eager output| (at least 1): tolerances are relative to it
    # Held-out bits per byte scored in windows of each timed length (byte-level LMs only):
    # reduced precision can hold at short positions and break at long ones.
    bits_per_byte: dict[int, float] | None = None

    def at(self, length: int) -> Timing | None:
        return next((t for t in self.timings if t.length == length), None)


@dataclass(frozen=True)
class DecodeResult:
    """Streaming decode: per-token latency at a context length vs re-running everything."""

    context: int
    step_p50_ms: float
    step_p90_ms: float
    full_forward_p50_ms: float
    graph: str = ""  # which streaming graph was timed

    @property
    def speedup(self) -> float:
        return self.full_forward_p50_ms / self.step_p50_ms


@dataclass(frozen=True)
class BenchResult:
    engines: tuple[EngineResult, ...]
    lengths: tuple[int, ...]
    batch: int
    threads: int
    warmup: int
    decode: tuple[DecodeResult, ...] = ()
    machine: dict = field(default_factory=dict)
    baseline: str = "eager"  # the engine speed-ups are measured against (eager on the device timed)

    def engine(self, name: str) -> EngineResult | None:
        return next((e for e in self.engines if e.engine == name), None)

    def reference(self) -> EngineResult | None:
        """The baseline engine's result (None when it was not timed)."""
        return self.engine(self.baseline)

    def to_dict(self) -> dict:
        return asdict(self)


def random_feeds(vocab_size: int, batch: int, length: int, seed: int | None = None) -> dict:
    """Random ids and an all-ones mask; seeded by the length unless `seed` is given, so
    every engine (each in its own process) gets the same inputs at a length."""
    rng = np.random.default_rng(length if seed is None else seed)
    ids = rng.integers(0, vocab_size, size=(batch, length), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def spec_feeds(spec, batch: int, length: int, seed: int | None = None) -> dict:
    """`random_feeds` under the names the spec gives (an all-ones mask only where the model
    takes one): a module's token input need not be called `input_ids`, and an ONNX session
    refuses inputs its graph does not have."""
    return text_feeds(spec, random_feeds(spec.tokens.high, batch, length, seed)["input_ids"])


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB.

    Linux's VmHWM resets at exec; `ru_maxrss` does not (a child started from a big
    parent would report the parent's peak), so it is only the fallback.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def round_sig(x: float, digits: int = 2) -> float:
    """`x` rounded to `digits` significant digits (for figures stored in reports)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def spread(times: list[float]) -> float:
    """(p90 - p10) / p50 of some run times: 0.1 means the middle 80% lie within 10% of the median.

    Two significant digits: a third means nothing for run times, and the `noisy` flag
    must agree with the figure a report shows (0.2501 shown as 0.25 is not over 0.25)."""
    p10, *_, p90 = statistics.quantiles(times, n=10, method="inclusive")
    return round_sig((p90 - p10) / statistics.median(times))


def time_lengths(
    call,
    feeds_at,
    lengths: list[int],
    batch: int = 1,
    warmup: int = WARMUP,
    min_iters: int = MIN_ITERS,
    budget_s: float = 1.0,
) -> list[Timing]:
    """Time `call(feeds_at(length))` at each length, shortest first: warm-up, then at least
    `min_iters` runs, repeated until their p10-p90 spread is within `TARGET_SPREAD` of
    the median or `budget_s` seconds are spent (`MAX_ITERS` runs at most)."""
    timings, min_iters = [], max(min_iters, 2)  # a spread needs two runs
    for length in sorted(lengths):
        feeds = feeds_at(length)
        for _ in range(warmup):
            call(feeds)
        times = []
        start = time.perf_counter()
        while len(times) < MAX_ITERS:
            t0 = time.perf_counter()
            call(feeds)
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= min_iters and (time.perf_counter() - start >= budget_s or spread(times) <= TARGET_SPREAD):
                break
        p10, *_, p90 = statistics.quantiles(times, n=10, method="inclusive")
        p50 = statistics.median(times)
        timings.append(
            Timing(
                length=length,
                batch=batch,
                iters=len(times),
                p50_ms=p50,
                p90_ms=p90,
                p99_ms=statistics.quantiles(times, n=100, method="inclusive")[-1],
                tokens_per_s=batch * length / (p50 / 1e3),
                peak_rss_mib=peak_rss_mib(),
                p10_ms=p10,
                spread=spread(times),
            )
        )
    return timings


def run_engine(
    engine: str,
    export_dir: Path,
    lengths: list[int],
    batch: int,
    warmup: int,
    min_iters: int,
    budget_s: float,
    threads: int,
    trust_code: bool = False,
    eval_text: bytes | None = None,
) -> EngineResult:
    """Time one engine in this process (use `bench_engines` for isolated processes);
    a byte-level LM is also scored on `eval_text` (default the held-out text)."""
    spec = manifest_spec(export_dir)
    torch.set_num_threads(threads)
    runner = open_engine(engine, export_dir, threads=threads, trust_code=trust_code)
    load_rss = peak_rss_mib()
    if getattr(runner, "io_binding", False):  # feeds bound on the device once: the graph alone is timed
        call, feeds_at = (lambda run: run()), (lambda n: runner.prepare(spec_feeds(spec, batch, n)))
    else:
        call, feeds_at = runner.infer, (lambda n: spec_feeds(spec, batch, n))
    timings = time_lengths(call, feeds_at, lengths, batch, warmup, min_iters, budget_s)
    bpb = None
    if scores_text(spec) and spec.outputs[0].logits:
        text = eval_text if eval_text is not None else heldout_text()
        bpb = {
            n: bits_per_byte(lambda ids: first_output(runner, text_feeds(spec, ids)), text, window=n, batch=1)
            for n in lengths
        }
    # Parity last, so loading the eager reference never shows in the memory figures.
    feeds = spec_feeds(spec, batch, min(lengths))
    want = first_output(open_engine("eager", export_dir, trust_code=trust_code), feeds)
    diff = compare(spec.output_names[0], want, first_output(runner, feeds), 0.0, top1=True)
    return EngineResult(
        engine,
        True,
        tuple(timings),
        load_rss_mib=load_rss,
        max_abs=diff.max_abs,
        top1=diff.top1,
        logit_scale=output_scale(want),
        bits_per_byte=bpb,
    )


def first_output(runner: Runner, feeds: dict) -> np.ndarray:
    """The runner's first output on `feeds` (what bench times, scores and compares)."""
    return runner.infer(feeds)[runner.output_names[0]]


def weight_flops(config, length: int, batch: int = 1) -> float:
    """FLOPs (2 per multiply-add) of a native BSBR model's weight GEMMs: q, k, v, out
    projections, meta projections at boundary tokens, feed-forward, LM head."""
    h = config.hidden_size
    n = (length + config.chunk_size - 1) // config.chunk_size
    per_layer = (
        4 * 2 * length * h * h  # q, k, v, out projections
        + 2 * 2 * n * h * h  # meta query / key projections, boundary tokens only
        + 2 * 2 * length * h * config.ff_size  # feed-forward
    )
    head = 2 * length * h * config.vocab_size if config.lm_head else 0
    return float(batch * (config.num_layers * per_layer + head))


def model_flops(config, length: int, batch: int = 1) -> float:
    """Forward FLOPs (2 per multiply-add) of a native BSBR model, counted from the math:
    the weight GEMMs (`weight_flops`), then within-chunk blocks on the padded length,
    chunk states, chunk-level retrieval (n^2 terms) and q S."""
    e, c, heads = config.head_dim, config.chunk_size, config.num_heads
    n = (length + c - 1) // c
    padded = n * c
    per_layer = (
        2 * 2 * padded * c * e * heads  # within-chunk q k^T and a v
        + 2 * padded * e * e * heads  # chunk states K^T V
        + 2 * n * n * e * heads
        + 2 * n * n * config.state_size * heads  # retrieval scores, mix
        + 2 * padded * e * e * heads  # q S
    )
    if config.compression is not None:
        per_layer += 2 * 2 * n * e * e * config.compression * heads  # compress + decompress
    return weight_flops(config, length, batch) + float(batch * config.num_layers * per_layer)


def bench_engines(
    export_dir: str | os.PathLike,
    engines: list[str],
    lengths: list[int],
    *,
    batch: int = 1,
    warmup: int = WARMUP,
    min_iters: int = MIN_ITERS,
    budget_s: float = 1.0,
    threads: int = DEFAULT_THREADS,
    trust_code: bool = False,
    eval_text: bytes | None = None,
    progress=lambda step: None,
) -> list[EngineResult]:
    """Run each engine in a fresh subprocess; an engine that crashes is reported, not fatal.
    `trust_code` lets the eager engines rebuild a user's module from its reference;
    byte-level LMs are scored on `eval_text` (default held-out text), which each process
    gets on its stdin (the caller read the file once)."""
    export_dir = Path(export_dir)
    results = []
    for engine in engines:
        progress(f"benchmarking {engine}")
        command = [
            sys.executable,
            "-m",
            "bsbr_export.proof.bench",
            "--worker",
            engine,
            str(export_dir),
            "--lengths",
            ",".join(map(str, lengths)),
            "--batch",
            str(batch),
            "--warmup",
            str(warmup),
            "--min-iters",
            str(min_iters),
            "--budget",
            str(budget_s),
            "--threads",
            str(threads),
            *(["--trust-code"] if trust_code else []),
            *(["--eval-text-stdin"] if eval_text is not None else []),
        ]
        # Threads are set inside the worker; OMP_NUM_THREADS in the environment made
        # torch's OpenMP pool crawl (50x) whenever another process held a core.
        done = subprocess.run(command, capture_output=True, input=eval_text or b"")
        lines = done.stdout.decode().strip().splitlines()
        if done.returncode != 0 or not lines:
            error = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            results.append(EngineResult(engine, False, error=error[:300]))
            continue
        data = json.loads(lines[-1])
        timings = tuple(Timing(**t) for t in data.pop("timings"))
        if data.get("bits_per_byte"):  # JSON made its length keys strings
            data["bits_per_byte"] = {int(n): v for n, v in data["bits_per_byte"].items()}
        results.append(EngineResult(engine, True, timings, **data))
    return results


def decode_latency(
    export_dir: str | os.PathLike,
    contexts: list[int],
    *,
    steps: int | None = None,
    threads: int = DEFAULT_THREADS,
    progress=lambda step: None,
) -> list[DecodeResult]:
    """Per-token latency of streaming decode at each context length, against re-running
    the full ONNX graph over context + 1 tokens.

    Uses the decode graph (model.decode.onnx: finished chunks appended by the caller)
    when the export has one, else the full-state streaming graph. Each timed step
    includes the caller's state update; `steps` defaults to two chunks, so the chunk
    closings (and their appends) are among the timed steps.
    """
    export_dir = Path(export_dir)
    graph = next(
        (
            export_dir / n
            for n in (artifact_name(ONNX, "decode"), artifact_name(ONNX, "streaming"))
            if (export_dir / n).is_file()
        ),
        None,
    )
    if graph is None:
        raise UserError(f"{export_dir} has no streaming graph: export with --streaming")
    spec = manifest_spec(export_dir)
    steps = steps or 2 * spec.chunk_size
    shapes = spec.state.inputs
    # One session at a time, threads spinning (as alone in a process): two live pools
    # on these cores would slow whichever runs while the other's threads spin.
    stream = OnnxRunner(graph, threads=threads, spinning=True)

    def step(ids_piece, state):
        return advance_state(state, stream.infer({spec.tokens.name: ids_piece, **state}))

    rng = np.random.default_rng(0)
    sequences, step_times = {}, {}
    for context in sorted(contexts):
        progress(f"decode at context {context}")
        ids = rng.integers(0, spec.tokens.high, size=(1, context + steps), dtype=np.int64)
        state = {n: empty_state_tensor(shapes[n], 1) for n in shapes}
        for start in range(0, context, 1024):  # prefill in pieces
            state = step(ids[:, start : min(start + 1024, context)], state)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state = step(ids[:, context + i : context + i + 1], state)
            times.append((time.perf_counter() - t0) * 1e3)
        sequences[context], step_times[context] = ids, sorted(times)
    stream = None  # its threads stop before the full graph's start
    full = OnnxRunner(export_dir / artifact_name(ONNX), threads=threads, spinning=True)
    results = []
    for context in sorted(contexts):
        times = step_times[context]
        full_ms = median_ms(full.infer, text_feeds(spec, sequences[context][:, : context + 1]))
        results.append(
            DecodeResult(context, statistics.median(times), times[int(0.9 * (len(times) - 1))], full_ms, graph.name)
        )
    return results


def median_ms(call, feeds: dict, repeats: int = 3) -> float:
    """Median ms of `call(feeds)` over `repeats` runs after one warm-up run."""
    call(feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bsbr_export.proof.bench")
    parser.add_argument("--worker", required=True)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--lengths", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--min-iters", type=int, default=MIN_ITERS)
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trust-code", action="store_true")
    parser.add_argument("--eval-text-stdin", action="store_true", help="score on the bytes read from stdin")
    args = parser.parse_args(argv)
    result = run_engine(
        args.worker,
        args.export_dir,
        [int(x) for x in args.lengths.split(",")],
        args.batch,
        args.warmup,
        args.min_iters,
        args.budget,
        args.threads,
        args.trust_code,
        sys.stdin.buffer.read() if args.eval_text_stdin else None,
    )
    data = asdict(result)
    for key in ("engine", "ok", "error"):
        data.pop(key)
    print(json.dumps(data))


if __name__ == "__main__":
    _worker(sys.argv[1:])
