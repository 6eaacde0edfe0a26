"""Where ONNX Runtime's time goes in a BSBR forward: ORT's own profiler, by category.

    python tools/profile_ort.py [--model bsbr-small] [--lengths 4096] [--out tools/results]

Exports the model's full-sequence graph, runs it on the CPU provider (2 threads, ORT_ENABLE_ALL,
threads spinning: alone in this process) with `enable_profiling`, drops the warm-up runs and
sums kernel time per category: the dense weight GEMMs (projections, feed-forward, LM head),
the chunk attention (fused within-chunk Attention, chunk states, retrieval, q S), GELU,
LayerNorm, bias/residual adds, head transposes, positions, the rest. Also the dense GEMMs'
achieved GFLOP/s inside the graph. Writes profile_<model>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARMUP, RUNS = 3, 5


def category(op: str, shape: list[int], config) -> str:
    """Which part of the model an ORT kernel (op type, output shape) belongs to."""
    dense_widths = {config.hidden_size, config.ff_size, config.vocab_size}
    if op in ("MatMul", "Gemm") and len(shape) == 3 and shape[-1] in dense_widths:
        return "dense GEMMs (projections, feed-forward, LM head)"
    if op in ("Attention", "FusedMatMul", "MatMul", "Softmax", "Where") or (
        op in ("Add", "Concat") and len(shape) == 5
    ):
        return "chunk attention + retrieval"
    if op in ("BiasGelu", "Gelu", "FastGelu"):
        return "GELU"
    if op in ("LayerNormalization", "SkipLayerNormalization"):
        return "LayerNorm"
    if op == "Add":
        return "bias + residual adds"
    if op == "Transpose":
        return "head transposes"
    if op in ("Sin", "Cos") or (op == "Concat" and len(shape) == 3 and shape[-1] == 2):
        return "positions (sin, cos)"
    return "other"


def profile(path: Path, config, length: int, threads: int) -> dict:
    """Median latency and steady-state kernel time per category and op type at `length`."""
    from bsbr_export.bench import model_flops, random_feeds, weight_flops
    from bsbr_export.runners import OnnxRunner

    feeds = random_feeds(config.vocab_size, 1, length)
    with tempfile.TemporaryDirectory() as tmp:
        session = OnnxRunner(path, threads=threads, spinning=True, profile_prefix=Path(tmp) / "ort").session
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
        times = []
        for i in range(WARMUP + RUNS):
            start = time.perf_counter()
            session.run(None, feeds)
            if i >= WARMUP:
                times.append((time.perf_counter() - start) * 1e3)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    steady = runs[WARMUP]  # warm-up runs grow the arena: their first touches are not the model's cost
    by_category, by_op = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < steady:
            continue
        op = e["args"]["op_name"]
        outputs = e["args"].get("output_type_shape") or [{}]
        shape = next(iter(outputs[0].values()), [])
        by_category[category(op, shape, config)] += e["dur"] / RUNS / 1e3
        by_op[op] += e["dur"] / RUNS / 1e3
    kernel_ms = sum(by_category.values())
    dense_ms = by_category["dense GEMMs (projections, feed-forward, LM head)"]
    return {
        "length": length,
        "p50_ms": statistics.median(times),
        "kernel_ms": kernel_ms,
        "categories": dict(by_category.most_common()),
        "op_types": dict(by_op.most_common()),
        "dense_gemm_gflops": weight_flops(config, length) / (dense_ms / 1e3) / 1e9 if dense_ms else None,
        "dense_flop_share": weight_flops(config, length) / model_flops(config, length),
    }


def markdown(model: str, machine: dict, results: list[dict]) -> str:
    lines = [f"# Where ONNX Runtime's time goes: {model}, batch 1, 2 threads, ORT_ENABLE_ALL", "",
             f"Machine: {machine['processor']} x{machine['cpu_count']}, {machine['platform']}; onnxruntime "
             f"{machine['versions'].get('onnxruntime')}."
             f" Kernel time from ORT's profiler over {RUNS} runs after {WARMUP} warm-ups.", ""]
    for r in results:
        lines += [f"## L = {r['length']}: median {r['p50_ms']:.1f} ms (profiler on)", "",
                  "| category | ms per run | share of kernel time |", "|---|---|---|"]
        for name, ms in r["categories"].items():
            lines.append(f"| {name} | {ms:.2f} | {100 * ms / r['kernel_ms']:.1f}% |")
        if r["dense_gemm_gflops"]:
            lines += ["", f"The dense GEMMs are {100 * r['dense_flop_share']:.0f}% of the model's FLOPs and run at "
                      f"{r['dense_gemm_gflops']:.0f} GFLOP/s inside the graph.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bsbr-small")
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bsbr_profile"))
    args = parser.parse_args()

    from bsbr_export.bench import machine_info
    from bsbr_export.formats import FORMATS
    from bsbr_export.pipeline import export_model
    from bsbr_export.zoo import get_preset

    config = get_preset(args.model).config
    shutil.rmtree(args.work, ignore_errors=True)
    export_model(args.model, args.work, [FORMATS["onnx"]])
    results = [profile(args.work / "model.onnx", config, int(n), args.threads) for n in args.lengths.split(",")]
    machine = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{args.model}.json").write_text(
        json.dumps({"model": args.model, "machine": machine, "results": results}, indent=2) + "\n")
    (args.out / f"profile_{args.model}.md").write_text(markdown(args.model, machine, results))
    print(markdown(args.model, machine, results))


if __name__ == "__main__":
    main()
