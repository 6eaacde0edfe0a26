"""ExecuTorch (`--format executorch`, XNNPACK) on bsbr-small: what issue #14 asks to measure.

    python tools/executorch_bench.py [--model bsbr-small] [--out tools/results] [--smoke]
    python tools/executorch_bench.py --flops-only --label main > main.json   # FLOP shares only, any checkout
    python tools/executorch_bench.py --baseline main.json   # ... reported before this checkout's

Measures, in one run: export + lowering time and `.pte` size; max abs error against eager
over lengths (1 .. max) and batches (1 .. max); latency ExecuTorch / eager at 1 and 2
threads, L = 256 and 1000, each engine in its own process (bench's workers); the share of
the model's FLOPs that runs inside XNNPACK delegates, for the standard lowering
(`to_edge_transform_and_lower` + `XnnpackPartitioner`, nothing else) and for the lowering
shipped (`bsbr_export.export.executorch.lower`), at L = 256 and 1000; the load average next to
each figure. Writes executorch_<model>.json / .md to --out. No number here is asserted.
`--smoke`: bsbr-tiny, L = 16 and 40, limits 77 x 2, a 0.3 s timing budget per engine.

FLOPs per node: matmul-like ops from torch's flop counter (`linear` as 2 * rows * weight
size), 1 per output element for elementwise math (4 for softmax and GELU, 5 for a layer
norm), 0 for data movement (views, copies, gathers, masks' index math).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import lab

LENGTHS = [256, 1000]
LIMITS = {"max_length": 1024, "max_batch": 4}
THREADS = (1, 2)  # the latency table's
BUDGET_S = 3.0  # each engine's timing budget per length
MOVES = {
    "view_copy",
    "permute_copy",
    "expand_copy",
    "clone",
    "_clone_dim_order",
    "_to_dim_order_copy",
    "cat",
    "slice_copy",
    "select_copy",
    "unsqueeze_copy",
    "squeeze_copy",
    "index_select",
    "embedding",
    "arange",
    "full",
    "full_like",
    "scalar_tensor",
    "alias_copy",
    "constant_pad_nd",
    "where",
    "logical_not",
    "logical_and",
    "bitwise_and",
    "bitwise_not",
    "eq",
    "le",
    "lt",
    "ge",
    "gt",
    "any",
    "sym_size",
}
WEIGHTED = {"_softmax": 4, "gelu": 4, "native_layer_norm": 5}


def load() -> str:
    """'1.23 (loaded)' when other work shares the cores."""
    one = os.getloadavg()[0]
    return f"{one:.2f}{' (loaded)' if one > 0.5 * (os.cpu_count() or 1) else ''}"


def lowered(model, spec, stage: str, limits: dict):
    """(edge program, seconds) for one lowering stage: 'standard' or 'shipped', memory
    planned for `limits`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from bsbr_export.export.executorch import bounded_program, lower

    program = bounded_program(model, spec, limits)
    start = time.perf_counter()
    if stage == "standard":
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    else:
        edge = lower(program, limits)
    return edge, time.perf_counter() - start


def flops_by_place(edge, batch: int, length: int) -> Counter:
    """FLOPs at batch x length of every op, keyed (where, op): where is 'xnnpack' inside a
    delegate, 'portable' for ExecuTorch's own kernels. Symbolic sizes are evaluated by
    binding the inputs' batch and sequence symbols."""
    import torch
    from torch.utils import _pytree as pytree
    from torch.utils.flop_counter import flop_registry

    program = edge.exported_program()
    gm = program.graph_module
    ids = next(n for n in gm.graph.nodes if n.name == program.graph_signature.user_inputs[0])  # the token ids
    bindings = {d.node.expr: v for d, v in zip(ids.meta["val"].shape, (batch, length)) if isinstance(d, torch.SymInt)}

    def concrete(value) -> int:
        return int(value.node.expr.xreplace(bindings)) if isinstance(value, torch.SymInt) else int(value)

    def node_flops(node) -> tuple[str, int]:
        op = getattr(node.target, "_op", node.target)
        name = getattr(op, "__name__", str(op)).split(".")[0]
        out = node.meta.get("val")
        out = out[0] if isinstance(out, (tuple, list)) else out
        if name == "linear":
            x, w = node.args[0].meta["val"], node.args[1].meta["val"]
            return name, 2 * concrete(x.numel()) // concrete(x.shape[-1]) * concrete(w.numel())
        packet = getattr(op, "overloadpacket", None)
        if packet in flop_registry:
            args, kwargs = pytree.tree_map(
                lambda a: a.meta["val"] if isinstance(a, torch.fx.Node) else a, (node.args, node.kwargs)
            )
            return name, concrete(flop_registry[packet](*args, **kwargs, out_val=node.meta["val"]))
        if name in MOVES or not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
            return name, 0
        return name, WEIGHTED.get(name, 1) * concrete(out.numel())

    totals = Counter()

    def walk(graph, where: str) -> None:
        for node in graph.nodes:
            if (
                node.op == "call_function"
                and "call_delegate" not in str(node.target)
                and getattr(node.target, "__name__", "") != "getitem"
            ):
                name, flops = node_flops(node)
                totals[(where, name)] += flops

    walk(gm.graph, "portable")
    for _, module in gm.named_children():
        if hasattr(module, "original_module"):
            walk(module.original_module.graph, "xnnpack")
    return totals


def delegation(model, spec, stage: str, lengths: list[int], limits: dict) -> dict:
    """Share of FLOPs in XNNPACK at each of `lengths`, delegate calls and node counts for
    one lowering stage."""
    edge, seconds = lowered(model, spec, stage, limits)
    gm = edge.exported_program().graph_module
    nodes = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "") != "getitem":
            nodes["delegate calls" if "call_delegate" in str(node.target) else "portable nodes"] += 1
    for _, module in gm.named_children():
        if hasattr(module, "original_module"):
            nodes["xnnpack nodes"] += sum(1 for n in module.original_module.graph.nodes if n.op == "call_function")
    shares = {}
    for length in lengths:
        flops = flops_by_place(edge, 1, length)
        total = sum(flops.values())
        outside = Counter({op: f for (where, op), f in flops.items() if where == "portable" and f})
        shares[str(length)] = {
            "delegated": sum(f for (w, _), f in flops.items() if w == "xnnpack") / total,
            "gflop": total / 1e9,
            "outside_xnnpack": dict(outside.most_common(6)),
        }
    return {"stage": stage, "lowering_s": round(seconds, 1), "load": load(), **dict(nodes), "flops": shares}


def parity(out: Path, model, lengths: list[int], limits: dict) -> list[dict]:
    """Max abs error against eager over lengths (around a chunk, the longest of `lengths`,
    the limit) and batches up to the limits."""
    import torch

    from bsbr_export.runtime.executorch import ExecuTorchRunner

    runner = ExecuTorchRunner(out / "model.pte", ["input_ids", "attention_mask"], ["logits"])
    c, rows = model.config.chunk_size, []
    for length in (1, c - 1, c, c + 1, 3 * c + 5, lengths[-1], limits["max_length"]):
        for batch in (1, limits["max_batch"]):
            ids = torch.randint(
                0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length)
            )
            mask = torch.ones_like(ids)
            with torch.no_grad():
                want = model(ids, mask).numpy()
            got = runner.infer({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["logits"]
            rows.append(
                {
                    "batch": batch,
                    "length": length,
                    "max_abs": float(abs(got - want).max()),
                    "logit_scale": float(abs(want).max()),
                }
            )
    return rows


def latency(out: Path, lengths: list[int], budget_s: float) -> list[dict]:
    """ExecuTorch and eager side by side, each in its own process, at each of THREADS."""
    from bsbr_export.proof.bench import bench_engines

    rows = []
    for threads in THREADS:
        before = load()
        results = {
            r.engine: r
            for r in bench_engines(out, ["eager", "executorch"], lengths, threads=threads, budget_s=budget_s)
        }
        for i, length in enumerate(lengths):
            eager, et = results["eager"].timings[i], results["executorch"].timings[i]
            rows.append(
                {
                    "threads": threads,
                    "length": length,
                    "eager_ms": eager.p50_ms,
                    "executorch_ms": et.p50_ms,
                    "ratio": et.p50_ms / eager.p50_ms,
                    "spread": max(eager.spread, et.spread),
                    "load": f"{before} -> {load()}",
                }
            )
    return rows


def markdown(result: dict) -> str:
    """The result as markdown: export, FLOPs delegated, parity and latency tables."""
    lengths, limits, machine = result["lengths"], result["limits"], result["machine"]
    lines = [
        *lab.heading(f"ExecuTorch (XNNPACK) on {result['model']}", machine),
        f"Measured {result['date']}, executorch {result['versions'].get('executorch')}. "
        "Load average (1 min) is given next to each figure; above half the core count it is marked "
        "'(loaded)': other jobs shared the cores, so times are noisy and ratios (measured side by side) "
        "are the figures to read.",
        "",
    ]
    if "export" in result:
        e = result["export"]
        lines += [
            "## Export",
            "",
            f"`bsbr-export export {result['model']} --format executorch --max-length "
            f"{limits['max_length']} --max-batch {limits['max_batch']}`: {e['seconds']:.1f} s in all (torch.export, "
            f"lowering, serialization and the parity checks), `.pte` {e['bytes'] / 1e6:.1f} MB; load {e['load']}.",
            "",
        ]
    lines += [
        "## FLOPs delegated to XNNPACK",
        "",
        "| stage | lowering s | delegate calls | portable nodes | xnnpack nodes | "
        + " | ".join(f"delegated at L={n}" for n in lengths)
        + " | largest FLOPs outside | load |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(lengths) + "---|---|",
    ]
    for d in result["delegation"]:
        outside = {op: f for op, f in d["flops"][str(lengths[-1])]["outside_xnnpack"].items() if op}
        lines.append(
            f"| {d.get('label', d['stage'])} | {d['lowering_s']} | {d.get('delegate calls', 0)} | "
            f"{d.get('portable nodes', 0)} | {d.get('xnnpack nodes', 0)} | "
            + " | ".join(f"{100 * d['flops'][str(n)]['delegated']:.2f}%" for n in lengths)
            + f" | {', '.join(f'{k} {v / 1e6:.1f}M' for k, v in outside.items()) or '-'} | {d['load']} |"
        )
    if "parity" in result:
        lines += [
            "",
            "## Max abs error vs eager",
            "",
            "| batch | length | max abs | logit scale |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['batch']} | {r['length']} | {r['max_abs']:.2e} | {r['logit_scale']:.2f} |" for r in result["parity"]
        ]
    if "latency" in result:
        lines += [
            "",
            "## Latency, batch 1 (p50; each engine in its own process, one after the other)",
            "",
            "| threads | L | eager ms | ExecuTorch ms | ExecuTorch / eager | spread | load before -> after |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r['threads']} | {r['length']} | {r['eager_ms']:.1f} | {r['executorch_ms']:.1f} | "
            f"{r['ratio']:.2f} | {100 * r['spread']:.0f}%{' ⚠' if r['spread'] > 0.25 else ''} | {r['load']} |"
            for r in result["latency"]
        ]
        lines += [
            "",
            "⚠: the p10-p90 spread of a timing is over 25% of its median (as in `bench`): rerun on a "
            "quieter machine before reading that ratio.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = lab.parser(__doc__, model="bsbr-small")
    parser.add_argument("--stages", default="standard,shipped", help="lowering stages to count FLOPs for")
    parser.add_argument("--label", default="", help="prefix for the stage names (e.g. 'main')")
    parser.add_argument("--flops-only", action="store_true", help="only the FLOP shares (printed as JSON)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a --flops-only JSON from another checkout (e.g. main) to report first",
    )
    args = parser.parse_args()
    lengths, limits, budget_s = LENGTHS, LIMITS, BUDGET_S
    if args.smoke:
        args.model, lengths, limits, budget_s = "bsbr-tiny", [16, 40], {"max_length": 77, "max_batch": 2}, 0.3

    from bsbr_export import load_model
    from bsbr_export.model.probe import spec_for
    from bsbr_export.versions import versions

    model = load_model(args.model).eval()
    spec = spec_for(model)
    shares = json.loads(args.baseline.read_text()) if args.baseline else []
    shares += [
        dict(delegation(model, spec, s, lengths, limits), label=f"{args.label} {s}".strip())
        for s in args.stages.split(",")
    ]
    if args.flops_only:
        print(json.dumps(shares, indent=2))
        return
    result = {
        "model": args.model,
        "date": time.strftime("%Y-%m-%d"),
        "machine": lab.machine(threads=max(THREADS)),
        "versions": {**versions(), "executorch": _version("executorch")},
        "lengths": lengths,
        "limits": limits,
        "delegation": shares,
    }
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / args.model
        start, before = time.perf_counter(), load()
        export_model(args.model, out, [FORMATS["executorch"]], **limits)
        result["export"] = {
            "seconds": time.perf_counter() - start,
            "bytes": (out / "model.pte").stat().st_size,
            "load": f"{before} -> {load()}",
        }
        result["parity"] = parity(out, model, lengths, limits)
        result["latency"] = latency(out, lengths, budget_s)
    lab.write(args.out, f"executorch_{args.model}", result, markdown)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
