"""Rich tables for results (the library returns data; this turns it into text), and
the progress lines long commands print while they work."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bsbr_export.defaults import DEFAULT_ACCURACY_BUDGET
from bsbr_export.proof.bench import NOISY_SPREAD
from bsbr_export.proof.evaltext import worst_change
from bsbr_export.proof.report import human_bytes, ms_text, speedup_text, status


@contextlib.contextmanager
def progress_steps(console: Console) -> Iterator[Callable[[str], None]]:
    """A `progress(step)` callback for library calls.

    On a terminal: rich progress, one line per step with a spinner and its elapsed
    time. Elsewhere (CI logs, pipes): one plain stderr line per step, stamped with the
    seconds since the command started, so a slow step is never silent.
    """
    start = time.perf_counter()
    if not console.is_terminal:
        yield from _plain_steps(start)
        return

    with Progress(
        SpinnerColumn(finished_text="[green]✓[/]"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        current = []

        def step(name: str) -> None:
            if current:
                bar.update(current[-1], total=1, completed=1)
                bar.stop_task(current[-1])
            current.append(bar.add_task(name, total=None))

        yield step
        if current:
            bar.update(current[-1], total=1, completed=1)


FIRST_STEP_GRACE_S = 1.0  # the first step's line waits this long: a bad input found at once stays one line


def _plain_steps(start: float) -> Iterator[Callable[[str], None]]:
    """progress_steps off a terminal: one stamped stderr line per step. The first line is
    held back briefly and dropped if the command fails meanwhile, so an error found while
    loading the model is still the only line on stderr."""
    lock = threading.Lock()
    held: list[str] = []

    def flush() -> None:
        with lock:
            if held:
                click.echo(held.pop(), err=True)

    timer = threading.Timer(FIRST_STEP_GRACE_S, flush)
    timer.daemon = True
    first = True

    def step(name: str) -> None:
        nonlocal first
        line = f"[{time.perf_counter() - start:6.1f} s] {name}"
        if first:
            first = False
            held.append(line)
            timer.start()
            return
        timer.cancel()
        flush()
        click.echo(line, err=True)

    try:
        yield step
    except BaseException:
        timer.cancel()
        held.clear()
        raise
    timer.cancel()
    flush()


def latency_text(timing) -> str:
    """Median ms ± half its p10-p90 spread as a share of the median, ⚠ when it is large."""
    flag = " ⚠" if timing.noisy else ""
    return f"{ms_text(timing.p50_ms)} ±{50 * timing.spread:.0f}%{flag}"


def stdout_console() -> Console:
    """The console results are printed on. Off a terminal rich would cut tables at 80
    columns ("hea…"); there they get the width they need (or $COLUMNS when set)."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=200)
    return console


def export_table(result) -> Table:
    """Artifact, size, export time, max abs error over the check lengths, verdict."""
    table = Table(title=f"exported to {result.directory}")
    for column in ("artifact", "size", "export", "cases", "max abs err", "status"):
        table.add_column(column, justify="left" if column in ("artifact", "status") else "right")
    for a in result.artifacts:
        table.add_row(
            a.name,
            human_bytes(a.bytes),
            f"{a.seconds:.1f} s",
            str(len(a.parity.results)),
            f"{a.parity.max_abs:.2e}",
            passed_text(a.parity) if a.parity.passed else "[red]FAILED[/]",
        )
    return table


def passed_text(parity) -> str:
    """'passed', saying how many cases passed only against the float64 model."""
    judged = parity.judged_by_float64
    return "[green]passed[/]" + (f" ({judged} within fp32's own error)" if judged else "")


def validation_table(result) -> Table:
    """One row per artifact and engine: cases, worst errors, top-1, verdict."""
    table = Table(title=f"validation of {result.export_dir} (tolerance {result.tolerance:g} x logit scale)")
    scored = any(c.text for c in result.checks)
    columns = (
        "artifact",
        "engine",
        "cases",
        "max abs",
        "top-1",
        *(("bits/byte", "vs eager") if scored else ()),
        "status",
    )
    for column in columns:
        table.add_column(
            column,
            justify="left" if column in ("artifact", "engine", "status") else "right",
            no_wrap=column == "artifact",
        )
    for check in result.checks:
        diffs = [d for r in check.parity.results for d in r.diffs]
        top1 = [d.top1 for d in diffs if d.top1 is not None]
        failed = sum(not r.passed for r in check.parity.results)
        status = passed_text(check.parity) if check.passed else f"[red]FAILED {failed}[/]"
        if check.first_bad_layer:
            status += f" (diverges at {check.first_bad_layer})"
        table.add_row(
            check.artifact,
            check.engine,
            str(len(check.parity.results)),
            f"{max(d.max_abs for d in diffs):.2e}",
            f"{min(top1):.3f}" if top1 else "-",
            *(text_cells(check.text) if scored else ()),
            status,
        )
    return table


def text_cells(score) -> tuple[str, str]:
    """Bits per byte and its change against eager (red past the budget), or dashes."""
    if score is None:
        return "-", "-"
    change = f"{score.change:+.2%}"
    return f"{score.bits_per_byte:.4f}", change if score.passed else f"[red]{change}[/]"


def bench_table(result, tolerance: float, accuracy_budget: float = DEFAULT_ACCURACY_BUDGET) -> Table:
    """Engine, status, max abs err, median latency and speed-up vs eager per length."""
    table = Table(
        title=f"bench: batch {result.batch}, {result.threads} threads",
        caption=f"median ms ±half the p10-p90 spread, and speed-up vs eager; ⚠ spread over "
        f"{NOISY_SPREAD:.0%} of the median: a noisy figure (rerun on a quieter machine)",
    )
    table.add_column("engine", no_wrap=True)
    table.add_column("ok")
    table.add_column("max err", justify="right")
    for n in result.lengths:
        table.add_column(f"L={n} ms", justify="right", no_wrap=True)
        table.add_column("vs eager", justify="right")
    eager = result.reference()
    for engine in result.engines:
        cells = [
            engine.engine,
            status(engine, tolerance, eager, accuracy_budget),
            f"{engine.max_abs:.0e}" if engine.max_abs is not None else "-",
        ]
        for n in result.lengths:
            timing = engine.at(n)
            base = eager.at(n) if eager and eager.ok else None
            if timing is None:
                cells += ["-", "-"]
            else:
                cells += [latency_text(timing), speedup_text(base.p50_ms / timing.p50_ms) if base else "-"]
        table.add_row(*cells)
    return table


def levels_table(choice) -> Table:
    """ORT optimization levels: latency, parity, the one chosen."""
    table = Table(title=f"ONNX Runtime optimization levels at L={choice.length} (median ms)")
    for column in ("level", "ms", "max abs err", "matches eager", "chosen"):
        table.add_column(column, justify="right" if column in ("ms", "max abs err") else "left")
    for t in choice.timings:
        chosen = (
            "<- saved" + (" (this machine only)" if choice.hardware_specific else "")
            if t.level == choice.chosen
            else ""
        )
        table.add_row(t.level, f"{t.p50_ms:.1f}", f"{t.max_abs:.1e}", "yes" if t.passed else "NO", chosen)
    return table


def bpb_text(by_window: dict[int, float]) -> str:
    """Bits per byte by window length, in the windows' order: '3.6091 / 3.5711'."""
    return " / ".join(f"{bpb:.4f}" for bpb in by_window.values())


def quant_table(quant) -> Table:
    """int8: accuracy and speed as the most sensitive MatMuls return to fp32."""
    batch, length = quant.shape
    scored = quant.fp32_bits_per_byte is not None
    title = f"int8 {quant.method} quantization at batch {batch} x {length} (fp32: {quant.fp32_p50_ms:.1f} ms"
    if scored:
        windows = "/".join(map(str, quant.fp32_bits_per_byte))
        title += f", {bpb_text(quant.fp32_bits_per_byte)} bits/byte in windows of {windows})"
    else:
        title += ")"
    table = Table(title=title)
    columns = (
        "fp32 MatMuls",
        "last kept in fp32",
        "top-1",
        "max abs err",
        *(("bits/byte", "worst vs fp32") if scored else ()),
        "ms",
        "vs fp32",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "last kept in fp32" else "right")
    ranked = sorted(quant.sensitivity, key=quant.sensitivity.get, reverse=True)
    for step in quant.steps:
        last = quant.modules[ranked[step.kept_fp32 - 1]] if step.kept_fp32 else "-"
        text = (bpb_text(step.bits_per_byte), f"{step.change:+.2%}") if scored else ()
        table.add_row(
            str(step.kept_fp32),
            last,
            f"{step.top1:.3f}",
            f"{step.max_abs:.3f}",
            *text,
            f"{step.p50_ms:.1f}",
            speedup_text(quant.fp32_p50_ms / step.p50_ms),
        )
    return table


def bf16_table(plan) -> Table:
    """bf16: held-out bits per byte (by window) with every group bf16, each group alone
    back in fp32, and the groups kept fp32; changes are the worst window's."""
    windows = "/".join(map(str, plan.windows))
    all_bf16 = worst_change(plan.all_bf16_bpb, plan.fp32_bpb)
    table = Table(
        title=f"{plan.engine} in windows of {windows}: fp32 {bpb_text(plan.fp32_bpb)} bits/byte, "
        f"all bf16 {bpb_text(plan.all_bf16_bpb)} ({all_bf16:+.2%})"
    )
    table.add_column("back in fp32")
    table.add_column("bits/byte", justify="right")
    table.add_column("worst vs fp32", justify="right")
    ranked = sorted(plan.sensitivity.items(), key=lambda item: worst_change(item[1], plan.fp32_bpb))
    for group, bpb in ranked:
        table.add_row(group, bpb_text(bpb), f"{worst_change(bpb, plan.fp32_bpb):+.2%}")
    kept = ", ".join(plan.keep_fp32) or "nothing"
    table.add_row(f"[bold]kept: {kept}[/]", bpb_text(plan.bpb), f"{plan.change:+.2%}")
    return table
