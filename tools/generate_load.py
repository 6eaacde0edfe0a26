"""Serving many users at once, measured through a real tritonserver: the generate model
(in-flight batching) under concurrent gRPC streams, NVIDIA's perf_analyzer against the
step model, and the same graphs called directly, several models side by side in one run.

    python tools/generate_load.py [--models bsbr-small,bsbr-stdlib | --export DIR] [--concurrency 1,4,16,32,64]
        [--contexts 256,4096,16384] [--tokens 64] [--perf-analyzer DIR] [--out tools/results] [--smoke]

Cores: the server (tritonserver, its Python-backend stubs, their ORT threads) is pinned to
core 0 and every client (this process's gRPC streams, perf_analyzer) to core 1, with
`taskset`; the direct references run alone on core 0 in a process of their own, one ORT
thread, as the server's model has one core. Each model is exported (ONNX, streaming) into a
work folder kept between runs (/tmp/bsbr_generate_load/MODEL). Per model:

- direct: the decode graph called once per token (`runtime.generate`, median ms/token at
  each context), the full graph over a 4096-token prompt (median of 5), and one in-process
  `Batcher.step` split into its parts (the row-step graph call, the rest of
  `Sequences.feed`: gathering caches and writing rows back, and sampling) at each
  concurrency, context 256;
- generate: for every (context, concurrency), that many gRPC streams start at once, each a
  random prompt of `context` tokens and `--tokens` new ones (greedy). Time to first token
  (p50 over the streams), inter-token latency (gaps between one stream's responses, p50
  and p99) and aggregate tokens/s are taken in the window where every stream is past its
  first token and none has ended (all of them running together);
- perf_analyzer (the tritonclient 2.41.0 wheel's binary, see `--perf-analyzer`) drives the
  step model with sequences of 64 one-token requests at concurrency 1, 4, 16 and 64.

ORT's own float32 MatMul rate is measured on core 0 in the same run. Writes
generate_load.json and .md to --out. No number is asserted; the issue's targets are
checked in the report. `--smoke`: bsbr-tiny, 1 and 2 streams, contexts 20 and 40, 8 tokens.

perf_analyzer: `--perf-analyzer DIR` is a directory with `perf_analyzer` and
`libcudart.so.12` (it links against it, without a GPU). Make one with:

    pip download --no-deps tritonclient==2.41.0 nvidia-cuda-runtime-cu12 -d /tmp/pa
    (cd /tmp/pa && unzip -jo 'tritonclient-*.whl' '*/bin/perf_analyzer' \\
        && unzip -jo 'nvidia_cuda_runtime*.whl' '*/libcudart.so.12')
    apt-get install libb64-0d   # Debian
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lab
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

SERVER_CORE, CLIENT_CORE = 0, 1


def pin_group(pgid: int, core: int) -> None:
    """Every thread of every process in process group `pgid` onto `core`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # the process group id
            subprocess.run(["taskset", "-a", "-cp", str(core), stat.parent.name], capture_output=True, check=False)


# ---- the direct references (their own process, core 0) --------------------------------


def direct(export_dir: str, contexts: list[int], concurrency: list[int], tokens: int) -> dict:
    """Child: the decode graph per token, the full graph at 4096, and a Batcher step's parts."""
    from bsbr_export.runtime.batching import Batcher
    from bsbr_export.runtime.generate import load_generator
    from bsbr_export.runtime.onnx import OnnxRunner

    generator = load_generator(export_dir, threads=1)
    vocab = generator.vocab_size
    rng = np.random.default_rng(0)
    decode_ms = {}
    for context in contexts:
        alone = generator.generate(rng.integers(0, vocab, context).tolist(), tokens + 1)
        decode_ms[context] = statistics.median(alone.token_seconds) * 1e3
    full = OnnxRunner(Path(export_dir) / "model.onnx", threads=1)
    ids = rng.integers(0, vocab, (1, 4096))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    full.infer(feeds)
    full_ms = statistics.median(lab.timed(lambda: full.infer(feeds)) for _ in range(5)) * 1e3
    parts = []
    for n in concurrency:
        batcher = Batcher(export_dir, threads=1)
        for _ in range(n):
            batcher.add(rng.integers(0, vocab, 256).tolist(), 10 * tokens)
        sequences = batcher.sequences
        graph, feed, step = [], [], []
        for _ in range(tokens):
            keys = list(sequences.order)
            if all(sequences.position(k) % sequences.chunk_size != sequences.chunk_size - 1 for k in keys):
                rows = sequences.rows_runner
                probe = {name: pool[:n] for name, pool in sequences.pool.items()}
                probe |= {
                    "input_ids": np.zeros((n, 1), np.int64),
                    "positions": np.array([sequences.position(k) for k in keys], np.int64),
                }
                graph.append(lab.timed(lambda rows=rows, probe=probe: rows.infer(probe)))
            original = sequences.feed
            sequences.feed = lambda tokens_, original=original, feed=feed: _timed(feed, original, tokens_)
            step.append(lab.timed(batcher.step))
            sequences.feed = original
        parts.append(
            {
                "concurrency": n,
                "graph_ms": statistics.median(graph) * 1e3,
                "feed_ms": statistics.median(feed) * 1e3,
                "step_ms": statistics.median(step) * 1e3,
            }
        )
    return {"decode_ms": decode_ms, "full_4096_ms": full_ms, "step_parts": parts}


def _timed(into: list, call, *args):
    """`call(*args)`, its seconds appended to `into` (for a call made inside another one)."""
    begin = time.perf_counter()
    result = call(*args)
    into.append(time.perf_counter() - begin)
    return result


# ---- the generate model under concurrent streams --------------------------------------


def stream(url: str, model: str, prompt: np.ndarray, tokens: int, barrier: threading.Barrier) -> list[float]:
    """One gRPC stream: the arrival time of each response (perf_counter seconds)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error, time.perf_counter())))
    ids = grpcclient.InferInput("input_ids", [len(prompt)], "INT64")
    ids.set_data_from_numpy(prompt.astype(np.int64))
    count = grpcclient.InferInput("max_tokens", [1], "INT32")
    count.set_data_from_numpy(np.array([tokens], np.int32))
    barrier.wait()
    start = time.perf_counter()
    client.async_stream_infer(model, [ids, count])
    times = [start]
    try:
        while len(times) <= tokens:
            result, error, at = responses.get(timeout=600)
            if error is not None:
                raise RuntimeError(str(error))
            times.append(at)
    finally:
        client.stop_stream()
        client.close()
    return times


def generate_cell(url: str, model: str, vocab: int, context: int, n: int, tokens: int) -> dict:
    rng = np.random.default_rng(context * 1000 + n)
    barrier = threading.Barrier(n)
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(stream, url, model, rng.integers(0, vocab, context), tokens, barrier) for _ in range(n)]
        runs = [f.result() for f in futures]
    # The window where all n run together: after the last first token, before the first end.
    begin, end = max(r[1] for r in runs), min(r[-1] for r in runs)
    gaps = [b - a for r in runs for a, b in zip(r[1:], r[2:]) if a >= begin and b <= end]
    made = sum(1 for r in runs for t in r[2:] if begin < t <= end)
    return {
        "context": context,
        "concurrency": n,
        "ttft_p50_ms": statistics.median(r[1] - r[0] for r in runs) * 1e3,
        "itl_p50_ms": lab.percentile(gaps, 0.5) * 1e3,
        "itl_p99_ms": lab.percentile(gaps, 0.99) * 1e3,
        "tokens_per_s": made / (end - begin) if end > begin else float("nan"),
        "window_tokens": made,
    }


# ---- perf_analyzer against the step model ----------------------------------------------


def perf_analyzer(tool: Path, url: str, model: str, vocab: int, concurrency: list[int], work: Path) -> list[dict]:
    data = work / "input_ids.json"
    data.write_text(json.dumps({"data": [{"input_ids": [int(i)]} for i in range(min(vocab, 64))]}))
    rows = []
    for n in concurrency:
        report = work / f"pa_{n}.csv"
        command = [
            "taskset",
            "-c",
            str(CLIENT_CORE),
            str(tool / "perf_analyzer"),
            "-m",
            model,
            "-i",
            "grpc",
            "-u",
            url,
            "--input-data",
            str(data),
            "--shape",
            "input_ids:1",
            "--sequence-length",
            "64",
            "--concurrency-range",
            f"{n}:{n}",
            "--measurement-interval",
            "4000",
            "--stability-percentage",
            "25",
            "--max-trials",
            "6",
            "-f",
            str(report),
        ]
        env = {**os.environ, "LD_LIBRARY_PATH": f"{tool}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0 or not report.is_file():
            rows.append({"concurrency": n, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]})
            continue
        with open(report) as file:
            row = next(csv.DictReader(file))
        rows.append(
            {
                "concurrency": n,
                "tokens_per_s": float(row["Inferences/Second"]),
                "p50_ms": float(row["p50 latency"]) / 1e3,
                "p99_ms": float(row["p99 latency"]) / 1e3,
            }
        )
        print(
            f"  perf_analyzer x{n}: {rows[-1]['tokens_per_s']:.0f} tokens/s, p99 {rows[-1]['p99_ms']:.1f} ms",
            file=sys.stderr,
        )
    return rows


# ---- one model, then the report ----------------------------------------------------------


def measure(export_dir: Path, args, triton_env) -> dict:
    """One model: the direct references in a child process alone on core 0, then the
    generate model (and perf_analyzer) through a tritonserver on core 0."""
    from bsbr_export.serve.serve import TritonServer
    from bsbr_export.serve.triton import write_triton_repo

    manifest = json.loads((export_dir / "manifest.json").read_text())
    model, vocab = manifest["model"], manifest["spec"]["inputs"][0]["high"]
    contexts = [int(c) for c in args.contexts.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    os.sched_setaffinity(0, {SERVER_CORE})  # the child inherits core 0
    reference = lab.in_child(direct, str(export_dir), contexts, concurrency, args.tokens)
    print(f"{model}: direct {reference}", file=sys.stderr)
    result = {"model": model, "direct": reference, "generate": [], "perf_analyzer": []}
    with tempfile.TemporaryDirectory(prefix="generate-load-") as tmp:
        work = Path(tmp)
        # One core for the server; state for 64 generations at 16384 tokens (4.4 GB) allowed.
        repo = write_triton_repo(export_dir, work / "models", model, threads=1, max_state_bytes=16 << 30)
        with TritonServer(repo, triton_env, http_port=0, grpc_port=0) as server:
            pin_group(server.pid, SERVER_CORE)
            os.sched_setaffinity(0, {CLIENT_CORE})
            for context in contexts:
                for n in concurrency:
                    cell = generate_cell(server.grpc_url, f"{model}_generate", vocab, context, n, args.tokens)
                    result["generate"].append(cell)
                    print(
                        f"  generate {context} x {n}: {cell['tokens_per_s']:.0f} tokens/s, itl p50 "
                        f"{cell['itl_p50_ms']:.2f} p99 {cell['itl_p99_ms']:.2f} ms, ttft {cell['ttft_p50_ms']:.1f} ms",
                        file=sys.stderr,
                    )
            if args.perf_analyzer:
                result["perf_analyzer"] = perf_analyzer(
                    args.perf_analyzer, server.grpc_url, f"{model}_streaming_python", vocab, [1, 4, 16, 64], work
                )
            result["healthy_after"] = server.healthy()
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return result


def targets(result: dict) -> list[tuple[str, str, bool]]:
    """The issue's targets: (what, measured, met)."""
    cells = {(c["context"], c["concurrency"]): c for c in result["generate"]}
    direct_ = result["direct"]
    rows = []
    if (256, 1) in cells and (256, 32) in cells:
        ratio = cells[256, 32]["tokens_per_s"] / cells[256, 1]["tokens_per_s"]
        rows.append(("tokens/s at 32 concurrent >= 8x one (context 256)", f"{ratio:.1f}x", ratio >= 8))
    if (256, 1) in cells:
        ratio = cells[256, 1]["itl_p50_ms"] / direct_["decode_ms"]["256"]
        rows.append(
            (
                "one generation's inter-token latency <= 1.5x the decode graph direct (256)",
                f"{ratio:.2f}x",
                ratio <= 1.5,
            )
        )
    if (256, 32) in cells:
        p99 = cells[256, 32]["itl_p99_ms"]
        rows.append(("inter-token p99 at 32 concurrent <= 50 ms (256)", f"{p99:.1f} ms", p99 <= 50))
    if (16384, 1) in cells and (256, 1) in cells:
        ratio = cells[16384, 1]["itl_p50_ms"] / cells[256, 1]["itl_p50_ms"]
        rows.append(("per-token cost at 16384 <= 1.1x at 256 (one generation)", f"{ratio:.2f}x", ratio <= 1.1))
    if (4096, 1) in cells:
        ratio = cells[4096, 1]["ttft_p50_ms"] / direct_["full_4096_ms"]
        rows.append(
            ("time to first token, 4096-token prompt <= 1.5x the full forward at 4096", f"{ratio:.2f}x", ratio <= 1.5)
        )
    return rows


def report(result: dict) -> str:
    machine = result["machine"]
    lines = [
        *lab.heading("Serving many users at once: the generate model through tritonserver", machine),
        f"Server (tritonserver + stubs + ORT, 1 thread per session) pinned to core {SERVER_CORE}, clients "
        f"(gRPC streams, perf_analyzer) to core {CLIENT_CORE}; direct references alone on core {SERVER_CORE}, "
        f"1 ORT thread. Greedy, {result['tokens']} new tokens per generation; latency and tokens/s taken while "
        "all streams of a cell run together.",
        "",
    ]
    empty = sorted(
        {(c["context"], c["concurrency"]) for m in result["results"] for c in m["generate"] if not c["window_tokens"]}
    )
    if empty:  # their figures are nan: the first streams ended before the last one's first token
        cells = ", ".join(f"context {context} x {n}" for context, n in empty)
        lines += [f"⚠ no moment when all streams ran together in {cells}: `nan` there; rerun with more --tokens.", ""]
    for model in result["results"]:
        d = model["direct"]
        one = {c["context"]: c["tokens_per_s"] for c in model["generate"] if c["concurrency"] == 1}
        lines += [f"## {model['model']}", ""]
        lines += lab.table(
            ["context", "streams", "tokens/s", "vs one", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms", "decode direct ms"],
            (
                [
                    c["context"],
                    c["concurrency"],
                    f"{c['tokens_per_s']:.0f}",
                    f"{c['tokens_per_s'] / one[c['context']]:.1f}x",
                    f"{c['ttft_p50_ms']:.1f}",
                    f"{c['itl_p50_ms']:.2f}",
                    f"{c['itl_p99_ms']:.2f}",
                    f"{d['decode_ms'][str(c['context'])]:.2f}",
                ]
                for c in model["generate"]
            ),
        )
        lines += [
            "",
            f"Full graph over a 4096-token prompt, direct: {d['full_4096_ms']:.1f} ms.",
            "",
            "Where an in-process `Batcher.step` goes (context 256, direct, 1 thread): the row-step graph "
            "call, the rest of `Sequences.feed` (gather caches, write rows back, chunk-closing decode calls), "
            "the rest of the step (sampling, bookkeeping); the served ITL adds Triton, responses and the "
            "client.",
            "",
        ]
        served = {c["concurrency"]: c["itl_p50_ms"] for c in model["generate"] if c["context"] == 256}
        lines += lab.table(
            ["streams", "graph ms", "feed ms", "step ms", "served ITL p50 ms"],
            (
                [p["concurrency"], *(f"{p[k]:.2f}" for k in ("graph_ms", "feed_ms", "step_ms"))]
                + [f"{served.get(p['concurrency'], float('nan')):.2f}"]
                for p in d["step_parts"]
            ),
        )
        if model["perf_analyzer"]:
            lines += [
                "",
                "perf_analyzer (tritonclient 2.41.0) on the step model `_streaming_python`, gRPC, "
                "sequences of 64 one-token requests:",
                "",
                "| concurrency | tokens/s | p50 ms | p99 ms |",
                "|---|---|---|---|",
            ]
            for r in model["perf_analyzer"]:
                lines.append(
                    f"| {r['concurrency']} | {r['tokens_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
                    if "error" not in r
                    else f"| {r['concurrency']} | failed: {r['error']} | | |"
                )
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {what} | {value} | {'yes' if met else 'no'} |" for what, value, met in targets(model)]
        lines += ["", f"Server healthy after the run: {model['healthy_after']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = lab.parser(__doc__, models="bsbr-small,bsbr-stdlib", export="measure (with --streaming)")
    parser.add_argument("--concurrency", default="1,4,16,32,64")
    parser.add_argument("--contexts", default="256,4096,16384")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--triton-env", default=str(ROOT / ".venv-triton"))
    parser.add_argument("--perf-analyzer", type=Path, help="directory with perf_analyzer and libcudart.so.12")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.concurrency, args.contexts, args.tokens = "bsbr-tiny", "1,2", "20,40", 8
    from bsbr_export.serve.serve import find_env

    triton_env = find_env(args.triton_env)
    exports = (
        [args.export]
        if args.export
        else [lab.streaming_export(m, None, "generate_load") for m in args.models.split(",")]
    )
    results = [measure(export, args, triton_env) for export in exports]
    os.sched_setaffinity(0, {SERVER_CORE})  # the MatMul rate's child inherits core 0
    result = {"machine": lab.machine(threads=1), "tokens": args.tokens, "results": results}
    lab.write(args.out, "generate_load", result, report)


if __name__ == "__main__":
    main()
