"""The issue-6 benchmark sweep: bsbr-small, batch 1, 2 threads, one run, against targets.

    python tools/sweep.py [--model bsbr-small | --export DIR] [--out tools/results] [--smoke]

Measures, each engine in its own process: eager vs ONNX Runtime latency; BSBR vs the same
model family with standard causal attention (SDPA) exported the same way, up to L=16384
(latency and peak memory); streaming decode latency vs context against re-running the
full forward; achieved model FLOP/s against ONNX Runtime's own float32 MatMul on a
[4096, hidden] x [hidden, 4*hidden] product timed in the same run; int8 vs fp32.
Writes sweep_<model>.json and sweep_<model>.md to --out. No number here is asserted.
`--smoke`: bsbr-tiny at lengths and decode contexts 32, 64, 128, 256, short timing budgets.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lab

from bsbr_export.defaults import DEFAULT_THREADS

# Each list is (short, mid, long, longest): the targets name them by position.
LENGTHS = [256, 1024, 4096, 16384]
DECODE = [256, 1024, 4096, 16384]
SMOKE = [32, 64, 128, 256]  # bsbr-tiny's chunk is 8: every list spans chunks
ENGINES = ["eager", "ort-cpu-all", "ort-cpu-disabled", "ort-cpu-int8"]


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


def at(result: dict, engine: str, length: int, field: str = "p50_ms") -> float | None:
    """An engine's timing `field` at `length` (None where it did not run)."""
    return next((t[field] for t in result["engines"][engine]["timings"] if t["length"] == length), None)


def best_ort(result: dict, length: int) -> float:
    """The faster fp32 ORT p50 at `length`: all graph optimizations or none."""
    return min(x for x in (at(result, "ort-cpu-all", length), at(result, "ort-cpu-disabled", length)) if x)


def targets(result: dict) -> list[tuple[str, float | None, str]]:
    """The issue's targets as (what, measured, target) rows, from the figures in `result`."""
    short, mid, long, longest = result["lengths"]
    sdpa_at = {t["length"]: t for t in result["sdpa_ort"].get("timings", [])}
    decode = {d["context"]: d for d in result["decode"]}
    first, _, third, last = sorted(decode)
    return [
        (f"ORT / eager latency, L={short}", best_ort(result, short) / at(result, "eager", short), "<= 0.50"),
        (f"ORT / eager latency, L={long}", best_ort(result, long) / at(result, "eager", long), "<= 0.40"),
        (
            f"SDPA-ORT / BSBR-ORT latency, L={longest}",
            sdpa_at[longest]["p50_ms"] / best_ort(result, longest) if longest in sdpa_at else float("nan"),
            ">= 15",
        ),
        (
            f"SDPA-ORT / BSBR-ORT peak RSS, L={longest}",
            sdpa_at[longest]["peak_rss_mib"] / at(result, "ort-cpu-all", longest, "peak_rss_mib")
            if longest in sdpa_at
            else float("nan"),
            ">= 10",
        ),
        (f"decode per-token {last} / {first}", decode[last]["step_p50_ms"] / decode[first]["step_p50_ms"], "<= 1.2"),
        (f"decode speed-up vs full forward, {third}", decode[third]["speedup"], ">= 50"),
        (
            f"model GFLOP/s / ORT MatMul GFLOP/s, L={result['flops_length']}",
            result["model_gflops"] / result["machine"]["matmul_gflops"],
            ">= 0.85",
        ),
        (
            f"int8 speed-up vs fp32 ORT, L={mid}",
            at(result, "ort-cpu-all", mid) / at(result, "ort-cpu-int8", mid),
            ">= 1.5",
        ),
    ]


def report(result: dict) -> str:
    """Latency and memory per length, decode per context, the FLOP rate, int8, the targets."""
    machine = result["machine"]
    sdpa_at = {t["length"]: t for t in result["sdpa_ort"].get("timings", [])}
    lines = [
        *lab.heading(f"Sweep: {result['model']}, batch 1, {result['threads']} threads", machine),
        "| length | eager ms | ORT all ms | ORT disabled ms | int8 ms | SDPA-ORT ms | eager MiB | ORT MiB "
        "| SDPA-ORT MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in result["lengths"]:
        s = sdpa_at.get(n, {})
        cells = [
            at(result, "eager", n),
            at(result, "ort-cpu-all", n),
            at(result, "ort-cpu-disabled", n),
            at(result, "ort-cpu-int8", n),
            s.get("p50_ms"),
            at(result, "eager", n, "peak_rss_mib"),
            at(result, "ort-cpu-all", n, "peak_rss_mib"),
            s.get("peak_rss_mib"),
        ]
        lines.append(f"| {n} | " + " | ".join(f"{c:.1f}" if c else "-" for c in cells) + " |")
    lines += ["", "| context | decode ms/token | full forward ms | speed-up |", "|---|---|---|---|"]
    lines += [
        f"| {d['context']} | {d['step_p50_ms']:.2f} | {d['full_forward_p50_ms']:.1f} | {d['speedup']:.0f}x |"
        for d in result["decode"]
    ]
    lines += [
        "",
        f"Model: {result['mflop_per_token']:.2f} MFLOP/token; at L={result['flops_length']} ORT runs it at "
        f"{result['model_gflops']:.0f} GFLOP/s, against ORT's own MatMul's above.",
        f"int8 top-1 agreement {result['int8']['top1']:.3f} with fp32 kept for: "
        f"{', '.join(result['int8']['fp32_modules']) or 'none'}.",
        "",
        *lab.target_lines([(t["what"], t["measured"], t["target"]) for t in result["targets"]]),
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = lab.parser(__doc__, model="bsbr-small", export="copy into --work (with --streaming)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bsbr_sweep"))
    args = parser.parse_args()
    lengths, contexts, budget = LENGTHS, DECODE, 2.0
    if args.smoke:
        args.model, lengths, contexts, budget = "bsbr-tiny", SMOKE, SMOKE, 0.2

    from bsbr_export.export.onnx import export_onnx
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS
    from bsbr_export.manifest import read_manifest
    from bsbr_export.model.config import BSBRConfig
    from bsbr_export.proof.bench import bench_engines, decode_latency, model_flops
    from bsbr_export.proof.optimize import quantize_int8

    shutil.rmtree(args.work, ignore_errors=True)
    if args.export is None:
        export_dir = args.work / args.model
        lab.progress("exporting", lambda: export_model(args.model, export_dir, [FORMATS["onnx"]], streaming=True))
    else:  # a copy: the int8 graph is written into the export
        export_dir = args.work / args.export.name
        shutil.copytree(args.export, export_dir)
    manifest = read_manifest(export_dir)
    config = BSBRConfig.from_dict(manifest["config"])
    sdpa_path = args.work / "sdpa" / "model.onnx"
    lab.progress("exporting SDPA", export_onnx, sdpa_model(config), sdpa_path)
    quant = lab.progress("quantizing", quantize_int8, export_dir)
    engines = lab.progress("timing engines", lambda: bench_engines(export_dir, ENGINES, lengths, budget_s=budget))
    try:
        sdpa = lab.progress("timing SDPA", lab.in_child, lab.onnx_timings, sdpa_path, lengths, config.vocab_size)
    except RuntimeError as exc:  # its L x L scores can run out of memory: the report shows "-"
        sdpa = {"error": str(exc).splitlines()[-1]}
    decode = lab.progress("decode", decode_latency, export_dir, contexts)
    flops_length = lengths[2]
    result = {
        "model": manifest["model"],
        "machine": lab.machine(threads=DEFAULT_THREADS, hidden=config.hidden_size),
        "batch": 1,
        "threads": DEFAULT_THREADS,
        "hidden_size": config.hidden_size,
        "lengths": lengths,
        "flops_length": flops_length,
        "engines": {
            e.engine: {"ok": e.ok, "error": e.error, "timings": [t.__dict__ for t in e.timings]} for e in engines
        },
        "sdpa_ort": sdpa,
        "mflop_per_token": model_flops(config, flops_length) / flops_length / 1e6,
        "decode": [d.__dict__ | {"speedup": d.speedup} for d in decode],
        "int8": {"top1": quant.steps[-1].top1, "fp32_modules": [quant.modules[n] for n in quant.fp32_nodes]},
    }
    result["model_gflops"] = model_flops(config, flops_length) / (best_ort(result, flops_length) / 1e3) / 1e9
    result["targets"] = [{"what": w, "measured": m, "target": t} for w, m, t in targets(result)]
    lab.write(args.out, f"sweep_{result['model']}", result, report)


if __name__ == "__main__":
    main()
