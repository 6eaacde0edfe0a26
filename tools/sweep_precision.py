"""The issue-13 sweep: the trained `bsbr-stdlib`, every engine and precision, side by side.

    python tools/sweep_precision.py [--model bsbr-stdlib | --export DIR] [--lengths 256,512,4096,16384]
        [--out tools/results] [--smoke]

Exports the model to ONNX, runs `optimize` (ORT level, dynamic and static int8, the bf16
plans at the longest length) and `bench` (each engine in its own process, batch 1,
2 threads; held-out bits per byte in windows of each length), and times ONNX Runtime's
own fp32 MatMul in the same run for the machine's limit. Writes
sweep_precision_<model>.{json,md} to --out with the targets of issue 13, at the shortest,
the second-longest and the longest length. Nothing here is asserted; the CPU is named
next to every figure.
`--smoke`: lengths 64, 128, 256, four engines, 2 KiB of held-out text, one thread, short budgets.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import lab

from bsbr_export.defaults import DEFAULT_THREADS

ENGINES = [
    "eager",
    "ort-cpu-all",
    "ort-cpu-optimized",
    "ort-cpu-int8",
    "ort-cpu-int8-static",
    "eager-bf16",
    "compile-bf16",
    "openvino-fp32",
    "openvino-bf16",
]
SMOKE_ENGINES = ["eager", "ort-cpu-all", "ort-cpu-int8", "openvino-bf16"]  # bf16: the quick one
SMOKE_TEXT_BYTES = 2048


def by_length(mapping: dict | None, n: int):
    """`mapping`'s entry for length `n`, whether its keys are ints or (from JSON) strings."""
    mapping = mapping or {}
    return mapping.get(str(n), mapping.get(n))


def targets(result: dict) -> list[tuple[str, float | None, str]]:
    """Issue 13's targets as (what, measured, target) rows, from the figures in `result`:
    speed-ups at the shortest and second-longest length, bf16 at the two longest."""
    lengths = result["lengths"]
    short, main, long = lengths[0], lengths[-2], lengths[-1]
    rows = {r["engine"]: r for r in result["table"]}

    def speedup(engine, n):
        return by_length((rows.get(engine) or {}).get("speedup_vs_eager"), n)

    def distance(engine, n):  # "within 1% of eager": a bf16 run that scores better disagrees too
        moved = by_length((rows.get(engine) or {}).get("bits_per_byte_change_by_length"), n)
        return None if moved is None else abs(moved)

    def p50(engine, n):
        entry = by_length((rows.get(engine) or {}).get("latency_ms"), n)
        return entry["p50"] if entry else None

    bf16 = [e for e in ("openvino-bf16", "eager-bf16", "compile-bf16") if e in rows and rows[e]["status"] != "❌"]
    # The best bf16 artifact: the fastest at `main` of those within 1% of eager at `main`
    # and `long` (the bf16 trap is at long positions); the fastest of all when none is.
    within = [
        e for e in bf16 if all((distance(e, n) if distance(e, n) is not None else 1) <= 0.01 for n in (main, long))
    ]
    best_bf16 = min(within or bf16, key=lambda e: p50(e, main) or float("inf")) if bf16 else None
    int8 = [
        e
        for e in ("ort-cpu-int8", "ort-cpu-int8-static")
        if e in rows and (rows[e]["bits_per_byte_change"] or 1) <= 0.01
    ]
    best_int8 = min(int8, key=lambda e: p50(e, 1024) or p50(e, main) or float("inf")) if int8 else None
    choice = result["recommendation"] or {}
    return [
        (f"recommended / eager speed-up, L={main}", speedup(choice.get("engine"), main), ">= 2.5"),
        (f"recommended / eager speed-up, L={short}", speedup(choice.get("engine"), short), ">= 2.0"),
        ("recommended: worst bits-per-byte change", choice.get("bits_per_byte_change"), "<= 0.01"),
        (
            f"best bf16 ({best_bf16}, {speedup(best_bf16, main)}x at L={main}) bits-per-byte distance from eager, "
            f"L={main}",
            distance(best_bf16, main),
            "<= 0.01",
        ),
        (f"best bf16 ({best_bf16}) bits-per-byte distance from eager, L={long}", distance(best_bf16, long), "<= 0.01"),
        (
            f"int8 ({best_int8}) speed-up vs fp32 ORT, L={main}",
            (p50("ort-cpu-all", main) / p50(best_int8, main)) if best_int8 and p50(best_int8, main) else None,
            ">= 1.5",
        ),
        (
            f"fp32 ORT model GFLOP/s / ORT MatMul GFLOP/s, L={result['flops_length']}",
            result["model_gflops"] / result["machine"]["matmul_gflops"],
            ">= 0.75",
        ),
    ]


def report(result: dict, bench_table: str, previous: dict | None) -> str:
    """bench's table, the machine's MatMul limit, the targets, a caveat where eager itself
    fails, and what moved since `previous` (the sweep this one replaces)."""
    machine = result["machine"]
    lines = [
        *lab.heading(f"Precision sweep: {result['model']}, batch 1, {machine['threads']} threads", machine),
        "Each engine in its own process, one run; bits per byte on the held-out slice in windows of each length.",
        "",
        bench_table,
        "",
        f"The model under fp32 ORT at L={result['flops_length']}: {result['model_gflops']:.0f} GFLOP/s, against "
        "ORT's own MatMul's above (same run).",
        "",
        *lab.target_lines([(t["what"], t["measured"], t["target"]) for t in result["targets"]]),
    ]
    rows = {r["engine"]: r for r in result["table"]}
    broken = [n for n, bpb in ((rows.get("eager") or {}).get("bits_per_byte") or {}).items() if bpb > 8]
    if broken:
        lines += [
            "",
            f"Caveat: eager fp32 scores over 8 bits per byte (worse than a uniform guess) at L="
            f"{', '.join(map(str, broken))}: the model does not work at those lengths (trained on shorter "
            "windows), so the changes measured there compare two broken predictions and prove nothing.",
        ]
    if previous:
        lines += ["", *changes_lines(previous, result)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = lab.parser(__doc__, model="bsbr-stdlib", export="copy into --work (ONNX)")
    parser.add_argument("--lengths", default="256,512,4096,16384")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bsbr_sweep_precision"))
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per engine and length")
    parser.add_argument("--reuse", action="store_true", help="bench --work's earlier export and optimize again")
    args = parser.parse_args()
    wanted, threads, optimize_length = ENGINES, DEFAULT_THREADS, 1024
    if args.smoke:
        # One thread: torch's two-thread pool crawls when other processes hold the cores.
        args.lengths, args.budget, wanted, threads, optimize_length = "64,128,256", 0.2, SMOKE_ENGINES, 1, 256
    lengths = [int(n) for n in args.lengths.split(",")]

    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS
    from bsbr_export.manifest import read_manifest
    from bsbr_export.model.config import BSBRConfig
    from bsbr_export.proof.bench import model_flops
    from bsbr_export.proof.evaltext import heldout_text
    from bsbr_export.proof.optimize import optimize_export
    from bsbr_export.runtime.engines import available_engines
    from bsbr_export.workflows import BenchOptions, benchmark

    text = heldout_text(SMOKE_TEXT_BYTES) if args.smoke else None  # None: the held-out default
    export_dir = args.work / (args.export.name if args.export else args.model)
    done = None  # stays None with --reuse: timing again what an earlier run exported and optimized
    if not (args.reuse and (export_dir / "bf16.json").is_file()):
        shutil.rmtree(args.work, ignore_errors=True)
        if args.export:  # a copy: optimize writes its graphs and plans into the export
            shutil.copytree(args.export, export_dir)
        else:
            lab.progress("exporting", export_model, args.model, export_dir, [FORMATS["onnx"]])
        # int8 and bf16 plans must hold in windows of every length benched: int8 loses most in
        # short windows, bf16 at long positions.
        done = lab.progress(
            "optimizing",
            lambda: optimize_export(
                export_dir,
                length=optimize_length,
                threads=threads,
                static_int8=True,
                bf16=True,
                eval_windows=tuple(lengths),
                eval_text=text,
                progress=lambda step: print(step, flush=True),
            ),
        )
    engines = [e for e in wanted if e in available_engines(export_dir)]
    print("benchmarking", engines, flush=True)
    options = BenchOptions(
        lengths=tuple(lengths),
        engines=tuple(engines),
        validation_lengths=tuple(lengths) if args.smoke else None,
        threads=threads,
        budget_s=args.budget,
        eval_text=text,
    )
    run = benchmark(export_dir, options, progress=lambda step: print(step, flush=True))
    manifest = read_manifest(export_dir)
    config = BSBRConfig.from_dict(manifest["config"])
    bench = json.loads((export_dir / "report.json").read_text())
    rows = {r["engine"]: r for r in bench["table"]}
    flops_length = lengths[-2]
    fp32_p50 = [
        by_length(rows[e]["latency_ms"], flops_length) for e in ("ort-cpu-all", "ort-cpu-optimized") if e in rows
    ]
    best_fp32_ort = min((t["p50"] for t in fp32_p50 if t), default=None)
    name = f"sweep_precision_{manifest['model']}"
    previous_path = args.out / f"{name}.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else None
    result = {
        "model": manifest["model"],
        "machine": lab.machine(threads=threads, hidden=config.hidden_size),
        "hidden_size": config.hidden_size,
        "lengths": lengths,
        "engines": engines,
        "recommendation": run.recommendation,
        "flops_length": flops_length,
        "model_gflops": model_flops(config, flops_length) / (best_fp32_ort / 1e3) / 1e9
        if best_fp32_ort
        else float("nan"),
        "bf16_plans": json.loads((export_dir / "bf16.json").read_text()),
        "int8": [
            {
                "method": q.method,
                "fp32_modules": [q.modules[n] for n in q.fp32_nodes],
                "reached": q.reached,
                "steps": [s.__dict__ for s in q.steps],
            }
            for q in done.int8
        ]
        if done
        else previous["int8"],
        "table": bench["table"],
    }
    result["targets"] = [{"what": w, "measured": m, "target": t} for w, m, t in targets(result)]
    # bench's own markdown table, without its title and from the memory figures on
    bench_table = (export_dir / "report.md").read_text().split("\n", 2)[2].split("Peak RSS")[0].strip()
    lab.write(args.out, name, result, functools.partial(report, bench_table=bench_table, previous=previous))


def changes_lines(previous: dict, current: dict) -> list[str]:
    """What moved since the previous sweep of this model (the file this run replaces):
    the recommendation, the parts each reduced precision keeps in fp32, each engine's worst
    bits-per-byte change and its speed-up at 4096."""

    def fp32_parts(sweep: dict) -> dict[str, str]:
        parts = {f"int8 {q['method']}": ", ".join(q["fp32_modules"]) or "none" for q in sweep["int8"]}
        for engine, plan in sweep["bf16_plans"].items():
            parts[engine] = ", ".join(plan.get("keep_fp32") or []) or "none"
        return parts

    def rows(sweep: dict) -> dict[str, dict]:
        return {r["engine"]: r for r in sweep["table"]}

    def rec(sweep: dict) -> str:
        choice = sweep.get("recommendation") or {}
        return f"{choice.get('engine')} ({choice.get('precision')})"

    before, after = fp32_parts(previous), fp32_parts(current)
    old_rows, new_rows = rows(previous), rows(current)
    lines = [
        "## Against the previous sweep",
        "",
        (
            f"Previous: {previous['machine']['processor']}, eager bits per byte {eager_bpb(old_rows)}; "
            f"now: {current['machine']['processor']}, {eager_bpb(new_rows)}."
        ),
        "",
        f"Recommendation: {rec(previous)} -> {rec(current)}.",
        "",
        "| reduced precision | kept in fp32 before | kept in fp32 now |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {before.get(k, '-')} | {after.get(k, '-')} |" for k in sorted(set(before) | set(after))]
    lines += [
        "",
        "| engine | worst bits/byte change before | now | speed-up at 4096 before | now |",
        "|---|---|---|---|---|",
    ]
    for engine in [e for e in new_rows if e in old_rows]:
        (wb, ub), (wa, ua) = change_cells(old_rows[engine]), change_cells(new_rows[engine])
        lines.append(f"| {engine} | {wb} | {wa} | {ub} | {ua} |")
    return lines


def eager_bpb(rows: dict[str, dict]) -> str:
    return " / ".join(f"{v:.3f}" for v in ((rows.get("eager") or {}).get("bits_per_byte") or {}).values())


def change_cells(row: dict) -> tuple[str, str]:
    """An engine's worst bits-per-byte change and its speed-up at 4096, as table cells."""
    worst = row.get("bits_per_byte_change")
    up = (row.get("speedup_vs_eager") or {}).get("4096")
    return (f"{worst:+.2%}" if worst is not None else "-"), (f"{up}x" if up else "-")


if __name__ == "__main__":
    main()
