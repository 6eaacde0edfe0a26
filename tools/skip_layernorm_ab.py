"""A/B: our own SkipLayerNormalization rewrite against the exported graph, on ORT's CPU provider.

    python tools/skip_layernorm_ab.py [--model bsbr-small | --export DIR] [--lengths 1024,4096] [--rounds 3]
        [--out tools/results] [--smoke]

ONNX Runtime's SkipLayerNormalization fusion declines our graph (its dynamic shapes), so
every residual `Add` feeding a `LayerNormalization` stays two kernels. This tool writes
the fusion itself (`com.microsoft.SkipLayerNormalization`, the residual sum as its 4th
output for the next block, optionally the projection's bias folded in), checks the
rewritten graph against the original on unseen inputs, and times both side by side:
each file in its own process, alternating, `rounds` times, 2 threads, ORT_ENABLE_ALL.
Writes skip_layernorm_ab_<model>.{json,md} to --out. An experiment: the package ships
the rewrite only if it wins here.
`--smoke`: bsbr-tiny at lengths 32 and 64, 2 rounds.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import lab

from bsbr_export.defaults import DEFAULT_THREADS


def fuse_skip_layer_norm(model, fold_bias: bool) -> int:
    """Rewrite `LayerNormalization(Add(a, b))` (both operands computed, not constants)
    into one SkipLayerNormalization in place; returns how many were fused."""
    from onnx import helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    constants = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    replaced, dropped = {}, set()
    for norm in graph.node:
        add = producer.get(norm.input[0]) if norm.op_type == "LayerNormalization" else None
        if add is None or add.op_type != "Add" or any(i not in producer for i in add.input):
            continue
        residual, skip = add.input
        bias = []
        bias_add = producer[skip]
        if (
            fold_bias
            and bias_add.op_type == "Add"
            and len(consumers[skip]) == 1
            and bias_add.input[1] in constants
            and len(constants[bias_add.input[1]].dims) == 1
        ):
            skip, bias = bias_add.input[0], [bias_add.input[1]]
            dropped.add(id(bias_add))
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        # The residual stream goes on to the next block: the sum is the 4th output.
        keep_sum = add.output[0] in outputs or len(consumers[add.output[0]]) > 1
        replaced[id(norm)] = helper.make_node(
            "SkipLayerNormalization",
            [residual, skip, *norm.input[1:3], *bias],
            [norm.output[0], "", "", add.output[0]] if keep_sum else [norm.output[0]],
            name=f"{norm.name}_skip",
            domain="com.microsoft",
            epsilon=epsilon,
        )
        dropped.add(id(add))
    # Each fused node takes its LayerNorm's place, after everything the Adds it absorbed read.
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


def max_abs_difference(a: Path, b: Path, vocab: int, lengths: list[int]) -> float:
    """Worst |a - b| over right-padded batches of 2 at `lengths` + 7 (lengths the timing never sees)."""
    import numpy as np

    from bsbr_export.runtime.onnx import OnnxRunner

    first, second = OnnxRunner(a, threads=DEFAULT_THREADS).session, OnnxRunner(b, threads=DEFAULT_THREADS).session
    worst = 0.0
    for length in (n + 7 for n in lengths):
        rng = np.random.default_rng(length)
        mask = np.ones((2, length), dtype=np.int64)
        mask[1, length - 5 :] = 0
        feeds = {"input_ids": rng.integers(0, vocab, (2, length)), "attention_mask": mask}
        got, want = second.run(None, feeds)[0], first.run(None, feeds)[0]
        worst = max(worst, float(np.abs(got - want)[mask.astype(bool)].max()))
    return worst


def report(record: dict) -> str:
    """Each graph's fused nodes, parity and median p50 (the rounds' p50s, the speed-up)."""
    machine, lengths, median = record["machine"], record["lengths"], record["median_of_rounds_ms"]
    head = " | ".join(f"L={n} ms (rounds)" for n in lengths)
    rows = [
        f"| {name} | {record['fused_nodes'].get(name, 0)} | {record['max_abs_vs_exported'][name]:.1e} | "
        + " | ".join(
            f"{median[name][str(n)]:.1f} ({', '.join(f'{t:.1f}' for t in record['p50_ms_per_round'][name][str(n)])}) "
            f"x{median['exported'][str(n)] / median[name][str(n)]:.2f}"
            for n in lengths
        )
        + " |"
        for name in median
    ]
    lines = [
        *lab.heading(f"SkipLayerNormalization rewrite vs the exported graph: {record['model']}", machine),
        "Batch 1, "
        f"{machine['threads']} threads, ORT_ENABLE_ALL; each file in its own process, alternating, "
        f"{record['rounds']} rounds; median of the rounds' p50 and, after x, speed-up vs the exported graph.",
        "",
        f"| graph | fused | max abs vs exported | {head} |",
        "|---|---|---|" + "---|" * len(lengths),
        *rows,
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = lab.parser(__doc__, model="bsbr-small", export="rewrite (ONNX)")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bsbr_skip_layernorm_ab"))
    args = parser.parse_args()
    if args.smoke:
        args.model, args.lengths, args.rounds = "bsbr-tiny", "32,64", 2
    lengths = [int(n) for n in args.lengths.split(",")]

    import onnx

    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS
    from bsbr_export.manifest import manifest_spec, read_manifest

    shutil.rmtree(args.work, ignore_errors=True)
    export_dir = args.export or args.work / args.model
    if args.export is None:
        export_model(args.model, export_dir, [FORMATS["onnx"]])
    args.work.mkdir(parents=True, exist_ok=True)
    model_name, vocab = read_manifest(export_dir)["model"], manifest_spec(export_dir).tokens.high
    files = {"exported": export_dir / "model.onnx"}
    fused = {}
    for name, fold in (("skip-layernorm", False), ("skip-layernorm+bias", True)):
        model = onnx.load(str(files["exported"]))
        fused[name] = fuse_skip_layer_norm(model, fold)
        files[name] = args.work / f"{name}.onnx"
        onnx.save(model, str(files[name]))
    parity = {name: max_abs_difference(files["exported"], path, vocab, lengths) for name, path in files.items()}
    # Lengths as strings: the keys JSON keeps, which the report reads.
    times: dict[str, dict[str, list[float]]] = {name: {str(n): [] for n in lengths} for name in files}
    for _ in range(args.rounds):
        for name, path in files.items():
            result = lab.in_child(lab.onnx_timings, path, lengths, vocab, DEFAULT_THREADS)
            for timing in result["timings"]:
                times[name][str(timing["length"])].append(timing["p50_ms"])
    record = {
        "model": model_name,
        "machine": lab.machine(threads=DEFAULT_THREADS),
        "lengths": lengths,
        "rounds": args.rounds,
        "fused_nodes": fused,
        "max_abs_vs_exported": parity,
        "p50_ms_per_round": times,
        "median_of_rounds_ms": {name: {n: statistics.median(ts) for n, ts in by.items()} for name, by in times.items()},
    }
    lab.write(args.out, f"skip_layernorm_ab_{model_name}", record, report)


if __name__ == "__main__":
    main()
