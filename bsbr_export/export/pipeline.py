"""`export_model`: the whole export job (like Optimum's `main_export`).

Writes, into one export directory that appears atomically: the checkpoint the
artifacts came from (`config.json` + `model.safetensors`), every requested artifact,
each checked against the eager model, and `manifest.json` (files + sha256, config,
settings, versions, checks with their figures).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bsbr_export.compare.cases import DEFAULT_LONG_LENGTH, artifact_cases
from bsbr_export.compare.parity import ParityReport, check_parity
from bsbr_export.defaults import DEFAULT_OPSET, DEFAULT_TOLERANCE
from bsbr_export.errors import UserError
from bsbr_export.export.checks import STEP_METHODS, check_kind
from bsbr_export.export.onnx import check_opset, check_static_shape
from bsbr_export.export.writers import check_options, describe_artifact, write_artifact
from bsbr_export.formats import FORMATS, Format, artifact_name, export_jobs, parse_formats, recorded_kind
from bsbr_export.io import atomic_dir, check_can_create
from bsbr_export.manifest import MANIFEST, file_record, state_manifest
from bsbr_export.model.sources import Source, load_source, write_source
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.artifacts import open_artifact
from bsbr_export.runtime.eager import EagerRunner
from bsbr_export.versions import versions


@dataclass(frozen=True)
class ArtifactResult:
    """One exported artifact and how it fared."""

    name: str
    format: str
    kind: str  # full, streaming, decode or rows (formats.KINDS)
    files: dict[str, dict]  # file name -> {"sha256", "bytes"}
    seconds: float
    parity: ParityReport
    settings: dict = field(default_factory=dict)  # what its writer records (export.writers.describe_artifact)

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    def to_manifest(self, static_shape: list[int] | None) -> dict:
        """The artifact's entry in manifest.json."""
        return {
            "name": self.name,
            "format": self.format,
            "kind": recorded_kind(self.kind),
            "settings": {"static_shape": static_shape, **self.settings},
            "files": self.files,
            "export_seconds": round(self.seconds, 3),
            "checks": self.parity.to_dict(),
        }


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    artifacts: tuple[ArtifactResult, ...]
    note: str | None = None  # what a non-native flavor means (e.g. "not causal")

    @property
    def passed(self) -> bool:
        return all(a.parity.passed for a in self.artifacts)


def export_model(
    model_ref,
    out_dir: str | os.PathLike,
    formats: list[Format],
    *,
    spec: ModelSpec | None = None,
    streaming: bool = False,
    static_shape: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    trust_code: bool = False,
    weights: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    long_length: int = DEFAULT_LONG_LENGTH,
    max_length: int | None = None,
    max_batch: int | None = None,
    device: str | None = None,
    progress: Callable[[str], None] = lambda step: None,
) -> ExportResult:
    """Export MODEL to `out_dir` in `formats` and check each artifact against eager (at
    the edge lengths around the chunk size and at `long_length`).

    `model_ref`: a preset name, a checkpoint directory, a module reference
    (`file.py:factory`, imported only with `trust_code`; `weights` loaded into it), an
    `nn.Module` or a loaded `Source`. Its spec (`spec`, or the defaults) is computed once
    and passed down. `max_length` / `max_batch`: the largest input of formats that plan
    memory ahead (ExecuTorch; default: theirs); each such artifact is checked up to them.
    `device`: what compiled formats (AOTInductor) compile for, "cpu" (default) or "cuda".
    """
    check_opset(opset)
    check_static_shape(static_shape, streaming)
    check_flags_apply(formats, max_length=max_length, max_batch=max_batch, device=device)
    check_can_create(Path(out_dir), overwrite)  # before the model is even loaded
    progress("loading model")
    source = (
        model_ref
        if isinstance(model_ref, Source)
        else load_source(model_ref, trust_code=trust_code, weights=weights, spec=spec, chunk_size=chunk_size)
    )
    jobs = plan_jobs(source, formats, streaming, max_length=max_length, max_batch=max_batch, device=device)
    options = {
        "static_shape": static_shape,
        "opset": opset,
        "max_length": max_length,
        "max_batch": max_batch,
        "device": device,
        "metadata": {"bsbr.model": str(source_label(source))},
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        checkpoint = write_source(source, tmp)
        artifacts = [
            export_artifact(source, fmt, kind, tmp, options, tolerance, long_length, progress) for fmt, kind in jobs
        ]
        settings = {
            "static_shape": list(static_shape) if static_shape else None,
            "opset": opset,
            "streaming": streaming,
            "tolerance": tolerance,
        }
        if any(fmt.name == "torchscript-mobile" for fmt in formats):
            settings["optimize_for_mobile"] = _mobile_note()
        # A format that implies its streaming graphs (the web page) wrote them: their state is recorded too.
        streamed = any(kind != "full" for _, kind in jobs)
        manifest = export_manifest(source, checkpoint, settings, artifacts, streamed)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportResult(Path(out_dir), tuple(artifacts), source.spec.note)


def check_flags_apply(formats: list[Format], **flags) -> None:
    """UserError for a flag given that none of `formats` takes (it would do nothing)."""
    for flag, value in flags.items():
        if value is not None and not any(flag in f.options for f in formats):
            takers = ", ".join(f.name for f in FORMATS.values() if flag in f.options)
            raise UserError(f"--{flag.replace('_', '-')} applies to --format {takers} only: add it, or drop the flag")


def source_label(source: Source) -> str:
    """What the manifest calls the model: its reference, or its class."""
    return source.record.get("ref") or source.record.get("class")


def plan_jobs(source: Source, formats: list[Format], streaming: bool, **options) -> list[tuple[Format, str]]:
    """The (format, kind) pairs to export, every one checked possible before any work:
    each format's options for this model, and each streaming kind the module gives (a
    decode graph needs its `stream_update`, a row step its `step_rows`; other streamers
    get the full-state step; a format of no use without its streaming graphs is refused for them)."""
    for fmt in formats:
        check_options(fmt, source.spec, **options)
    gives = {kind: callable(getattr(source.module, method, None)) for kind, method in STEP_METHODS.items()}
    for fmt in formats:
        if fmt.needs_streaming and not all(gives.get(kind, True) for kind in fmt.needed_kinds):
            raise UserError(
                f"--format {fmt.name} needs the {' and '.join(fmt.needed_kinds)} step, which "
                f"{type(source.module).__name__} cannot give: it needs init_state, stream and "
                "stream_update (docs/your-model.md)"
            )
    jobs = [(fmt, kind) for fmt, kind in export_jobs(formats, streaming) if gives.get(kind, True)]
    for _, kind in jobs:
        check_kind(source.module, source.spec, kind)
    return jobs


def export_artifact(
    source: Source,
    fmt: Format,
    kind: str,
    directory: Path,
    options: dict,
    tolerance: float,
    long_length: int,
    progress: Callable[[str], None],
) -> ArtifactResult:
    """Write one artifact into `directory` and check it against eager."""
    name = artifact_name(fmt, kind)
    progress(f"exporting {name}")
    start = time.perf_counter()
    files = write_artifact(fmt, source.module, directory / name, kind, source.spec, **options)
    seconds = time.perf_counter() - start
    progress(f"checking {name} against eager")
    settings = describe_artifact(fmt, directory / name)
    static = options["static_shape"] if "static_shape" in fmt.options else None
    reference = EagerRunner(source.module, source.spec, kind)
    runner = open_artifact(fmt.name, directory / name, reference.input_names, reference.output_names)
    cases = artifact_cases(source.spec.chunk_size, kind, {"static_shape": static, **settings}, long_length=long_length)
    parity = check_parity(name, reference, runner, cases, source.spec, tolerance, precise=reference.in_float64)
    return ArtifactResult(
        name,
        fmt.name,
        kind,
        {f.relative_to(directory).as_posix(): file_record(f) for f in files},
        seconds,
        parity,
        settings,
    )


def export_manifest(
    source: Source, checkpoint: list[Path], settings: dict, artifacts: list[ArtifactResult], streaming: bool
) -> dict:
    """manifest.json of an export: model, source, spec, files with their sha256, settings,
    versions, state, and every artifact with its checks."""
    spec = source.spec
    static = settings["static_shape"]
    return {
        "manifest_version": 2,
        "model": str(source_label(source)),
        "source": source.record,
        "spec": spec.to_dict(),
        **({"config": source.config.to_dict()} if source.config is not None else {}),
        "causal": spec.causal,
        **({"note": spec.note} if spec.note else {}),
        **({"swapped": list(source.swapped)} if source.swapped else {}),
        "checkpoint": {f.name: file_record(f) for f in checkpoint},
        "settings": settings,
        "versions": versions(),
        "state": state_manifest(spec) if streaming else None,
        "artifacts": [
            a.to_manifest(static if "static_shape" in FORMATS[a.format].options else None) for a in artifacts
        ],
    }


def export_module(
    module: torch.nn.Module,
    out_dir: str | os.PathLike,
    spec: ModelSpec | None = None,
    formats: list[str] | tuple[str, ...] = ("onnx", "torchscript"),
    streaming: bool = False,
    **options,
) -> ExportResult:
    """Export any `nn.Module` built on BSBR attention whose forward takes and returns
    tensors (a tuple/dict of outputs included): the same export directory as
    `bsbr-export export` (ONNX, TorchScript, lite interpreter, manifest, checks).

    `spec` describes its inputs and outputs (default: `input_ids` below the first
    embedding's vocabulary, + `attention_mask` when the forward takes one, chunk size from
    its BSBR layers). Every graph is run at lengths and batches it was not exported with
    before it is written. `options` are `export_model`'s (opset, tolerance, overwrite, ...).
    """
    return export_model(module, out_dir, parse_formats(",".join(formats)), spec=spec, streaming=streaming, **options)


def _mobile_note() -> str:
    """What became of `optimize_for_mobile` for the .ptl: it needs XNNPACK, which the
    CPU wheels are built without (it raises there), so it runs only where available."""
    if torch._C._is_xnnpack_enabled():
        return "applied"
    return "skipped: this torch build has no XNNPACK, which the pass needs"
