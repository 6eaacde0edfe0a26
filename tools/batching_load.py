"""In-flight batching, measured: aggregate tokens/s and inter-token latency against the
number of concurrent generations and their context, beside one generation on the decode
graph called directly, for several models side by side in one run.

    python tools/batching_load.py [--models bsbr-small,bsbr-stdlib | --export DIR] [--concurrency 1,4,16,32]
        [--contexts 256,4096,16384] [--tokens 32] [--threads 2] [--out tools/results] [--smoke]

Each model is exported (ONNX, streaming: model.rows.onnx + model.decode.onnx) into a work
folder kept between runs (/tmp/bsbr_batching_load/MODEL) and measured in a process of its
own. For every (context, concurrency): that many
generations start with a random prompt of `context` tokens (prefill, not timed), then
`tokens` iterations of `runtime.batching.Batcher.step` advance all of them together
(greedy); tokens/s is every generated token over the time of those iterations, and
inter-token latency is one iteration's time (what each generation waits per token), p50
and p99. The baseline is one generation through `runtime.generate` (the decode graph
called directly, one call per token) at the same context. ORT's own float32 MatMul rate
on this machine is measured in the same run. Writes batching_load.json and .md to --out.
No number is asserted. `--smoke`: bsbr-tiny, 1 and 2 generations, contexts 20 and 40, 4 tokens.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import lab


def measure_model(export_dir: str, concurrency: list[int], contexts: list[int], tokens: int, threads: int) -> dict:
    """Child process: time the batcher and the single-sequence baseline on `export_dir`."""
    import numpy as np

    from bsbr_export.runtime.batching import load_batcher
    from bsbr_export.runtime.generate import load_generator

    model = json.loads((Path(export_dir) / "manifest.json").read_text())["model"]
    generator = load_generator(export_dir, threads=threads)
    vocab = generator.vocab_size
    rows = []
    for context in contexts:
        rng = np.random.default_rng(context)
        alone = generator.generate(rng.integers(0, vocab, context).tolist(), tokens + 1)
        single_ms = statistics.median(alone.token_seconds) * 1e3
        for n in concurrency:
            batcher = load_batcher(export_dir, threads=threads)
            for _ in range(n):
                batcher.add(rng.integers(0, vocab, context).tolist(), tokens + 1)
            steps = [lab.timed(batcher.step) for _ in range(tokens)]
            rows.append(
                {
                    "context": context,
                    "concurrency": n,
                    "tokens_per_s": n * tokens / sum(steps),
                    "p50_ms": statistics.median(steps) * 1e3,
                    "p99_ms": lab.percentile(steps, 0.99) * 1e3,
                    "single_decode_ms": single_ms,
                }
            )
            print(
                f"{model} context {context} x {n}: {rows[-1]['tokens_per_s']:.0f} tokens/s, "
                f"p50 {rows[-1]['p50_ms']:.2f} ms (decode alone {single_ms:.2f} ms)",
                file=sys.stderr,
            )
    return {"model": model, "rows": rows}


def report(result: dict) -> str:
    machine, tokens, threads = result["machine"], result["tokens"], result["threads"]
    lines = [
        *lab.heading("In-flight batching: tokens/s and inter-token latency vs concurrent generations", machine),
        f"{threads} ORT threads. Greedy, {tokens} timed tokens per generation after a prefill of `context` "
        "random tokens; client and model in one process (runtime.batching.Batcher), each model in a process "
        "of its own.",
        "",
    ]
    for model in result["results"]:
        one = {r["context"]: r["tokens_per_s"] for r in model["rows"] if r["concurrency"] == 1}
        lines += [f"## {model['model']}", ""]
        lines += lab.table(
            ["context", "generations", "tokens/s", "vs one", "p50 ms/token", "p99 ms/token"]
            + ["decode alone ms", "p50 / decode alone"],
            (
                [
                    r["context"],
                    r["concurrency"],
                    f"{r['tokens_per_s']:.0f}",
                    f"{r['tokens_per_s'] / one[r['context']]:.1f}x",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    f"{r['single_decode_ms']:.2f}",
                    f"{r['p50_ms'] / r['single_decode_ms']:.2f}",
                ]
                for r in model["rows"]
            ),
        )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = lab.parser(__doc__, models="bsbr-small,bsbr-stdlib", export="measure (with --streaming)")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--contexts", default="256,4096,16384")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.smoke:
        args.models, args.concurrency, args.contexts, args.tokens = "bsbr-tiny", "1,2", "20,40", 4
    concurrency = [int(x) for x in args.concurrency.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    exports = (
        [args.export]
        if args.export
        else [lab.streaming_export(m, None, "batching_load") for m in args.models.split(",")]
    )
    results = [
        lab.progress(
            str(export), lab.in_child, measure_model, str(export), concurrency, contexts, args.tokens, args.threads
        )
        for export in exports
    ]
    result = {
        "machine": lab.machine(threads=args.threads),
        "tokens": args.tokens,
        "threads": args.threads,
        "results": results,
    }
    lab.write(args.out, "batching_load", result, report)


if __name__ == "__main__":
    main()
