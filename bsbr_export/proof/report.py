"""Reports: `report.json` for machines, `report.md` + PNG plots for people.

One table of every engine: status (✅ passed, ❎ ran but failed parity, ❌ failed to
export or run), artifact size, max abs error vs eager, latency and speed-up vs eager.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from bsbr_export.defaults import DEFAULT_ACCURACY_BUDGET, PRECISION_TOLERANCES
from bsbr_export.io import atomic_write
from bsbr_export.proof.bench import NOISY_SPREAD, round_sig
from bsbr_export.runtime.engines import ENGINES


def artifact_for(engine: str) -> str | None:
    """The file an engine runs (None for eager / torch.compile, which run the model)."""
    return ENGINES[engine].artifact if engine in ENGINES else None


def status(engine, tolerance: float, eager=None, accuracy_budget: float = DEFAULT_ACCURACY_BUDGET) -> str:
    """✅ / ❎ / ❌ for one EngineResult, by validate's rule: a reduced precision scored on
    held-out text against `eager` is judged by that score alone (its worst change of bits
    per byte within `accuracy_budget`); anything else by parity relative to the logit
    scale (reduced precisions with their own tolerances)."""
    if not engine.ok:
        return "❌"
    changes = text_changes(engine, eager)
    if precision_of(engine.engine) != "fp32" and changes:
        return "✅" if max(changes.values()) <= accuracy_budget else "❎"
    allowed = PRECISION_TOLERANCES.get(precision_of(engine.engine), tolerance)
    return "✅" if engine.max_abs is not None and engine.max_abs <= allowed * engine.logit_scale else "❎"


def precision_of(engine: str) -> str:
    """The numeric precision an engine computes in (the engine table's; fp32 for others)."""
    return ENGINES[engine].precision if engine in ENGINES else "fp32"


def speedup_text(x: float | None) -> str:
    """A speed-up with two significant digits: 0.050x, 1.4x, 12x (never "0.0x")."""
    if x is None or not math.isfinite(x) or x <= 0:
        return "-"
    rounded = round_sig(x)  # first, so 9.96 reads 10x, not "10.x"
    return f"{rounded:.0f}x" if rounded >= 10 else f"{rounded:#.2g}x"


def ms_text(ms: float) -> str:
    """Milliseconds to three significant digits, never in e-notation: 0.812, 12.3, 1290."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def text_changes(engine, eager) -> dict[int, float]:
    """Relative change of held-out bits per byte against eager's, per window length
    ({} when unscored)."""
    if not engine.bits_per_byte or eager is None or not eager.bits_per_byte:
        return {}
    return {
        n: bpb / eager.bits_per_byte[n] - 1 for n, bpb in engine.bits_per_byte.items() if eager.bits_per_byte.get(n)
    }


def recommend(rows: list[dict], accuracy_budget: float) -> dict | None:
    """The fastest engine (geometric mean of its speed-ups over the lengths) that stays
    accurate: held-out bits per byte within `accuracy_budget` of eager's for a byte-level
    LM, else passing parity (✅). None when nothing was timed against eager."""

    def accurate(row) -> bool:
        if row["bits_per_byte_change"] is not None:
            return row["status"] != "❌" and row["bits_per_byte_change"] <= accuracy_budget
        return row["status"] == "✅"

    def speed(row) -> float:
        ups = [u for u in row["speedup_vs_eager"].values() if u]
        return math.exp(sum(map(math.log, ups)) / len(ups)) if ups else 0.0

    candidates = [r for r in rows if accurate(r) and speed(r) > 0]
    if not candidates:
        return None
    best = max(candidates, key=speed)
    return {
        "engine": best["engine"],
        "artifact": best["artifact"],
        "precision": best["precision"],
        "speedup_vs_eager": best["speedup_vs_eager"],
        "bits_per_byte": best["bits_per_byte"],
        "bits_per_byte_change": best["bits_per_byte_change"],
        "accuracy_budget": accuracy_budget,
        "rejected": [r["engine"] for r in rows if speed(r) > speed(best) and not accurate(r)],
    }


def engine_rows(
    result, export_dir: Path, tolerance: float, accuracy_budget: float = DEFAULT_ACCURACY_BUDGET
) -> list[dict]:
    """The report table as data: one dict per engine."""
    eager = result.reference()
    rows = []
    for engine in result.engines:
        artifact = artifact_for(engine.engine)
        changes = text_changes(engine, eager)
        size = (export_dir / artifact).stat().st_size if artifact and (export_dir / artifact).is_file() else None
        row = {
            "engine": engine.engine,
            "status": status(engine, tolerance, eager, accuracy_budget),
            "artifact": artifact,
            "bytes": size,
            "max_abs": engine.max_abs,
            "top1": engine.top1,
            "bits_per_byte": engine.bits_per_byte,
            "bits_per_byte_change_by_length": changes,
            "bits_per_byte_change": max(changes.values()) if changes else None,  # the worst length
            "precision": precision_of(engine.engine),
            "error": engine.error,
            "latency_ms": {},
            "speedup_vs_eager": {},
            "peak_rss_mib": {},
            "tokens_per_s": {},
        }
        for timing in engine.timings:
            row["latency_ms"][timing.length] = {
                "p50": timing.p50_ms,
                "p10": timing.p10_ms,
                "p90": timing.p90_ms,
                "p99": timing.p99_ms,
                "spread": round_sig(timing.spread),
                "iters": timing.iters,
                "noisy": timing.noisy,
            }
            row["peak_rss_mib"][timing.length] = timing.peak_rss_mib
            row["tokens_per_s"][timing.length] = timing.tokens_per_s
            base = eager.at(timing.length) if eager and eager.ok else None
            # Two significant digits: the runs' spread makes a third meaningless.
            row["speedup_vs_eager"][timing.length] = round_sig(base.p50_ms / timing.p50_ms) if base else None
        rows.append(row)
    return rows


def recommendation_text(choice: dict | None) -> str:
    """One sentence: what to deploy on this CPU, and why."""
    if choice is None:
        return "No engine both ran and stayed accurate: nothing to recommend."
    ups = ", ".join(f"{u}x at L={n}" for n, u in choice["speedup_vs_eager"].items())
    artifact = f" ({choice['artifact']})" if choice["artifact"] else ""
    text = f"**Recommended here: {choice['engine']}{artifact}, {choice['precision']}**: {ups} vs eager"
    if choice["bits_per_byte_change"] is not None:
        text += (
            f", held-out bits per byte at worst {choice['bits_per_byte_change']:+.2%} vs eager's over the "
            f"lengths (budget {choice['accuracy_budget']:+.0%})"
        )
    if choice["rejected"]:
        text += f"; faster but outside the accuracy budget: {', '.join(choice['rejected'])}"
    return text + "."


def markdown(
    result,
    rows: list[dict],
    validation: dict | None,
    title: str,
    note: str | None = None,
    choice: dict | None = None,
    precisions: list[dict] | None = None,
) -> str:
    """report.md: the recommendation, the precisions tried, the engine table, decode
    latency, validation, plots."""
    lines = [f"# {title}", ""]
    if note:
        lines += [f"> **Note:** {note}", ""]
    lines += [recommendation_text(choice), ""] + precision_lines(precisions)
    lines.append(
        f"batch {result.batch}, {result.threads} threads, warm-up {result.warmup}; latency = median ms "
        f"±half its p10-p90 spread (runs repeated until that spread is small or the time budget ends; "
        f"⚠ = spread over {NOISY_SPREAD:.0%} of the median, a noisy figure); "
        f"machine: {result.machine.get('processor')} x{result.machine.get('cpu_count')} "
        f"({', '.join(result.machine.get('cpu_features') or ['no AVX2'])}), {result.machine.get('platform')}; "
        f"the ranking depends on these features."
    )
    lines.append(
        "Status: ✅ passed, ❎ ran but failed (parity vs eager; a reduced precision of a byte-level LM: its "
        "held-out bits per byte over the budget), ❌ failed to export or run."
    )
    lines.append("")
    lines += _engine_lines(rows, list(result.lengths)) + _memory_lines(rows, list(result.lengths))
    lines += _decode_lines(result.decode) + _validation_lines(validation)
    lines += ["", "![latency](latency.png)", "", "![memory](memory.png)"]
    if result.decode:
        lines += ["", "![decode](decode.png)"]
    return "\n".join(lines) + "\n"


def precision_lines(precisions: list[dict] | None) -> list[str]:
    """Which reduced precisions bench made, found or skipped, and why."""
    if not precisions:
        return []
    lines = ["Reduced precision considered:", ""]
    for p in precisions:
        reason = f": {p['reason']}" if p["reason"] else ""
        lines.append(f"- {p['precision']} ({', '.join(p['engines'])}): {p['outcome']}{reason}")
    return lines + [""]


def _engine_lines(rows: list[dict], lengths: list[int]) -> list[str]:
    """The engine table: status, size, errors, bits per byte, latency and speed-up per length."""
    scored = any(r["bits_per_byte"] is not None for r in rows)
    per_length = "/".join(map(str, lengths))
    header = [
        "engine",
        "status",
        "size",
        "max abs err",
        "top-1",
        *((f"bits/byte (L={per_length})", "vs eager") if scored else ()),
    ]
    header += [f"L={n} ms" for n in lengths] + [f"L={n} vs eager" for n in lengths]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["engine"],
            row["status"],
            human_bytes(row["bytes"]) if row["bytes"] else "-",
            f"{row['max_abs']:.1e}" if row["max_abs"] is not None else "-",
            f"{row['top1']:.3f}" if row["top1"] is not None else "-",
        ]
        if scored:
            bpb, changes = row["bits_per_byte"] or {}, row["bits_per_byte_change_by_length"]
            cells += [
                " / ".join(f"{bpb[n]:.3f}" for n in lengths if n in bpb) or "-",
                " / ".join(f"{changes[n]:+.2%}" for n in lengths if n in changes) or "-",
            ]
        for n in lengths:
            lat = row["latency_ms"].get(n)
            cells.append(
                f"{ms_text(lat['p50'])} ±{50 * lat['spread']:.0f}%{' ⚠' if lat['noisy'] else ''}" if lat else "-"
            )
        cells += [speedup_text(row["speedup_vs_eager"].get(n)) for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
        if row["error"]:
            lines.append(f"|  ↳ {row['engine']} failed: {row['error']} |" + " |" * (len(header) - 1))
    return lines


def _memory_lines(rows: list[dict], lengths: list[int]) -> list[str]:
    lines = ["", "Peak RSS (MiB, each engine in its own process):", ""]
    lines.append("| engine | " + " | ".join(f"L={n}" for n in lengths) + " |")
    lines.append("|---|" + "---|" * len(lengths))
    for row in rows:
        mem = [f"{row['peak_rss_mib'][n]:.0f}" if n in row["peak_rss_mib"] else "-" for n in lengths]
        lines.append(f"| {row['engine']} | " + " | ".join(mem) + " |")
    return lines


def _decode_lines(decode) -> list[str]:
    if not decode:
        return []
    lines = ["", f"## Streaming decode (ONNX Runtime, batch 1, {decode[0].graph})", ""]
    lines.append("| context | per-token ms (p90) | full forward ms | streaming speed-up |")
    lines.append("|---|---|---|---|")
    for d in decode:
        lines.append(
            f"| {d.context} | {d.step_p50_ms:.2f} ({d.step_p90_ms:.2f}) | {d.full_forward_p50_ms:.1f} | "
            f"{speedup_text(d.speedup)} |"
        )
    return lines


def _validation_lines(validation: dict | None) -> list[str]:
    if validation is None:
        return []
    lines = [
        "",
        "## Validation",
        "",
        f"Tolerance {validation['tolerance']:g} x logit scale; passed: {validation['passed']}.",
        "",
        "| artifact | engine | cases | max abs err | status |",
        "|---|---|---|---|---|",
    ]
    for check in validation["checks"]:
        parity = check["parity"]
        verdict = "✅" if check["passed"] else "❎"
        if check["judged_by"] == "held-out text":
            verdict += " (by held-out bits per byte)"
        elif check["first_bad_layer"]:
            verdict += f" (diverges at {check['first_bad_layer']})"
        lines.append(
            f"| {check['artifact']} | {check['engine']} | {len(parity['cases'])} | {parity['max_abs']:.1e} | "
            f"{verdict} |"
        )
    return lines


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
SAME = 0.02  # series within 2% of each other everywhere are drawn as one line, named for all


def _merged(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """Group engines whose curves coincide (every ORT level's memory is the same), so
    one line per visible curve carries all their names instead of hiding under another."""
    groups: list[tuple[list[str], list[tuple[int, float]]]] = []
    for name, points in series.items():
        for names, ref in groups:
            if [x for x, _ in ref] == [x for x, _ in points] and all(
                abs(y - r) <= SAME * max(abs(r), 1e-12) for (_, y), (_, r) in zip(points, ref)
            ):
                names.append(name)
                break
        else:
            groups.append(([name], points))
    return {", ".join(names): points for names, points in groups}


def _log_axes(ax, xs: list[int], xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes labelled at the measured x values, with plain-number y ticks at 1-2-5
    steps (so every line sits between labelled ticks)."""
    from matplotlib.ticker import (  # matplotlib is heavy: only when plotting
        FixedLocator,
        LogLocator,
        NullFormatter,
        NullLocator,
        ScalarFormatter,
    )

    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(xs))))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    ax.yaxis.set_major_formatter(formatter)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelrotation=0)
    ax.grid(True, which="major", alpha=0.3)


def _lines(ax, series: dict[str, list[tuple[int, float]]]) -> None:
    for i, (label, points) in enumerate(_merged(series).items()):
        ax.plot(
            [x for x, _ in points],
            [y for _, y in points],
            label=label,
            marker=MARKERS[i % len(MARKERS)],
            linestyle=LINE_STYLES[i % len(LINE_STYLES)],
            markersize=6,
            linewidth=1.5,
        )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def plot(result, directory: Path) -> list[Path]:
    """latency.png and memory.png (log-log vs length), decode.png (vs context)."""
    import matplotlib  # heavy: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only when plotting

    written = []
    for name, ylabel, value in (
        ("latency", "median latency (ms)", lambda t: t.p50_ms),
        ("memory", "peak RSS (MiB)", lambda t: t.peak_rss_mib),
    ):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        series = {e.engine: [(t.length, value(t)) for t in e.timings] for e in result.engines if e.timings}
        _lines(ax, series)
        _log_axes(
            ax,
            list(result.lengths),
            "sequence length (tokens)",
            ylabel,
            f"{ylabel} vs length (batch {result.batch}, {result.threads} threads)",
        )
        written.append(_save(fig, directory / f"{name}.png"))
    if result.decode:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        contexts = [d.context for d in result.decode]
        _lines(
            ax,
            {
                "streaming step (1 token)": [(d.context, d.step_p50_ms) for d in result.decode],
                "full forward over context + 1": [(d.context, d.full_forward_p50_ms) for d in result.decode],
            },
        )
        _log_axes(ax, contexts, "context length (tokens)", "ms per new token", "decode latency vs context")
        written.append(_save(fig, directory / "decode.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # heavy: only when plotting

    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(
    result,
    export_dir: str | os.PathLike,
    *,
    tolerance: float,
    validation: dict | None = None,
    title: str = "",
    note: str | None = None,
    accuracy_budget: float = DEFAULT_ACCURACY_BUDGET,
    precisions: list[dict] | None = None,
) -> tuple[list[Path], dict | None]:
    """Write report.json, report.md and the plots into `export_dir`; returns the paths
    and the recommendation (`recommend`). `precisions`: the reduced precisions bench
    considered (precision, engines, outcome, reason), listed under the recommendation."""
    directory = Path(export_dir)
    rows = engine_rows(result, directory, tolerance, accuracy_budget)
    choice = recommend(rows, accuracy_budget)
    data = {
        "bench": result.to_dict(),
        "table": rows,
        "recommendation": choice,
        "validation": validation,
        "tolerance": tolerance,
        "note": note,
        "precisions": precisions,
    }
    written = []
    with atomic_write(directory / "report.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    written.append(directory / "report.json")
    written += plot(result, directory)
    with atomic_write(directory / "report.md") as tmp:
        tmp.write_text(
            markdown(
                result, rows, validation, title or f"bsbr-export report: {directory.name}", note, choice, precisions
            )
        )
    written.append(directory / "report.md")
    return written, choice
