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
