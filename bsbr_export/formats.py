"""The one table of export formats: it feeds the CLI's choices, export and checks."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from bsbr_export.errors import UserError


@dataclass(frozen=True)
class Format:
    """An artifact kind: its file suffix, and whether it has a streaming variant."""

    name: str
    suffix: str
    description: str
    streaming: bool = True
    needs_gpu: bool = False


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx", ".onnx", "ONNX graph for ONNX Runtime (torch.export-based exporter)"),
        Format("torchscript", ".pt", "traced TorchScript for torch.jit.load / torch::jit::load"),
        Format("torchscript-mobile", ".ptl", "TorchScript for PyTorch Mobile's lite interpreter"),
    )
}

# ONNX opset of exports unless asked otherwise: 23 has the fused Attention op that the
# within-chunk SDPA exports to (below 23 the exporter spells it out as MatMul, Where and
# Softmax, ~1.8x slower on ONNX Runtime's CPU provider).
DEFAULT_OPSET = 23


def parse_formats(text: str) -> list[Format]:
    """'onnx,torchscript' -> Formats, or a UserError naming near misses."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"no format given: choose from {', '.join(FORMATS)}")
    chosen = []
    for name in names:
        if name not in FORMATS:
            close = difflib.get_close_matches(name, FORMATS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"choose from {', '.join(FORMATS)}"
            raise UserError(f"unknown format {name!r}: {hint}")
        if FORMATS[name] not in chosen:
            chosen.append(FORMATS[name])
    return chosen


# What an artifact computes: the full forward, one streaming step returning the whole
# state (Triton's implicit state needs that), or one step returning only what changed.
KINDS = ("logits", "streaming", "decode")


def artifact_name(fmt: Format, kind: str) -> str:
    """File name of an artifact inside an export directory: model[.streaming|.decode].suffix."""
    return f"model{'' if kind == 'logits' else '.' + kind}{fmt.suffix}"


def export_jobs(formats: list[Format], streaming: bool) -> list[tuple[Format, str]]:
    """(format, kind) pairs to export: full graphs, then with `streaming` the full-state
    streaming steps and the decode steps (whose caller appends finished chunks itself)."""
    jobs = [(fmt, "logits") for fmt in formats]
    if streaming:
        jobs += [(fmt, kind) for kind in ("streaming", "decode") for fmt in formats if fmt.streaming]
    return jobs
