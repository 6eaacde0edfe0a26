"""Rich tables for results (the library returns data; this turns it into text)."""

from __future__ import annotations

from rich.table import Table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


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
            "[green]passed[/]" if a.parity.passed else "[red]FAILED[/]",
        )
    return table


def validation_table(result) -> Table:
    """One row per artifact and engine: cases, worst errors, top-1, verdict."""
    table = Table(title=f"validation of {result.export_dir} (tolerance {result.tolerance:g} x logit scale)")
    for column in ("artifact", "engine", "cases", "max abs", "top-1", "status"):
        table.add_column(column, justify="left" if column in ("artifact", "engine", "status") else "right")
    for check in result.checks:
        diffs = [d for r in check.parity.results for d in r.diffs]
        top1 = [d.top1 for d in diffs if d.top1 is not None]
        failed = sum(not r.passed for r in check.parity.results)
        status = "[green]passed[/]" if check.passed else f"[red]FAILED {failed}[/]"
        if check.first_bad_layer:
            status += f" (diverges at {check.first_bad_layer})"
        table.add_row(
            check.artifact,
            check.engine,
            str(len(check.parity.results)),
            f"{max(d.max_abs for d in diffs):.2e}",
            f"{min(top1):.3f}" if top1 else "-",
            status,
        )
    return table
