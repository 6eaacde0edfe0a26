"""Where ONNX Runtime's time goes in a BSBR forward: ORT's own profiler, by category.

    python tools/profile_ort.py [--model bsbr-small | --export DIR] [--lengths 4096] [--out tools/results] [--smoke]

Exports the model's full-sequence graph, runs it on the CPU provider (2 threads, ORT_ENABLE_ALL,
threads spinning: alone in this process) with `enable_profiling`, drops the warm-up runs and
sums kernel time per category: the dense weight GEMMs (projections, feed-forward, LM head),
the chunk attention (fused within-chunk Attention, chunk states, retrieval, q S), GELU,
LayerNorm, bias/residual adds, head transposes, positions, the rest. Also the dense GEMMs'
achieved GFLOP/s inside the graph, and, for the costliest node of each op type outside
them, its time alone: the same node, inputs and weights as a one-node graph run back to
back, its data hot in cache (what the op costs when its inputs do not come from memory).
Writes profile_<model>.json and .md to --out.
`--smoke`: bsbr-tiny at lengths 64 and 128.
"""

from __future__ import annotations

import collections
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import lab

WARMUP, RUNS = 3, 5
ALONE_OPS = ("Attention", "BiasGelu", "LayerNormalization", "Transpose", "Add", "FusedMatMul")
RANDOM_TYPES = {"float": "float32", "bool": "bool"}  # input types a one-node graph is fed random values of


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


def run_times(run, count: int) -> list[float]:
    """ms of each of `count` calls of `run()`, after WARMUP untimed ones."""
    for _ in range(WARMUP):
        run()
    return [1e3 * lab.timed(run) for _ in range(count)]


def profile(path: Path, config, length: int, threads: int) -> dict:
    """Median latency and steady-state kernel time per category and op type at `length`."""
    from bsbr_export.proof.bench import model_flops, random_feeds, weight_flops
    from bsbr_export.runtime.onnx import OnnxRunner

    feeds = random_feeds(config.vocab_size, 1, length)
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session = OnnxRunner(
            path, threads=threads, spinning=True, profile_prefix=Path(tmp) / "ort", optimized_path=optimized
        ).session
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
        times = run_times(lambda: session.run(None, feeds), RUNS)
        events = json.loads(Path(session.end_profiling()).read_text())
        session = None  # its threads stop spinning before the one-node graphs run
        runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
        # Warm-up runs grow the arena: their first touches are not the model's cost.
        nodes = node_times(events, steady=runs[WARMUP])
        alone = time_alone(optimized, costliest_nodes(nodes), threads)
    by_category, by_op = collections.Counter(), collections.Counter()
    for node in nodes.values():
        by_category[category(node["op"], node["shape"], config)] += node["ms"]
        by_op[node["op"]] += node["ms"]
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
        "alone": alone,
    }


def node_times(events: list[dict], steady: int) -> dict[str, dict]:
    """Every node's kernel time per run from `steady` on: op type, ms, output shape and
    input (type, shape) pairs, by node name."""
    nodes = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < steady:
            continue
        outputs = e["args"].get("output_type_shape") or [{}]
        node = nodes.setdefault(
            e["name"].removesuffix("_kernel_time"),
            {
                "op": e["args"]["op_name"],
                "ms": 0.0,
                "shape": next(iter(outputs[0].values()), []),
                "inputs": [next(iter(d.items())) for d in e["args"].get("input_type_shape", [])],
            },
        )
        node["ms"] += e["dur"] / RUNS / 1e3
    return nodes


def costliest_nodes(nodes: dict[str, dict]) -> dict[str, dict]:
    """op type -> its costliest node (of ALONE_OPS), with its name."""
    best = {}
    for name, node in nodes.items():
        if node["op"] in ALONE_OPS and node["ms"] > best.get(node["op"], {}).get("ms", 0.0):
            best[node["op"]] = {"node": name, **node}
    return best


def time_alone(optimized: Path, nodes: dict[str, dict], threads: int, runs: int = 20) -> list[dict]:
    """Each node as a one-node graph over its own weights (ORT's optimized model), its
    activations random at the profiled shapes, timed back to back: median ms per run."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(optimized))
    weights = {w.name: w for w in model.graph.initializer}
    rows, rng = [], np.random.default_rng(0)
    for op, info in nodes.items():
        node = next(n for n in model.graph.node if n.name == info["node"])
        graph_inputs, feeds, used = [], {}, []
        for name, (dtype, shape) in zip(node.input, info["inputs"]):
            if name in weights:
                used.append(weights[name])
            elif name and dtype in RANDOM_TYPES:
                feeds[name] = rng.standard_normal(shape).astype(RANDOM_TYPES[dtype])
                graph_inputs.append(
                    helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype), shape)
                )
            elif name:
                break  # an index or shape input: its values matter, so random ones would not do
        else:
            outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in node.output if o]
            one = helper.make_model(
                helper.make_graph([node], op, graph_inputs, outputs, used),
                opset_imports=model.opset_import,
                ir_version=model.ir_version,
            )
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(one.SerializeToString(), options, providers=["CPUExecutionProvider"])
            times = run_times(lambda session=session, feeds=feeds: session.run(None, feeds), runs)
            rows.append(
                {
                    "op": op,
                    "node": info["node"],
                    "shape": info["inputs"][0][1],
                    "in_graph_ms": info["ms"],
                    "alone_ms": statistics.median(times),
                }
            )
    return sorted(rows, key=lambda r: -r["in_graph_ms"])


def report(result: dict) -> str:
    """Per length: kernel time by category, the dense GEMMs' rate, the costliest nodes alone."""
    machine = result["machine"]
    lines = [
        *lab.heading(
            f"Where ONNX Runtime's time goes: {result['model']}, batch 1, {machine['threads']} threads, ORT_ENABLE_ALL",
            machine,
        ),
        f"Kernel time from ORT's profiler over {RUNS} runs after {WARMUP} warm-ups.",
        "",
    ]
    for r in result["results"]:
        lines += [f"## L = {r['length']}: median {r['p50_ms']:.1f} ms (profiler on)", ""]
        lines += lab.table(
            ["category", "ms per run", "share of kernel time"],
            ([name, f"{ms:.2f}", f"{100 * ms / r['kernel_ms']:.1f}%"] for name, ms in r["categories"].items()),
        )
        if r["dense_gemm_gflops"]:
            lines += [
                "",
                f"The dense GEMMs are {100 * r['dense_flop_share']:.0f}% of the model's FLOPs and run at "
                f"{r['dense_gemm_gflops']:.0f} GFLOP/s inside the graph.",
                "",
            ]
        if r["alone"]:
            lines += [
                "The costliest node of each op type, in the graph and alone (one-node graph, same weights, "
                "inputs hot in cache, median of 20):",
                "",
            ]
            lines += lab.table(
                ["op", "node", "first input", "in graph ms", "alone ms", "in graph / alone"],
                (
                    [a["op"], a["node"], a["shape"], f"{a['in_graph_ms']:.2f}", f"{a['alone_ms']:.2f}"]
                    + [f"{a['in_graph_ms'] / a['alone_ms']:.1f}"]
                    for a in r["alone"]
                ),
            )
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = lab.parser(__doc__, model="bsbr-small", export="profile (ONNX)")
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bsbr_profile"))
    args = parser.parse_args()
    if args.smoke:
        args.model, args.lengths = "bsbr-tiny", "64,128"

    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS
    from bsbr_export.manifest import read_manifest
    from bsbr_export.model.config import BSBRConfig

    export_dir = args.export or args.work
    if args.export is None:
        shutil.rmtree(args.work, ignore_errors=True)
        export_model(args.model, args.work, [FORMATS["onnx"]])
    manifest = read_manifest(export_dir)
    config = BSBRConfig.from_dict(manifest["config"])
    machine = lab.machine(threads=args.threads)  # before the profiles: their threads spin alone
    results = [
        lab.progress(f"L={n}", profile, export_dir / "model.onnx", config, int(n), args.threads)
        for n in args.lengths.split(",")
    ]
    result = {"model": manifest["model"], "machine": machine, "results": results}
    lab.write(args.out, f"profile_{manifest['model']}", result, report)


if __name__ == "__main__":
    main()
