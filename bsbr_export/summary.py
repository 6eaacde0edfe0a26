"""The quick-start job: build a model, run it whole and streamed, summarize."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from rich.table import Table

from bsbr_export.compare.cases import stream_pieces
from bsbr_export.defaults import DEFAULT_TOLERANCE
from bsbr_export.model.checkpoint import load_model


@dataclass(frozen=True)
class RunSummary:
    """What `bsbr-export run` measured."""

    model: str
    params: int
    batch: int
    length: int
    chunk_size: int
    output_shape: tuple[int, ...]
    forward_ms: float
    stream_pieces: tuple[int, ...]
    stream_max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.stream_max_abs_diff <= self.tolerance

    def to_table(self):
        """A rich table for the terminal."""
        table = Table(title=f"bsbr-export run {self.model}", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("parameters", f"{self.params:,}")
        table.add_row("input", f"batch {self.batch} x length {self.length} (chunk {self.chunk_size})")
        table.add_row("output", " x ".join(map(str, self.output_shape)))
        table.add_row("forward (eager)", f"{self.forward_ms:.1f} ms")
        table.add_row("streamed in pieces", ", ".join(map(str, self.stream_pieces)))
        verdict = "[green]equal[/]" if self.passed else "[red]DIFFERENT[/]"
        table.add_row(
            "stream vs forward",
            f"max abs diff {self.stream_max_abs_diff:.2e} (tol {self.tolerance:.0e}): {verdict}",
        )
        return table


def summarize(model_name: str, length: int | None = None, batch: int = 2, seed: int = 0) -> RunSummary:
    """Run `model_name` on random tokens whole and streamed; return the comparison."""
    model = load_model(model_name)
    cfg = model.config
    length = length or 4 * cfg.chunk_size + 3
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=generator)
    pieces = stream_pieces(length, cfg.chunk_size)
    with torch.inference_mode():
        start = time.perf_counter()
        full = model(ids)
        forward_ms = (time.perf_counter() - start) * 1e3
        state, outputs, at = model.init_state(batch), [], 0
        for size in pieces:
            out, state = model.stream(ids[:, at : at + size], state)
            outputs.append(out)
            at += size
        diff = (torch.cat(outputs, dim=1) - full).abs().max().item()
    return RunSummary(
        model=model_name,
        params=sum(p.numel() for p in model.parameters()),
        batch=batch,
        length=length,
        chunk_size=cfg.chunk_size,
        output_shape=tuple(full.shape),
        forward_ms=forward_ms,
        stream_pieces=tuple(pieces),
        stream_max_abs_diff=diff,
        tolerance=DEFAULT_TOLERANCE,
    )
