"""Streaming decode through a real tritonserver: throughput and per-token latency vs
concurrent sequences and context length.

    python tools/serve_load.py [--model bsbr-small] [--triton-env .venv-triton]
        [--concurrency 1,2,4,8,16] [--contexts 256,512,1024,2048,4096,8192] [--tokens 32]
        [--protocol grpc] [--export DIR] [--out tools/results] [--smoke]

Exports MODEL (ONNX, streaming) into a work folder kept between runs
(/tmp/bsbr_serve_load/MODEL), writes its --triton-repo into a temp dir, serves it with
`bsbr_export.serve.serve.TritonServer` (the nvidia-pytriton wheel, 127.0.0.1 only) and, for
every (context, concurrency): opens that many sequences at once, each with a random
prompt of `context` tokens (prefill, not counted), then every sequence sends `tokens`
one-token requests as fast as its answers come. Throughput is all those tokens over the
wall time of that phase; latency is each request's round trip (client to model.py and
back, queueing behind the other sequences included) as p50 and p99. Every sequence ends
with sequence_end. ORT's own float32 MatMul rate is measured in the same run, before the
server starts. Writes serve_load_<model>.json and .md to --out. No number is asserted.
`--smoke`: bsbr-tiny, 1 and 2 sequences, contexts 20 and 40, 4 tokens.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import lab
import numpy as np


def run_cell(
    server, protocol: str, model: str, vocab: int, context: int, concurrency: int, tokens: int, first_id: int
) -> dict:
    """One (context, concurrency) cell: prefill every sequence, then time `tokens` steps each."""
    if protocol == "grpc":
        import tritonclient.grpc as client
    else:
        import tritonclient.http as client

    url = server.grpc_url if protocol == "grpc" else server.http_url
    barrier = threading.Barrier(concurrency + 1)
    rng = np.random.default_rng(context * 100 + concurrency)
    prompts = [rng.integers(0, vocab, (1, context)) for _ in range(concurrency)]

    def infer(connection, sequence: int, ids: np.ndarray, start: bool, end: bool) -> np.ndarray:
        tensor = client.InferInput("input_ids", list(ids.shape), "INT64")
        tensor.set_data_from_numpy(ids)
        result = connection.infer(
            model,
            [tensor],
            outputs=[client.InferRequestedOutput("logits")],
            sequence_id=sequence,
            sequence_start=start,
            sequence_end=end,
        )
        return result.as_numpy("logits")

    def sequence(index: int) -> list[float]:
        connection = client.InferenceServerClient(url)
        sequence_id = first_id + index
        token = int(infer(connection, sequence_id, prompts[index], True, False)[0, -1].argmax())
        barrier.wait()  # every sequence prefilled: the timed phase starts together
        latencies = []
        for i in range(tokens):
            start = time.perf_counter()
            logits = infer(connection, sequence_id, np.array([[token]], dtype=np.int64), False, i == tokens - 1)
            latencies.append(time.perf_counter() - start)
            if logits.shape != (1, 1, vocab) or not np.isfinite(logits).all():
                raise RuntimeError(f"sequence {sequence_id}: bad logits {logits.shape}")
            token = int(logits[0, -1].argmax())
        return latencies

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(sequence, i) for i in range(concurrency)]
        barrier.wait()
        start = time.perf_counter()
        latencies = [s for f in futures for s in f.result()]
        wall = time.perf_counter() - start
    return {
        "context": context,
        "concurrency": concurrency,
        "tokens_per_sequence": tokens,
        "tokens_per_s": concurrency * tokens / wall,
        "p50_ms": lab.percentile(latencies, 0.5) * 1e3,
        "p99_ms": lab.percentile(latencies, 0.99) * 1e3,
        "wall_s": wall,
    }


def report(result: dict) -> str:
    machine, cells = result["machine"], result["cells"]
    lines = [
        *lab.heading(
            f"Triton serving load: {result['model']}_streaming_python ({result['protocol']}, one model instance)",
            machine,
        ),
        f"Server ready in {result['server_start_s']:.2f} s; healthy after the run: {result['healthy_after']}. "
        f"{result['tokens']} timed one-token requests per sequence after a prefill of `context` tokens.",
        *(["", f"Note: {result['note']}"] if result["note"] else []),
        "",
        "| context | sequences | tokens/s | p50 ms/token | p99 ms/token |",
        "|---|---|---|---|---|",
        *(
            f"| {c['context']} | {c['concurrency']} | {c['tokens_per_s']:.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} |"
            for c in cells
        ),
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = lab.parser(__doc__, model="bsbr-small", export="serve (with --streaming)")
    parser.add_argument("--triton-env", default=os.environ.get("BSBR_TRITON_ENV", ".venv-triton"))
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--contexts", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--tokens", type=int, default=32, help="timed one-token requests per sequence")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--note", default="", help="a line for the report (e.g. that the machine was loaded)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.concurrency, args.contexts, args.tokens = "bsbr-tiny", "1,2", "20,40", 4
    concurrency = [int(v) for v in args.concurrency.split(",")]
    contexts = [int(v) for v in args.contexts.split(",")]

    from bsbr_export.serve.serve import TritonServer, find_env
    from bsbr_export.serve.triton import write_triton_repo

    env = find_env(args.triton_env)
    export = lab.streaming_export(args.model, args.export, "serve_load")
    vocab = json.loads((export / "manifest.json").read_text())["config"]["vocab_size"]
    # The server's ORT sessions take ORT's default, a thread per core (write_triton_repo's threads=0).
    machine = lab.machine(threads=os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        repo = write_triton_repo(export, Path(tmp) / "models", args.model)
        with TritonServer(repo, env, http_port=0, grpc_port=0) as server:
            print(f"tritonserver ready in {server.start_seconds:.2f}s", flush=True)
            # Warm-up (not recorded): the first requests pay for ORT's and Triton's lazy setup.
            run_cell(server, args.protocol, f"{args.model}_streaming_python", vocab, contexts[0], 1, 8, 1)
            cells, first_id = [], 2
            for context in contexts:
                for n in concurrency:
                    cell = run_cell(
                        server,
                        args.protocol,
                        f"{args.model}_streaming_python",
                        vocab,
                        context,
                        n,
                        args.tokens,
                        first_id,
                    )
                    first_id += n
                    cells.append(cell)
                    print(
                        f"context {context:5d} x {n:2d} sequences: {cell['tokens_per_s']:7.1f} tokens/s, "
                        f"p50 {cell['p50_ms']:6.2f} ms, p99 {cell['p99_ms']:6.2f} ms",
                        flush=True,
                    )
            healthy = server.healthy()
            start_seconds = server.start_seconds

    result = {
        "model": args.model,
        "protocol": args.protocol,
        "machine": machine,
        "note": args.note,
        "tokens": args.tokens,
        "server_start_s": start_seconds,
        "healthy_after": healthy,
        "cells": cells,
    }
    lab.write(args.out, f"serve_load_{args.model}", result, report)


if __name__ == "__main__":
    main()
