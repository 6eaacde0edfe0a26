"""The issue-6 benchmark sweep: bsbr-small, batch 1, 2 threads, one run, against targets.

    python tools/sweep.py [--model bsbr-small] [--out tools/results]

Measures, each engine in its own process: eager vs ONNX Runtime latency; BSBR vs the same
model family with standard causal attention (SDPA) exported the same way, up to L=16384
(latency and peak memory); streaming decode latency vs context against re-running the
full forward; achieved model FLOP/s against ONNX Runtime's own float32 MatMul on a
[L, hidden] x [hidden, 4*hidden] product timed in the same run; int8 vs fp32.
Writes sweep_<model>.json and sweep_<model>.md to --out. No number here is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bsbr_export.defaults import DEFAULT_THREADS

HERE = Path(__file__).resolve().parent
LENGTHS = [256, 1024, 4096, 16384]
DECODE = [256, 1024, 4096, 16384]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank; nan when there are none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def matmul_rate(hidden: int, threads: int) -> float:
    """ORT's own float32 MatMul GFLOP/s here: [4096, hidden] x [hidden, 4 hidden], timed in a
    child process (which inherits this process's CPU affinity)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        matmul_graph(path, hidden)
        timing = time_onnx(path, [4096], vocab=2, hidden=hidden, threads=threads)["timings"][0]
    return 2 * 4096 * hidden * 4 * hidden / (timing["p50_ms"] / 1e3) / 1e9


def sdpa_model(config, seed: int = 0):
    """bsbr-small's family with every BSBR attention swapped for causal SDPA (same weights)."""
    import torch
    from torch import nn

    from bsbr_export import build_model

    class SDPAAttention(nn.Module):
        def __init__(self, bsbr_attn) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = bsbr_attn.q_proj, bsbr_attn.k_proj, bsbr_attn.v_proj
            self.out_proj = bsbr_attn.out_proj
            self.heads = config.num_heads

        def forward(self, x, attention_mask=None):
            def split(t):
                return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

            o = torch.nn.functional.scaled_dot_product_attention(
                split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True
            )
            return self.out_proj(o.transpose(1, 2).flatten(-2))

    model = build_model(config, seed)
    for block in model.blocks:
        block.attn = SDPAAttention(block.attn)
    return model.eval()


def matmul_graph(path: Path, hidden: int) -> None:
    """A one-node ONNX graph: [L, hidden] x [hidden, 4*hidden], L dynamic."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((hidden, 4 * hidden), dtype=np.float32), "w"
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["L", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["L", 4 * hidden])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), str(path))


def _child_time_onnx(path: str, lengths: list[int], hidden: int | None, vocab: int, threads: int) -> None:
    """Child process: time an ONNX file at each length (ids input, or an [L, hidden] input)."""
    import numpy as np

    from bsbr_export.proof.bench import peak_rss_mib, random_feeds, time_lengths
    from bsbr_export.runtime.onnx import OnnxRunner

    runner = OnnxRunner(path, threads=threads, spinning=True)  # alone in this child process
    if hidden:

        def call(feeds):
            x = np.ones((feeds["input_ids"].shape[1], hidden), dtype=np.float32)
            return runner.session.run(None, {"x": x})
    else:

        def call(feeds):
            return runner.session.run(None, {n: feeds[n] for n in runner.input_names})

    base = peak_rss_mib()
    timings = time_lengths(call, lambda n: random_feeds(vocab, 1, n), lengths, warmup=1, min_iters=3, budget_s=1.0)
    print(json.dumps({"load_rss_mib": base, "timings": [t.__dict__ for t in timings]}))


def time_onnx(
    path: Path, lengths: list[int], vocab: int, hidden: int | None = None, threads: int = DEFAULT_THREADS
) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(path),
            "--lengths",
            ",".join(map(str, lengths)),
            "--vocab",
            str(vocab),
            "--hidden",
            str(hidden or 0),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def target_lines(rows) -> list[str]:
    """A markdown table of (what, measured, target like '>= 1.5') rows, each marked met or
    not (a figure that could not be measured, None, is not met)."""
    lines = ["| ratio | measured | target | met |", "|---|---|---|---|"]
    for what, measured, target in rows:
        op, bound = target.split()
        met = measured is not None and (measured <= float(bound) if op == "<=" else measured >= float(bound))
        shown = "-" if measured is None else f"{measured:.2f}"
        lines.append(f"| {what} | {shown} | {target} | {'yes' if met else 'NO'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bsbr-small")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bsbr_sweep"))
    parser.add_argument("--child")
    parser.add_argument("--lengths")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        _child_time_onnx(args.child, [int(x) for x in args.lengths.split(",")], args.hidden, args.vocab, args.threads)
        return

    from bsbr_export.export.onnx import export_onnx
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS
    from bsbr_export.machine import machine_info
    from bsbr_export.model.zoo import get_preset
    from bsbr_export.proof.bench import bench_engines, decode_latency, model_flops
    from bsbr_export.proof.optimize import quantize_int8

    config = get_preset(args.model).config
    shutil.rmtree(args.work, ignore_errors=True)
    export_dir = args.work / args.model
    print("exporting", flush=True)
    export_model(args.model, export_dir, [FORMATS["onnx"]], streaming=True)
    sdpa_path = args.work / "sdpa" / "model.onnx"
    export_onnx(sdpa_model(config), sdpa_path)
    matmul_path = args.work / "matmul.onnx"
    matmul_graph(matmul_path, config.hidden_size)
    print("quantizing", flush=True)
    quant = quantize_int8(export_dir)

    print("timing engines", flush=True)
    engines = {
        e.engine: e
        for e in bench_engines(
            export_dir, ["eager", "ort-cpu-all", "ort-cpu-disabled", "ort-cpu-int8"], LENGTHS, budget_s=2.0
        )
    }
    print("timing sdpa and matmul", flush=True)
    sdpa = time_onnx(sdpa_path, LENGTHS, config.vocab_size)
    matmul = time_onnx(matmul_path, [4096], config.vocab_size, hidden=config.hidden_size)
    print("decode", flush=True)
    decode = decode_latency(export_dir, DECODE)

    def p50(engine, length):
        timing = engines[engine].at(length)
        return timing.p50_ms if timing else None

    def peak(engine, length):
        timing = engines[engine].at(length)
        return timing.peak_rss_mib if timing else None

    sdpa_at = {t["length"]: t for t in sdpa.get("timings", [])}
    best_ort = {n: min(x for x in (p50("ort-cpu-all", n), p50("ort-cpu-disabled", n)) if x) for n in LENGTHS}
    flops_4096 = model_flops(config, 4096)
    achieved = flops_4096 / (best_ort[4096] / 1e3) / 1e9
    matmul_gflops = (
        2 * 4096 * config.hidden_size * 4 * config.hidden_size / (matmul["timings"][0]["p50_ms"] / 1e3) / 1e9
    )
    by_context = {d.context: d for d in decode}
    rows = [
        ("ORT / eager latency, L=256", best_ort[256] / p50("eager", 256), "<= 0.50"),
        ("ORT / eager latency, L=4096", best_ort[4096] / p50("eager", 4096), "<= 0.40"),
        (
            "SDPA-ORT / BSBR-ORT latency, L=16384",
            sdpa_at[16384]["p50_ms"] / best_ort[16384] if 16384 in sdpa_at else float("nan"),
            ">= 15",
        ),
        (
            "SDPA-ORT / BSBR-ORT peak RSS, L=16384",
            sdpa_at[16384]["peak_rss_mib"] / peak("ort-cpu-all", 16384) if 16384 in sdpa_at else float("nan"),
            ">= 10",
        ),
        ("decode per-token 16384 / 256", by_context[16384].step_p50_ms / by_context[256].step_p50_ms, "<= 1.2"),
        ("decode speed-up vs full forward, 4096", by_context[4096].speedup, ">= 50"),
        ("model GFLOP/s / ORT MatMul GFLOP/s, L=4096", achieved / matmul_gflops, ">= 0.85"),
        ("int8 speed-up vs fp32 ORT, L=1024", p50("ort-cpu-all", 1024) / p50("ort-cpu-int8", 1024), ">= 1.5"),
    ]
    result = {
        "model": args.model,
        "machine": machine_info(),
        "batch": 1,
        "threads": 2,
        "lengths": LENGTHS,
        "engines": {
            k: {"ok": v.ok, "error": v.error, "timings": [t.__dict__ for t in v.timings]} for k, v in engines.items()
        },
        "sdpa_ort": sdpa,
        "ort_matmul_gflops": matmul_gflops,
        "model_gflops_4096": achieved,
        "mflop_per_token": model_flops(config, 4096) / 4096 / 1e6,
        "decode": [d.__dict__ | {"speedup": d.speedup} for d in decode],
        "int8": {"top1": quant.steps[-1].top1, "fp32_modules": [quant.modules[n] for n in quant.fp32_nodes]},
        "targets": [{"what": w, "measured": m, "target": t} for w, m, t in rows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sweep_{args.model}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [
        f"# Sweep: {args.model}, batch 1, 2 threads",
        "",
        f"Machine: {result['machine']['processor']} x{result['machine']['cpu_count']}, "
        f"{result['machine']['platform']}; versions {result['machine']['versions']}.",
        "",
        "| length | eager ms | ORT all ms | ORT disabled ms | int8 ms | SDPA-ORT ms | eager MiB | ORT MiB "
        "| SDPA-ORT MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in LENGTHS:
        s = sdpa_at.get(n, {})
        cells = [
            p50("eager", n),
            p50("ort-cpu-all", n),
            p50("ort-cpu-disabled", n),
            p50("ort-cpu-int8", n),
            s.get("p50_ms"),
            peak("eager", n),
            peak("ort-cpu-all", n),
            s.get("peak_rss_mib"),
        ]
        lines.append(f"| {n} | " + " | ".join(f"{c:.1f}" if c else "-" for c in cells) + " |")
    lines += ["", "| context | decode ms/token | full forward ms | speed-up |", "|---|---|---|---|"]
    lines += [f"| {d.context} | {d.step_p50_ms:.2f} | {d.full_forward_p50_ms:.1f} | {d.speedup:.0f}x |" for d in decode]
    lines += [
        "",
        f"Model: {result['mflop_per_token']:.2f} MFLOP/token; at L=4096 ORT runs it at {achieved:.0f} GFLOP/s; "
        f"ORT's own MatMul [4096,{config.hidden_size}]x[{config.hidden_size},{4 * config.hidden_size}]: "
        f"{matmul_gflops:.0f} GFLOP/s (same run).",
        f"int8 top-1 agreement {result['int8']['top1']:.3f} with fp32 kept for: "
        f"{', '.join(result['int8']['fp32_modules']) or 'none'}.",
        "",
        *target_lines(rows),
    ]
    (args.out / f"sweep_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
