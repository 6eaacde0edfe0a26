"""The scheduler's figures: what a joining prompt costs the running generations, and what
the token budget buys, measured on `runtime.batching.Batcher` in one process.

    python tools/scheduler_load.py [--export DIR | --model bsbr-stdlib] [--running 16]
        [--join 16384] [--budgets whole,80,128,256,512] [--out tools/results] [--smoke]

One process, one ORT thread (a server's core), pinned to one core with `taskset` when
there is one to spare. Per budget: `--running` generations (random 256-token prompts)
run two chunks' worth of steps alone (their inter-token gaps, p50 / p99; the steps on
which they close their chunks together are among them, as they are while a prompt joins),
then a `--join`-token prompt joins and the gaps are taken again while it is prefilled
(until its first token), with its time to first token. `whole` is the budget that feeds
a prompt in one call (how the batcher worked before it scheduled: the joining prompt's
prefill is one iteration). Then: a lone 4096-token prompt's time to first token against
the full graph over the same 4096 tokens; the tokens/s of 32 generations against 1
(context 256, in-process); and one generation's cost per token at context 256 and 16000
through `runtime.generate` (the row step, as the servers) and through the decode step for
every token (as before). ORT's own MatMul rate is measured in the same run. Writes
scheduler_load.{json,md} to --out; nothing asserted.
`--smoke`: bsbr-tiny, 2 running, a 300-token join, budgets whole and 80, short contexts.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import lab
import numpy as np

from bsbr_export.defaults import DEFAULT_TOKEN_BUDGET
from bsbr_export.runtime.batching import Batcher
from bsbr_export.runtime.generate import load_generator
from bsbr_export.runtime.onnx import OnnxRunner
from bsbr_export.runtime.requests import DecodeState

WHOLE = 1 << 30  # a budget no prompt reaches: each prompt in one call
ROUNDS = 5  # of one generation's cost per token at each context


def step_gaps(batcher: Batcher, steps: int) -> list[float]:
    """Seconds of each of `steps` iterations (a running generation's inter-token gap)."""
    return [lab.timed(batcher.step) for _ in range(steps)]


def stall(export_dir: Path, budget: int, running: int, join: int, rng: np.random.Generator) -> dict:
    """`running` generations alone, then while a `join`-token prompt is prefilled."""
    batcher = Batcher(export_dir, threads=1, token_budget=budget)
    vocab = batcher.sequences.spec.tokens.high
    for _ in range(running):
        batcher.add(rng.integers(0, vocab, 256).tolist(), 100_000)
    batcher.step()  # their prompts (nothing was generating: each whole)
    # Two chunks of steps: generations started together close their chunks on the same step,
    # one batched decode call (the dearest iterations, every c-th), in both windows.
    alone = step_gaps(batcher, 2 * batcher.sequences.chunk_size)
    joining = batcher.add(rng.integers(0, vocab, join).tolist(), 2)
    during, begin = [], time.perf_counter()
    while not joining.ids:
        during += step_gaps(batcher, 1)
    ttft = time.perf_counter() - begin
    return {
        "budget": "whole" if budget == WHOLE else budget,
        "alone_p50_ms": 1e3 * statistics.median(alone),
        "alone_p99_ms": 1e3 * lab.percentile(alone, 0.99),
        "join_p50_ms": 1e3 * statistics.median(during),
        "join_p99_ms": 1e3 * lab.percentile(during, 0.99),
        "join_max_ms": 1e3 * max(during),
        "join_iterations": len(during),
        "join_ttft_s": ttft,
    }


def lone_prompt(export_dir: Path, rng: np.random.Generator, length: int = 4096) -> dict:
    """A lone prompt's time to first token (median of 5) beside the full graph's forward."""
    batcher = Batcher(export_dir, threads=1)
    vocab = batcher.sequences.spec.tokens.high
    prompt = rng.integers(0, vocab, length)
    full = OnnxRunner(export_dir / "model.onnx", threads=1)
    feeds = {"input_ids": prompt[None], "attention_mask": np.ones((1, length), np.int64)}
    full.infer(feeds)
    forwards, ttfts = [], []
    for _ in range(5):  # in turn, so a machine whose speed drifts moves both alike
        forwards.append(lab.timed(lambda: full.infer(feeds)))
        generation = batcher.add(prompt.tolist(), 1)
        ttfts.append(lab.timed(lambda g=generation: [batcher.step() for _ in range(3) if not g.ids]))
    return {"length": length, "ttft_s": statistics.median(ttfts), "forward_s": statistics.median(forwards)}


def many_vs_one(export_dir: Path, rng: np.random.Generator, many: int = 32, steps: int = 128) -> dict:
    """Tokens/s of `many` generations stepping together against one (context 256), over
    `steps` iterations (128: two chunks of 64, the closing tokens included)."""
    rates = {}
    for n in (1, many):
        batcher = Batcher(export_dir, threads=1)
        vocab = batcher.sequences.spec.tokens.high
        for _ in range(n):
            batcher.add(rng.integers(0, vocab, 256).tolist(), 100_000)
        batcher.step()
        gaps = step_gaps(batcher, steps)
        rates[n] = n * len(gaps) / sum(gaps)
    return {"one_tokens_s": rates[1], "many": many, "many_tokens_s": rates[many], "ratio": rates[many] / rates[1]}


def per_token(
    export_dir: Path, rng: np.random.Generator, contexts=(256, 16000), tokens: int = 256, rounds: int = ROUNDS
) -> dict:
    """One generation's mean seconds per token over `tokens` tokens (four chunks, their
    closing tokens included) at each context, after one chunk's warm-up (ORT sizes its
    buffers at the first call of a shape): through `runtime.generate` (the batcher's path:
    the row step, the decode step at chunk ends) and through the decode step for every
    token (how it generated before). The median of `rounds` rounds, each taking the
    contexts in turn, so a machine whose speed drifts moves every context alike."""
    generator = load_generator(export_dir, threads=1)
    taken = {context: {"generate_ms": [], "decode_ms": []} for context in contexts}
    for _ in range(rounds):
        for context in contexts:
            for path, ms in _per_token_once(generator, context, tokens, rng).items():
                taken[context][path].append(ms)
    return {context: {path: statistics.median(ms) for path, ms in paths.items()} for context, paths in taken.items()}


def _per_token_once(generator, context: int, tokens: int, rng: np.random.Generator) -> dict:
    decode = generator.batcher.sequences.decode_runner
    c = generator.spec.chunk_size
    prompt = rng.integers(0, generator.vocab_size, context).tolist()
    made = generator.generate(prompt, 1 + c + tokens, stream=True)
    for _ in range(1 + c):  # the prompt's call, then a chunk of warm-up
        next(made)
    rows = lab.timed(lambda t=made: [None for _ in t]) / tokens
    state = DecodeState(generator.spec)
    state.advance(decode.infer({"input_ids": np.array([prompt]), **state.past}))
    for i, token in enumerate(rng.integers(0, generator.vocab_size, c + tokens)):
        if i == c:
            begin = time.perf_counter()
        state.advance(decode.infer({"input_ids": np.array([[token]]), **state.past}))
    return {"generate_ms": 1e3 * rows, "decode_ms": 1e3 * (time.perf_counter() - begin) / tokens}


def report(result: dict) -> str:
    machine = result["machine"]
    lines = [
        *lab.heading(f"Scheduler: {result['model']}, one process, one ORT thread", machine),
        "One run; each figure is a median or a percentile of the iterations named.",
        "",
        f"## A {result['join']}-token prompt joining {result['running']} running generations",
        "",
        "Inter-token gap of the running generations (one iteration of `Batcher.step`), alone (two chunks of "
        "steps, their own chunk-closing steps among them) and while the prompt is prefilled, and the prompt's "
        "time to first token. `whole`: the prompt fed in one call (the batcher before it scheduled).",
        "",
    ]
    lines += lab.table(
        ["token budget", "alone p50 ms", "alone p99 ms", "joining p50 ms", "joining p99 ms", "joining max ms"]
        + ["p50 joining / alone", "p99 joining / alone", "iterations", "TTFT s"],
        (
            [row["budget"], *(f"{row[k]:.2f}" for k in ("alone_p50_ms", "alone_p99_ms", "join_p50_ms", "join_p99_ms"))]
            + [f"{row['join_max_ms']:.1f}", f"{row['join_p50_ms'] / row['alone_p50_ms']:.1f}x"]
            + [f"{row['join_p99_ms'] / row['alone_p99_ms']:.1f}x"]
            + [row["join_iterations"], f"{row['join_ttft_s']:.2f}"]
            for row in result["stall"]
        ),
    )
    lone, many, per = result["lone"], result["many_vs_one"], result["per_token"]
    low, high = sorted(per, key=int)[0], sorted(per, key=int)[-1]
    first, last = per[low], per[high]
    lines += [
        "",
        "## Alone, and many at once",
        "",
        f"- A lone {lone['length']}-token prompt: time to first token {lone['ttft_s'] * 1e3:.0f} ms against "
        f"{lone['forward_s'] * 1e3:.0f} ms for the full graph over the same tokens: "
        f"**{lone['ttft_s'] / lone['forward_s']:.2f}x** (target <= 1.1x).",
        f"- {many['many']} generations: {many['many_tokens_s']:.0f} tokens/s against "
        f"{many['one_tokens_s']:.0f} for one: "
        f"**{many['ratio']:.1f}x** (context 256, in-process; target through a server >= 8x).",
        "- One generation's cost per token (mean of 256 tokens after a chunk's warm-up, closing tokens "
        f"included; median of {ROUNDS} rounds, the contexts in turn): "
        + "; ".join(
            f"context {k}: runtime.generate {v['generate_ms']:.2f} ms, the decode step alone {v['decode_ms']:.2f} ms"
            for k, v in sorted(per.items(), key=lambda kv: int(kv[0]))
        )
        + f"; {high} / {low}: runtime.generate **{last['generate_ms'] / first['generate_ms']:.2f}x** (target <= "
        f"1.05x), the decode step alone **{last['decode_ms'] / first['decode_ms']:.2f}x**.",
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = lab.parser(__doc__, model="bsbr-stdlib", export="measure (with --streaming)")
    parser.add_argument("--running", type=int, default=16)
    parser.add_argument("--join", type=int, default=16384)
    parser.add_argument("--budgets", default=f"whole,80,{DEFAULT_TOKEN_BUDGET},256,512")
    parser.add_argument("--contexts", default="256,16000", help="one generation's contexts for its cost per token")
    parser.add_argument("--lone", type=int, default=4096, help="the lone prompt's length")
    args = parser.parse_args()
    many, steps, tokens = 32, 128, 256
    if args.smoke:
        args.model, args.running, args.join, args.lone = "bsbr-tiny", 2, 300, 100
        args.budgets, args.contexts = "whole,80", "70,200"
        many, steps, tokens = 3, 8, 40
    export_dir = lab.streaming_export(args.model, args.export, "scheduler_load")
    if len(os.sched_getaffinity(0)) > 1:  # after the export: torch's threads on one core spin for minutes
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # a server's core of its own
    rng = np.random.default_rng(0)
    budgets = [WHOLE if b == "whole" else int(b) for b in args.budgets.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    result = {
        "model": json.loads((export_dir / "manifest.json").read_text())["model"],
        "running": args.running,
        "join": args.join,
        "machine": lab.machine(threads=1),
        "stall": [lab.progress(f"budget {b}", stall, export_dir, b, args.running, args.join, rng) for b in budgets],
        "lone": lab.progress("lone prompt", lone_prompt, export_dir, rng, args.lone),
        "many_vs_one": lab.progress(f"{many} against 1", many_vs_one, export_dir, rng, many, steps),
        "per_token": lab.progress("per token", per_token, export_dir, rng, contexts, tokens),
    }
    lab.write(args.out, "scheduler_load", result, report)


if __name__ == "__main__":
    main()
