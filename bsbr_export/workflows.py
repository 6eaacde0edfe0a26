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
from bsbr_export.precisions import PRECISIONS, Precision
from bsbr_export.proof.bench import WARMUP, BenchResult, bench_engines, decode_latency
from bsbr_export.proof.evaltext import scores_text
from bsbr_export.proof.optimize import optimize_export
from bsbr_export.proof.report import text_changes, write_report
from bsbr_export.proof.validate import ValidationResult, validate_export
from bsbr_export.runtime.engines import BASELINES, ENGINES, available_engines, check_device, why_not


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


@dataclass(frozen=True)
class BenchOptions:
    """What `benchmark` measures and how, from the command line down unchanged. The
    evaluation text is read once (`read_eval_text`): every stage and engine process
    scores the same bytes."""

    lengths: tuple[int, ...]
    batch: int = 1
    engines: tuple[str, ...] | None = None  # None: every engine that runs here on `device`
    decode_contexts: tuple[int, ...] = ()
    validation_lengths: tuple[int, ...] | None = None  # None: validate's defaults
    tolerance: float = DEFAULT_TOLERANCE
    threads: int = DEFAULT_THREADS
    budget_s: float = 1.0
    trust_code: bool = False
    eval_text: bytes | None = None  # None: the held-out stdlib text
    accuracy_budget: float = DEFAULT_ACCURACY_BUDGET
    reduced_precision: bool = True
    device: str = "cpu"


@dataclass(frozen=True)
class BenchExport:
    """How `benchmark` exports a model it is given (not an export directory)."""

    out_dir: Path | None = None  # None: ./export/<model>
    formats: tuple[str, ...] | None = None  # None: every format bench times that is installed here
    streaming: bool = True
    long_length: int = DEFAULT_LONG_LENGTH
    overwrite: bool = False


def benchmark(
    model_ref: str | os.PathLike,
    options: BenchOptions,
    export: BenchExport = BenchExport(),
    progress: Callable[[str], None] = lambda step: None,
) -> BenchRun:
    """Export (when `model_ref` is not an export dir yet), validate, benchmark, report.

    Every engine runs in its own process on the same inputs; reports go into the
    export dir: report.json, report.md, latency.png, memory.png, decode.png. A model is
    exported as `export` says into a new or empty directory (streaming graphs when the
    model can stream), each artifact checked up to `export.long_length`. Byte-level LMs
    are scored on `options.eval_text`; the report recommends the fastest engine within
    the accuracy budget of eager's bits per byte. On `options.device` "cuda", the engines
    that compute on the GPU are timed, against eager there. With `reduced_precision`, the
    int8 graph and bf16 plans this machine can run are made first
    (`make_reduced_precision`, judged in windows of the timed lengths), so the
    recommendation weighs them; the report lists what was tried and skipped.
    """
    o = options
    if any(n < 1 for n in o.lengths) or o.batch < 1:
        raise UserError(f"lengths and batch must be >= 1, got lengths {list(o.lengths)}, batch {o.batch}")
    check_device(o.device)
    engines = list(o.engines) if o.engines else None
    directory = Path(model_ref)
    if (directory / MANIFEST).is_file():
        check_writable(directory)  # the reports go in there: refuse before the work, not after
    else:
        directory = Path(export.out_dir) if export.out_dir else Path("export") / export_name(model_ref)
        # Formats with a planned maximum length are exported for every length timed or checked here.
        longest = max(*o.lengths, export.long_length, *(o.validation_lengths or [export.long_length]))
        export_for_bench(model_ref, directory, export, o, longest, progress)
    precisions = plan_reduced_precision(directory, engines, o.device) if o.reduced_precision else ()
    # Every engine asked for must run once the planned artifacts exist: refuse before making them.
    coming = {e for t in precisions if t.outcome == "made" for e in t.engines}
    check_engines(directory, engines, o.device, coming=coming)
    windows = tuple(n for n in sorted(set(o.lengths)) if n >= 2) or DEFAULT_EVAL_WINDOWS  # a window scores n-1 bytes
    make_reduced_precision(directory, precisions, o, windows, progress)
    engines = check_engines(directory, engines, o.device)
    progress("validating")
    validation = validate_export(
        directory,
        tolerance=o.tolerance,
        lengths=list(o.validation_lengths) if o.validation_lengths else None,
        trust_code=o.trust_code,
        eval_text=o.eval_text,
        accuracy_budget=o.accuracy_budget,
        device=o.device,
    )
    timings = bench_engines(
        directory,
        engines,
        list(o.lengths),
        batch=o.batch,
        threads=o.threads,
        budget_s=o.budget_s,
        trust_code=o.trust_code,
        eval_text=o.eval_text,
        progress=progress,
    )
    decode = ()
    if o.decode_contexts and any(
        (directory / n).is_file() for n in (artifact_name(ONNX, "decode"), artifact_name(ONNX, "streaming"))
    ):
        decode = tuple(decode_latency(directory, list(o.decode_contexts), threads=o.threads, progress=progress))
    result = BenchResult(
        tuple(timings),
        tuple(sorted(o.lengths)),
        o.batch,
        o.threads,
        WARMUP,
        decode,
        machine_info(),
        BASELINES[o.device],
    )
    progress("writing report")
    note = read_manifest(directory, verify=False).get("note")
    reports, choice = write_report(
        result,
        directory,
        tolerance=o.tolerance,
        validation=validation.to_dict(),
        note=note,
        accuracy_budget=o.accuracy_budget,
        precisions=[p.to_dict() for p in precisions],
    )
    return BenchRun(directory, validation, result, tuple(reports), choice, o.accuracy_budget, precisions)


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
    options: BenchOptions,
    windows: tuple[int, ...],
    progress: Callable[[str], None],
) -> None:
    """Make, through `optimize`, the precisions `trials` plan to make, each judged by
    held-out bits per byte (`options.eval_text`) in windows of each length in `windows`."""
    made = [p for p in PRECISIONS if any(t.precision == p.name and t.outcome == "made" for t in trials)]
    if not made:
        return
    progress(
        f"making {', '.join(p.name for p in made)} (judged by held-out bits per byte; --no-reduced-precision "
        "skips this)"
    )
    flags = {p.option: p in made for p in PRECISIONS}  # every one: optimize's defaults do not apply here
    optimize_export(
        directory,
        eval_windows=windows,
        eval_text=options.eval_text,
        accuracy_budget=options.accuracy_budget,
        threads=options.threads,
        trust_code=options.trust_code,
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
        return skipped(f"made on request only: bsbr-export optimize {precision.flag}")
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
    export: BenchExport,
    options: BenchOptions,
    max_length: int,
    progress: Callable[[str], None],
) -> None:
    """Export a model for bench into a new or empty `directory`, as `export` says, each
    artifact checked at `options.tolerance`; formats that plan memory for a longest input
    plan it for `max_length`."""
    check_bench_out(directory, export.overwrite)
    progress(f"exporting {model_ref} to {directory}")
    source = load_source(model_ref, trust_code=options.trust_code)
    # Non-causal models and modules without the streaming protocol have no streaming graphs.
    streams = export.streaming and source.spec.causal and source.spec.state is not None
    chosen = (
        [FORMATS[f] for f in export.formats]
        if export.formats
        else [f for f in FORMATS.values() if f.installed and f.benched]
    )
    planned = any("max_length" in f.options for f in chosen)  # formats that plan memory for a longest input
    export_model(
        source,
        directory,
        chosen,
        streaming=streams,
        overwrite=export.overwrite,
        tolerance=options.tolerance,
        long_length=export.long_length,
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
