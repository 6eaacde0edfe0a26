"""Jobs that run several stages in a row: `benchmark` exports (when given a model),
makes the reduced-precision artifacts this CPU can use, validates, times every engine
and writes the report."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bsbr_export.compare.cases import DEFAULT_LONG_LENGTH
from bsbr_export.defaults import DEFAULT_ACCURACY_BUDGET, DEFAULT_EVAL_WINDOWS, DEFAULT_THREADS, DEFAULT_TOLERANCE
from bsbr_export.errors import UserError
from bsbr_export.export.pipeline import export_model
from bsbr_export.formats import FORMATS, ONNX, artifact_name
from bsbr_export.io import check_can_create, check_writable
from bsbr_export.machine import cpu_features, machine_info
from bsbr_export.manifest import MANIFEST, manifest_spec, read_manifest
from bsbr_export.model.sources import load_source
from bsbr_export.model.usercode import export_name
from bsbr_export.proof.bench import WARMUP, BenchResult, bench_engines, decode_latency
from bsbr_export.proof.evaltext import read_eval_text, scores_text
from bsbr_export.proof.optimize import optimize_export
from bsbr_export.proof.report import text_changes, write_report
from bsbr_export.proof.validate import ValidationResult, validate_export
from bsbr_export.runtime.engines import BASELINES, BF16_PLAN, ENGINES, available_engines, check_device, why_not


@dataclass(frozen=True)
class PrecisionTrial:
    """A reduced precision bench considered: made here, already in the export, or skipped
    and why (CPU features, packages, the kind of model)."""

    precision: str
    engines: tuple[str, ...]  # the engines that run it
    outcome: str  # "made", "present" or "skipped"
    reason: str = ""

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "engines": list(self.engines),
            "outcome": self.outcome,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Precision:
    """A reduced precision `optimize` makes: the file that holds it, what it is made from,
    its engines and the CPU's matrix units that make it pay."""

    name: str
    made_as: str  # the optimize_export flag that makes it
    artifact: str  # written into the export dir once made
    engines: tuple[str, ...]
    source: str | None = artifact_name(ONNX)  # None: made from the eager model
    units: tuple[str, ...] = ()  # CPU features (as /proc/cpuinfo spells them)
    by_bench: bool = True  # False: only `optimize` makes it, on request


PRECISIONS = (
    Precision(
        "int8", "int8", artifact_name(ONNX, variant="int8"), ("ort-cpu-int8",), units=("avx512_vnni", "amx_int8")
    ),
    # Calibrated QDQ takes a calibration pass on top of the sensitivity search.
    Precision(
        "int8-static",
        "static_int8",
        artifact_name(ONNX, variant="int8-static"),
        ("ort-cpu-int8-static",),
        units=("avx512_vnni", "amx_int8"),
        by_bench=False,
    ),
    Precision(
        "bf16",
        "bf16",
        BF16_PLAN,
        ("eager-bf16", "compile-bf16", "openvino-bf16"),
        source=None,
        units=("avx512_bf16", "amx_bf16"),
    ),
    Precision("fp16", "fp16", artifact_name(ONNX, variant="fp16"), ("ort-cuda-fp16",)),
)
NOT_A_BYTE_LM = (
    "reduced precision is judged by held-out bits per byte, so only for byte-level language models "
    '(tokenizer "bytes", logits)'
)


@dataclass(frozen=True)
class BenchRun:
    """What `benchmark` produced: the export dir, its validation, timings, report files."""

    directory: Path
    validation: ValidationResult
    bench: BenchResult
    reports: tuple[Path, ...]
    recommendation: dict | None = None  # report.recommend's choice
    accuracy_budget: float = DEFAULT_ACCURACY_BUDGET
    precisions: tuple[PrecisionTrial, ...] = ()  # the reduced precisions considered

    @property
    def over_budget(self) -> list[str]:
        """Engines whose held-out bits per byte rose more than the accuracy budget allows."""
        eager = self.bench.reference()
        return [
            e.engine
            for e in self.bench.engines
            if any(c > self.accuracy_budget for c in text_changes(e, eager).values())
        ]


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
    threads: int = DEFAULT_THREADS,
    budget_s: float = 1.0,
    overwrite: bool = False,
    trust_code: bool = False,
    formats: list[str] | None = None,
    streaming: bool = True,
    long_length: int = DEFAULT_LONG_LENGTH,
    eval_text: str | os.PathLike | None = None,
    accuracy_budget: float = DEFAULT_ACCURACY_BUDGET,
    reduced_precision: bool = True,
    device: str = "cpu",
    progress: Callable[[str], None] = lambda step: None,
) -> BenchRun:
    """Export (when `model_ref` is not an export dir yet), validate, benchmark, report.

    Every engine runs in its own process on the same inputs; reports go into the
    export dir: report.json, report.md, latency.png, memory.png, decode.png. A model is
    exported into `out_dir`, which must be new or empty unless `overwrite` is set, in
    `formats` (default: every format whose package is installed), with streaming graphs
    when `streaming` and the model can stream, each artifact checked up to `long_length`.
    Byte-level LMs are scored on `eval_text` (default: held-out stdlib text); the report
    recommends the fastest engine within `accuracy_budget` of eager's bits per byte. On
    `device` "cuda", the engines that compute on the GPU are timed, against eager there. With
    `reduced_precision`, the int8 graph and bf16 plans this machine can run are made
    first (`make_reduced_precision`, judged in windows of the timed lengths), so the
    recommendation weighs them; the report lists what was tried and skipped.
    """
    if any(n < 1 for n in lengths) or batch < 1:
        raise UserError(f"lengths and batch must be >= 1, got lengths {lengths}, batch {batch}")
    check_device(device)
    directory = Path(model_ref)
    if (directory / MANIFEST).is_file():
        check_writable(directory)  # the reports go in there: refuse before the work, not after
    else:
        directory = Path(out_dir) if out_dir else Path("export") / export_name(model_ref)
        # Formats with a planned maximum length are exported for every length timed or checked here.
        longest = max(*lengths, long_length, *(validation_lengths or [long_length]))
        export_for_bench(
            model_ref, directory, formats, streaming, overwrite, trust_code, tolerance, long_length, longest, progress
        )
    precisions = plan_reduced_precision(directory, engines, device) if reduced_precision else ()
    # Every engine asked for must run once the planned artifacts exist: refuse before making them.
    check_engines(directory, engines, device, coming={e for t in precisions if t.outcome == "made" for e in t.engines})
    text = read_eval_text(eval_text) if eval_text is not None else None
    windows = tuple(n for n in sorted(set(lengths)) if n >= 2) or DEFAULT_EVAL_WINDOWS  # a window scores n-1 bytes
    make_reduced_precision(
        directory,
        precisions,
        windows=windows,
        eval_text=text,
        accuracy_budget=accuracy_budget,
        threads=threads,
        trust_code=trust_code,
        progress=progress,
    )
    engines = check_engines(directory, engines, device)
    progress("validating")
    validation = validate_export(
        directory,
        tolerance=tolerance,
        lengths=validation_lengths,
        trust_code=trust_code,
        eval_text=text,
        accuracy_budget=accuracy_budget,
        device=device,
    )
    timings = bench_engines(
        directory,
        engines,
        lengths,
        batch=batch,
        threads=threads,
        budget_s=budget_s,
        trust_code=trust_code,
        eval_text=eval_text,
        progress=progress,
    )
    decode = ()
    if decode_contexts and any(
        (directory / n).is_file() for n in (artifact_name(ONNX, "decode"), artifact_name(ONNX, "streaming"))
    ):
        decode = tuple(decode_latency(directory, decode_contexts, threads=threads, progress=progress))
    result = BenchResult(
        tuple(timings), tuple(sorted(lengths)), batch, threads, WARMUP, decode, machine_info(), BASELINES[device]
    )
    progress("writing report")
    note = read_manifest(directory, verify=False).get("note")
    reports, choice = write_report(
        result,
        directory,
        tolerance=tolerance,
        validation=validation.to_dict(),
        note=note,
        accuracy_budget=accuracy_budget,
        precisions=[p.to_dict() for p in precisions],
    )
    return BenchRun(directory, validation, result, tuple(reports), choice, accuracy_budget, precisions)


def plan_reduced_precision(
    directory: Path, engines: list[str] | None, device: str = "cpu"
) -> tuple[PrecisionTrial, ...]:
    """The reduced precisions that `engines` (None: every engine on `device`) would time,
    each with whether bench makes it here, finds it made, or skips it and why."""
    wanted = (
        [p for p in PRECISIONS if set(p.engines) & set(engines)]
        if engines
        else [p for p in PRECISIONS if any(ENGINES[e].device == device for e in p.engines)]
    )
    if not scores_text(manifest_spec(directory)):
        return tuple(PrecisionTrial(p.name, p.engines, "skipped", NOT_A_BYTE_LM) for p in wanted)
    return tuple(precision_trial(p, directory) for p in wanted)


def make_reduced_precision(
    directory: Path,
    trials: tuple[PrecisionTrial, ...],
    *,
    windows: tuple[int, ...],
    eval_text: bytes | None,
    accuracy_budget: float,
    threads: int,
    trust_code: bool,
    progress: Callable[[str], None],
) -> None:
    """Make, through `optimize`, the precisions `trials` plan to make, each judged by
    held-out bits per byte (`eval_text`, default the held-out stdlib) in windows of each
    length in `windows`."""
    made = [p for p in PRECISIONS if any(t.precision == p.name and t.outcome == "made" for t in trials)]
    if not made:
        return
    progress(
        f"making {', '.join(p.name for p in made)} (judged by held-out bits per byte; --no-reduced-precision "
        "skips this)"
    )
    flags = {p.made_as: p in made for p in PRECISIONS}  # fp16 too: optimize defaults it to "if CUDA is here"
    optimize_export(
        directory,
        eval_windows=windows,
        eval_text=eval_text,
        accuracy_budget=accuracy_budget,
        threads=threads,
        trust_code=trust_code,
        progress=progress,
        **flags,
    )


def precision_trial(precision: Precision, directory: Path) -> PrecisionTrial:
    """Whether bench makes `precision` for the export in `directory`, and why not."""

    def skipped(reason: str) -> PrecisionTrial:
        return PrecisionTrial(precision.name, precision.engines, "skipped", reason)

    if (directory / precision.artifact).is_file():
        return PrecisionTrial(precision.name, precision.engines, "present", f"{precision.artifact} was already there")
    if precision.source and not (directory / precision.source).is_file():
        return skipped(f"no {precision.source} to make it from (export with --format onnx)")
    if not precision.by_bench:
        return skipped(f"made on request only: bsbr-export optimize --{precision.made_as.replace('_', '-')}")
    # The machine's reasons only: the artifact itself is what would be made.
    reasons = {e: why_not(replace(ENGINES[e], artifact=None), directory) for e in precision.engines}
    runnable = tuple(e for e, reason in reasons.items() if reason is None)
    if not runnable:
        return skipped("; ".join(f"{e}: {reason}" for e, reason in reasons.items()))
    features = cpu_features()
    units = [u.upper() for u in precision.units if u in features]
    detail = (
        f"matrix units here: {', '.join(units)}"
        if units
        else f"no {' or '.join(u.upper() for u in precision.units)} here"
        if precision.units
        else ""
    )
    return PrecisionTrial(precision.name, runnable, "made", detail)


def export_for_bench(
    model_ref,
    directory: Path,
    formats: list[str] | None,
    streaming: bool,
    overwrite: bool,
    trust_code: bool,
    tolerance: float,
    long_length: int,
    max_length: int,
    progress: Callable[[str], None],
) -> None:
    """Export a model for bench into a new or empty `directory`: in `formats` (default:
    every format bench times that is installed here), with streaming graphs when the model can stream."""
    check_bench_out(directory, overwrite)
    progress(f"exporting {model_ref} to {directory}")
    source = load_source(model_ref, trust_code=trust_code)
    # Non-causal models and modules without the streaming protocol have no streaming graphs.
    streams = streaming and source.spec.causal and source.spec.state is not None
    chosen = [FORMATS[f] for f in formats] if formats else [f for f in FORMATS.values() if f.installed and f.benched]
    planned = any("max_length" in f.options for f in chosen)  # formats that plan memory for a longest input
    export_model(
        source,
        directory,
        chosen,
        streaming=streams,
        overwrite=overwrite,
        tolerance=tolerance,
        long_length=long_length,
        max_length=max_length if planned else None,
        progress=progress,
    )


def check_engines(
    directory: Path, engines: list[str] | None, device: str = "cpu", coming: set[str] = frozenset()
) -> list[str]:
    """The engines to time: those asked for (each must run here on `device`, or be in
    `coming`: its artifact is about to be made), or every one available on `device`."""
    known = available_engines(directory, device)
    known += sorted(coming - set(known))
    unknown = [e for e in engines or known if e not in known]
    reasons = {
        e: (
            f"it computes on {ENGINES[e].device}, not on --device {device}"
            if ENGINES[e].device != device
            else why_not(ENGINES[e], directory)
        )
        for e in unknown
        if e in ENGINES
    }
    if reasons:
        raise UserError("; ".join(f"engine {e} cannot run here: {r}" for e, r in reasons.items()))
    if unknown:
        raise UserError(f"unknown or unavailable engine(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return engines or known


def check_bench_out(directory: Path, overwrite: bool) -> None:
    """Refuse, before any work, to export into a non-empty directory: it may hold the user's files."""
    check_can_create(directory, overwrite=True)  # somewhere writable (the emptiness check is below)
    if overwrite or not directory.is_dir() or not any(directory.iterdir()):
        return
    if (directory / MANIFEST).is_file():
        raise UserError(
            f"{directory} already holds an export: bench it with `bsbr-export bench {directory}`, "
            "or pass --force to export again over it"
        )
    raise UserError(f"{directory} already exists and is not empty: choose another --out, or pass --force to replace it")
