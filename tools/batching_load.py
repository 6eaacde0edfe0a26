"""In-flight batching, measured: aggregate tokens/s and inter-token latency against the
number of concurrent generations and their context, beside one generation on the decode
graph called directly, for several models side by side in one run.

    python tools/batching_load.py [--models bsbr-small,bsbr-stdlib] [--concurrency 1,4,16,32]
        [--contexts 256,4096,16384] [--tokens 32] [--threads 2] [--out tools/results]

Each model is exported (ONNX, streaming: model.rows.onnx + model.decode.onnx) into a temp
dir and measured in a process of its own. For every (context, concurrency): that many
generations start with a random prompt of `context` tokens (prefill, not timed), then
`tokens` iterations of `runtime.batching.Batcher.step` advance all of them together
(greedy); tokens/s is every generated token over the wall time of those iterations, and
inter-token latency is one iteration's time (what each generation waits per token), p50
and p99. The baseline is one generation through `runtime.generate` (the decode graph
called directly, one call per token) at the same context. ORT's own float32 MatMul rate
on this machine is measured in the same run (tools/sweep.py's one-node graph). Writes
batching_load.json and .md to --out. No number is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweep import matmul_rate, percentile


def measure_model(model: str, concurrency: list[int], contexts: list[int], tokens: int, threads: int) -> dict:
    """Child process: export `model`, then time the batcher and the single-sequence baseline."""
    import numpy as np

    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS
    from bsbr_export.runtime.batching import load_batcher
    from bsbr_export.runtime.generate import load_generator

    out = Path(tempfile.mkdtemp(prefix="batching-")) / model
    started = time.perf_counter()
    export_model(model, out, [FORMATS["onnx"]], streaming=True)
    export_seconds = time.perf_counter() - started
    generator = load_generator(out, threads=threads)
    vocab = generator.vocab_size
    rows = []
    for context in contexts:
        rng = np.random.default_rng(context)
        alone = generator.generate(rng.integers(0, vocab, context).tolist(), tokens + 1)
        single_ms = statistics.median(alone.token_seconds) * 1e3
        for n in concurrency:
            batcher = load_batcher(out, threads=threads)
            for _ in range(n):
                batcher.add(rng.integers(0, vocab, context).tolist(), tokens + 1)
            steps = []
            start = time.perf_counter()
            for _ in range(tokens):
                begin = time.perf_counter()
                batcher.step()
                steps.append(time.perf_counter() - begin)
            wall = time.perf_counter() - start
            rows.append(
                {
                    "context": context,
                    "concurrency": n,
                    "tokens_per_s": n * tokens / wall,
                    "p50_ms": statistics.median(steps) * 1e3,
                    "p99_ms": percentile(steps, 0.99) * 1e3,
                    "single_decode_ms": single_ms,
                }
            )
            print(
                f"{model} context {context} x {n}: {rows[-1]['tokens_per_s']:.0f} tokens/s, "
                f"p50 {rows[-1]['p50_ms']:.2f} ms (decode alone {single_ms:.2f} ms)",
                file=sys.stderr,
            )
    return {"model": model, "export_seconds": export_seconds, "rows": rows}


def report(results: list[dict], machine: dict, tokens: int, threads: int) -> str:
    lines = [
        "# In-flight batching: tokens/s and inter-token latency vs concurrent generations",
        "",
        f"CPU: {machine['processor']}, {machine['cores']} cores; {threads} ORT threads; "
        f"ORT float32 MatMul {machine['matmul_gflops']:.0f} GFLOP/s ([4096, 256] x [256, 1024], same run). "
        f"Greedy, {tokens} timed tokens per generation after a prefill of `context` random tokens; client "
        "and model in one process (runtime.batching.Batcher), each model in a process of its own.",
        "",
    ]
    for result in results:
        lines += [
            f"## {result['model']}",
            "",
            "| context | generations | tokens/s | vs one | p50 ms/token | p99 ms/token | decode alone ms | "
            "p50 / decode alone |",
            "|---|---|---|---|---|---|---|---|",
        ]
        one = {r["context"]: r["tokens_per_s"] for r in result["rows"] if r["concurrency"] == 1}
        for r in result["rows"]:
            lines.append(
                f"| {r['context']} | {r['concurrency']} | {r['tokens_per_s']:.0f} | "
                f"{r['tokens_per_s'] / one[r['context']]:.1f}x | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['single_decode_ms']:.2f} | {r['p50_ms'] / r['single_decode_ms']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bsbr-small,bsbr-stdlib")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--contexts", default="256,4096,16384")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    concurrency = [int(x) for x in args.concurrency.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    if args.child:
        print(json.dumps(measure_model(args.child, concurrency, contexts, args.tokens, args.threads)))
        return
    from bsbr_export.machine import cpu_model

    results = []
    for model in args.models.split(","):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                model,
                "--concurrency",
                args.concurrency,
                "--contexts",
                args.contexts,
                "--tokens",
                str(args.tokens),
                "--threads",
                str(args.threads),
            ],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    machine = {
        "processor": cpu_model() or platform.processor(),
        "cores": os.cpu_count(),
        "matmul_gflops": matmul_rate(256, args.threads),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching_load.json").write_text(
        json.dumps({"machine": machine, "tokens": args.tokens, "threads": args.threads, "results": results}, indent=2)
    )
    (args.out / "batching_load.md").write_text(report(results, machine, args.tokens, args.threads))
    print(report(results, machine, args.tokens, args.threads))


if __name__ == "__main__":
    main()
