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

from bsbr_export.errors import UserError
from bsbr_export.proof.evaltext import DEFAULT_ACCURACY_BUDGET, read_eval_text
from bsbr_export.export.writers import (
    check_kind,
    check_opset,
    check_static_shape,
    state_manifest,
)
from bsbr_export.export.formats import (
    DEFAULT_OPSET,
    FORMATS,
    Format,
    artifact_name,
    export_jobs,
)
from bsbr_export.export.manifest import MANIFEST, file_record, read_manifest
from bsbr_export.io import atomic_dir, check_can_create
from bsbr_export.model.sources import Source, load_source, write_source
from bsbr_export.model.spec import ModelSpec
from bsbr_export.model.usercode import export_name
from bsbr_export.proof.runners import EagerRunner
from bsbr_export.proof.validate import (
    DEFAULT_TOLERANCE,
    Case,
    ParityReport,
    check_parity,
    default_cases,
    fit_cases,
)
from bsbr_export.versions import versions


@dataclass(frozen=True)
class ArtifactResult:
    """One exported artifact and how it fared."""

    name: str
    format: str
    kind: str  # logits, streaming or decode (formats.KINDS)
    files: dict[str, dict]  # file name -> {"sha256", "bytes"}
    seconds: float
    parity: ParityReport
    settings: dict = field(default_factory=dict)  # what the format records (Format.describe)

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    artifacts: tuple[ArtifactResult, ...]
    note: str | None = None  # what a non-native flavor means (e.g. "not causal")

    @property
    def passed(self) -> bool:
        return all(a.parity.passed for a in self.artifacts)


def runner_for(fmt: Format, path: Path, reference: EagerRunner):
    """A runner over an artifact file (names come from the eager graph it mirrors)."""
    return fmt.runner(path, reference.input_names, reference.output_names)


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
    long_length: int = 2048,
    max_length: int | None = None,
    max_batch: int | None = None,
    progress: Callable[[str], None] = lambda step: None,
) -> ExportResult:
    """Export MODEL to `out_dir` in `formats` and check each artifact against eager (at
    the edge lengths around the chunk size and at `long_length`).

    `model_ref`: a preset name, a checkpoint directory, a module reference
    (`file.py:factory`, imported only with `trust_code`; `weights` loaded into it) or an
    `nn.Module`. Its spec (`spec`, or the defaults) is computed once and passed down.
    `max_length` / `max_batch`: the largest input of formats that plan memory ahead
    (ExecuTorch; default: theirs); each such artifact is checked up to its limits.
    """
    check_opset(opset)
    check_static_shape(static_shape, streaming)
    progress("loading model")
    source = model_ref if isinstance(model_ref, Source) else load_source(
        model_ref, trust_code=trust_code, weights=weights, spec=spec, chunk_size=chunk_size)
    spec = source.spec
    for fmt in formats:
        fmt.check(spec, max_length=max_length, max_batch=max_batch)
    # A decode graph needs the module's stream_update; other streamers get the full-state step.
    decodes = callable(getattr(source.module, "stream_update", None))
    jobs = [(fmt, kind) for fmt, kind in export_jobs(formats, streaming) if kind != "decode" or decodes]
    for _, kind in jobs:
        check_kind(source.module, spec, kind)
    artifacts = []
    settings = {"static_shape": list(static_shape) if static_shape else None, "opset": opset,
                "streaming": streaming, "tolerance": tolerance}
    if any(fmt.name == "torchscript-mobile" for fmt in formats):
        settings["optimize_for_mobile"] = _mobile_note()
    label = source.record.get("ref") or source.record.get("class")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        checkpoint = write_source(source, tmp)
        for fmt, kind in jobs:
            name = artifact_name(fmt, kind)
            progress(f"exporting {name}")
            start = time.perf_counter()
            files = fmt.export(source.module, tmp / name, kind, spec=spec, static_shape=static_shape, opset=opset,
                               metadata={"bsbr.model": str(label)}, max_length=max_length, max_batch=max_batch)
            seconds = time.perf_counter() - start
            progress(f"checking {name} against eager")
            static = static_shape if "static_shape" in fmt.options else None
            described = fmt.describe(tmp / name)
            parity = _check(fmt, tmp / name, source, kind, static, tolerance, long_length, described)
            artifacts.append(
                ArtifactResult(
                    name=name,
                    format=fmt.name,
                    kind=kind,
                    files={f.name: file_record(f) for f in files},
                    seconds=seconds,
                    parity=parity,
                    settings=described,
                )
            )
        manifest = {
            "manifest_version": 2,
            "model": str(label),
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
                {
                    "name": a.name,
                    "format": a.format,
                    "kind": a.kind,
                    "settings": {"static_shape": list(static_shape) if static_shape and "static_shape" in FORMATS[a.format].options
                                 else None, **a.settings},
                    "files": a.files,
                    "export_seconds": round(a.seconds, 3),
                    "checks": a.parity.to_dict(),
                }
                for a in artifacts
            ],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportResult(Path(out_dir), tuple(artifacts), spec.note)


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
    from bsbr_export.export.formats import parse_formats

    return export_model(module, out_dir, parse_formats(",".join(formats)), spec=spec, streaming=streaming, **options)


def _mobile_note() -> str:
    """What became of `optimize_for_mobile` for the .ptl: it needs XNNPACK, which the
    CPU wheels are built without (it raises there), so it runs only where available."""
    import torch

    if torch._C._is_xnnpack_enabled():
        return "applied"
    return "skipped: this torch build has no XNNPACK, which the pass needs"


def _check(fmt: Format, path: Path, source: Source, kind: str, static_shape, tolerance: float,
           long_length: int, settings: dict) -> ParityReport:
    reference = EagerRunner(source.module, source.spec, kind)
    runner = runner_for(fmt, path, reference)
    streaming = kind != "logits"
    c = source.spec.chunk_size
    cases = [Case(*static_shape)] if static_shape else default_cases(c, streaming, long_length)
    cases = fit_cases(cases, c, settings.get("max_batch"), settings.get("max_length"))
    return check_parity(path.name, reference, runner, cases, source.spec, tolerance)


def _check_bench_out(directory: Path, overwrite: bool) -> None:
    """Refuse, before any work, to export into a non-empty directory: it may hold the user's files."""
    check_can_create(directory, overwrite=True)  # somewhere writable (the emptiness check is below)
    if overwrite or not directory.is_dir() or not any(directory.iterdir()):
        return
    if (directory / MANIFEST).is_file():
        raise UserError(f"{directory} already holds an export: bench it with `bsbr-export bench {directory}`, "
                        "or pass --force to export again over it")
    raise UserError(f"{directory} already exists and is not empty: choose another --out, or pass --force to replace it")


@dataclass(frozen=True)
class BenchRun:
    """What `benchmark` produced: the export dir, its validation, timings, report files."""

    directory: Path
    validation: object  # ValidationResult
    bench: object  # BenchResult
    reports: tuple[Path, ...]
    recommendation: dict | None = None  # report.recommend's choice
    accuracy_budget: float = DEFAULT_ACCURACY_BUDGET

    @property
    def over_budget(self) -> list[str]:
        """Engines whose held-out bits per byte rose more than the accuracy budget allows."""
        from bsbr_export.proof.report import text_changes

        eager = self.bench.engine("eager")
        return [e.engine for e in self.bench.engines
                if any(c > self.accuracy_budget for c in text_changes(e, eager).values())]


def benchmark(
    model_ref: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    lengths: list[int],
    batch: int = 1,
    engines: list[str] | None = None,
    decode_contexts: list[int] | None = None,
    validation_lengths: list[int] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int = 2,
    budget_s: float = 1.0,
    overwrite: bool = False,
    trust_code: bool = False,
    formats: list[str] | None = None,
    streaming: bool = True,
    long_length: int = 2048,
    eval_text: str | os.PathLike | None = None,
    accuracy_budget: float = DEFAULT_ACCURACY_BUDGET,
    progress: Callable[[str], None] = lambda step: None,
) -> BenchRun:
    """Export (when `model_ref` is not an export dir yet), validate, benchmark, report.

    Every engine runs in its own process on the same inputs; reports go into the
    export dir: report.json, report.md, latency.png, memory.png, decode.png. A model is
    exported into `out_dir`, which must be new or empty unless `overwrite` is set, in
    `formats` (default: every format whose package is installed), with streaming graphs
    when `streaming` and the model can stream, each artifact checked up to `long_length`.
    Byte-level LMs are scored on `eval_text` (default: held-out stdlib text); the report
    recommends the fastest engine within `accuracy_budget` of eager's bits per byte.
    """
    from bsbr_export.proof.bench import (
        WARMUP,
        BenchResult,
        available_engines,
        bench_engines,
        reduced_precision_engines,
        decode_latency,
        machine_info,
    )
    from bsbr_export.export.formats import FORMATS
    from bsbr_export.proof.report import write_report
    from bsbr_export.proof.validate import validate_export

    if any(n < 1 for n in lengths) or batch < 1:
        raise UserError(f"lengths and batch must be >= 1, got lengths {lengths}, batch {batch}")
    directory = Path(model_ref)
    if not (directory / MANIFEST).is_file():
        directory = Path(out_dir) if out_dir else Path("export") / export_name(model_ref)
        _check_bench_out(directory, overwrite)
        progress(f"exporting {model_ref} to {directory}")
        source = load_source(model_ref, trust_code=trust_code)
        # Non-causal models and modules without the streaming protocol have no streaming graphs.
        streams = streaming and source.spec.causal and source.spec.state is not None
        chosen = [FORMATS[f] for f in formats] if formats else [f for f in FORMATS.values() if f.installed]
        # Formats with a planned maximum length are exported for every length timed or checked here.
        longest = max(*lengths, long_length, *(validation_lengths or [long_length]))
        export_model(source, directory, chosen, streaming=streams, overwrite=overwrite,
                     tolerance=tolerance, long_length=long_length, max_length=longest, progress=progress)
    known = available_engines(directory)
    engines = engines or known
    unknown = [e for e in engines if e not in known]
    why_not = {e: r for e, r in reduced_precision_engines(directory).items() if e in unknown and r}
    if why_not:
        raise UserError("; ".join(f"engine {e} cannot run here: {r}" for e, r in why_not.items()))
    if unknown:
        raise UserError(f"unknown or unavailable engine(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    progress("validating")
    validation = validate_export(directory, tolerance=tolerance, lengths=validation_lengths, trust_code=trust_code,
                                 eval_text=read_eval_text(eval_text) if eval_text is not None else None,
                                 accuracy_budget=accuracy_budget)
    timings = bench_engines(directory, engines, lengths, batch=batch, threads=threads, budget_s=budget_s,
                            trust_code=trust_code, eval_text=eval_text, progress=progress)
    decode = ()
    if decode_contexts and any((directory / n).is_file() for n in ("model.decode.onnx", "model.streaming.onnx")):
        decode = tuple(decode_latency(directory, decode_contexts, threads=threads, progress=progress))
    result = BenchResult(tuple(timings), tuple(sorted(lengths)), batch, threads, WARMUP, decode, machine_info())
    progress("writing report")
    note = read_manifest(directory, verify=False).get("note")
    reports, choice = write_report(result, directory, tolerance=tolerance, validation=validation.to_dict(), note=note,
                           accuracy_budget=accuracy_budget)
    return BenchRun(directory, validation, result, tuple(reports), choice, accuracy_budget)
