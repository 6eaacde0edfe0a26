"""The one table of export formats: it feeds the CLI's choices, export, validate and bench.

Each entry carries its exporter and runner (imported only when called, so the CLI's
help stays light) and the export options it takes; callers dispatch through the entry.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bsbr_export.errors import UserError


@dataclass(frozen=True)
class Format:
    """An artifact kind: suffix, exporter, runner, the options it takes, its kinds.

    exporter(model, path, kind, spec, **options) -> files written (the artifact first),
    with the model's `ModelSpec` and only the `options` this format takes; runner(path, input_names, output_names,
    **engine) -> an object with `infer(feeds)`; describe(path) -> settings recorded
    in the manifest for the artifact.
    """

    name: str
    suffix: str
    description: str
    exporter: Callable[..., list[Path]]
    runner: Callable[..., object]
    options: frozenset[str] = frozenset()
    kinds: tuple[str, ...] = ("logits", "streaming", "decode")
    per_provider: bool = False  # validated once per ONNX Runtime execution provider
    needs_gpu: bool = False
    describe: Callable[[Path], dict] = lambda path: {}
    engine: bool = False  # bench times the artifact as an engine of its own, named like the format
    requires: str | None = None  # the module of an optional package it needs
    install: str = ""  # how to install that package
    validate: Callable[..., None] = lambda spec, **options: None  # UserError for options it cannot honor

    @property
    def installed(self) -> bool:
        """Whether the optional package this format needs (if any) is importable here."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def check_installed(self) -> None:
        """UserError saying how to install the package this format needs, when it is missing."""
        if not self.installed:
            raise UserError(f"--format {self.name} needs the {self.requires} package: {self.install}")

    @property
    def streaming(self) -> bool:
        return len(self.kinds) > 1

    def _own(self, options: dict) -> dict:
        return {k: v for k, v in options.items() if k in self.options}

    def export(self, model, path: Path, kind: str, spec=None, **options) -> list[Path]:
        """Write one artifact with the options this format takes (others are dropped)."""
        return self.exporter(model, path, kind, spec, **self._own(options))

    def check(self, spec, **options) -> None:
        """UserError, before any work, if this format cannot honor its options for `spec`."""
        self.validate(spec, **self._own(options))


def _export_onnx(model, path, kind, spec, **options):
    from bsbr_export.export.writers import export_onnx

    return export_onnx(model, path, spec=spec, streaming=kind == "streaming", decode=kind == "decode", **options)


def _export_torchscript(mobile: bool):
    def export(model, path, kind, spec):
        from bsbr_export.export.writers import export_torchscript

        return [export_torchscript(model, path, spec=spec, streaming=kind == "streaming", decode=kind == "decode",
                                   mobile=mobile)]

    return export


def _export_aoti(model, path, kind, spec):
    from bsbr_export.export.aoti import export_aoti

    return [export_aoti(model, path, spec, kind)]


def _export_executorch(model, path, kind, spec, **limits):
    from bsbr_export.export.executorch import export_executorch

    return [export_executorch(model, path, spec, **limits)]


def _onnx_runner(path, input_names, output_names, provider: str = "CPUExecutionProvider"):
    from bsbr_export.proof.runners import OnnxRunner

    return OnnxRunner(path, provider=provider)


def _torchscript_runner(path, input_names, output_names):
    from bsbr_export.proof.runners import TorchScriptRunner

    return TorchScriptRunner(path, input_names, output_names)


def _aoti_runner(path, input_names, output_names):
    from bsbr_export.proof.runners import AotiRunner

    return AotiRunner(path, input_names, output_names)


def _executorch_runner(path, input_names, output_names):
    from bsbr_export.proof.runners import ExecuTorchRunner

    return ExecuTorchRunner(path, input_names, output_names)


def _check_executorch(spec, **limits) -> None:
    from bsbr_export.export.executorch import check_limits

    check_limits(spec, **limits)


def _executorch_settings(path: Path) -> dict:
    from bsbr_export.export.executorch import program_settings

    return program_settings(path)


def _aoti_settings(path: Path) -> dict:
    from bsbr_export.export.aoti import package_isa

    return {"cpu_isa": package_isa(path)}


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx", ".onnx", "ONNX graph for ONNX Runtime (torch.export-based exporter)", _export_onnx,
               _onnx_runner, frozenset({"static_shape", "opset", "metadata"}), per_provider=True),
        Format("torchscript", ".pt", "traced TorchScript for torch.jit.load / torch::jit::load",
               _export_torchscript(False), _torchscript_runner, engine=True),
        Format("torchscript-mobile", ".ptl", "TorchScript for PyTorch Mobile's lite interpreter",
               _export_torchscript(True), _torchscript_runner),
        Format("aoti", ".pt2", "AOTInductor package for aoti_load_package / torch::inductor::AOTIModelPackageLoader",
               # The decode step for C++ generation loops; no full-state step (Triton's
               # implicit state is its only user, and Triton serves ONNX).
               _export_aoti, _aoti_runner, kinds=("logits", "decode"), describe=_aoti_settings, engine=True),
        # Full graph only: see README "Deploy" for what the streaming step needs.
        Format("executorch", ".pte", "ExecuTorch program lowered to XNNPACK, for executorch.runtime / the C++ Module API",
               _export_executorch, _executorch_runner, frozenset({"max_length", "max_batch"}), kinds=("logits",),
               describe=_executorch_settings, engine=True, requires="executorch", validate=_check_executorch,
               install='pip install -c constraints.txt "bsbr-export[executorch]" (in a checkout: ".[executorch]")'),
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
        FORMATS[name].check_installed()
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
        jobs += [(fmt, kind) for kind in ("streaming", "decode") for fmt in formats if kind in fmt.kinds]
    return jobs
