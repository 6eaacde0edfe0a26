"""Validation: every artifact of an export directory against the eager model it came
from, on inputs it never saw (`compare.cases`), compared by `compare.parity`.

Functions return measurements (`ValidationResult`); callers decide what a failure means
(the CLI exits 1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path

from bsbr_export.compare.cases import artifact_cases, make_inputs
from bsbr_export.compare.parity import ParityReport, check_parity
from bsbr_export.defaults import DEFAULT_ACCURACY_BUDGET, DEFAULT_TOLERANCE, PRECISION_TOLERANCES
from bsbr_export.errors import UserError
from bsbr_export.formats import FORMATS
from bsbr_export.io import atomic_write, check_writable
from bsbr_export.manifest import artifact_kind, read_manifest
from bsbr_export.model.sources import Source, rebuild
from bsbr_export.proof.evaltext import TextScore, bits_per_byte, check_budget, heldout_text, logits_of, scores_text
from bsbr_export.proof.localize import first_divergence, localize
from bsbr_export.runtime.artifacts import open_artifact
from bsbr_export.runtime.base import Runner
from bsbr_export.runtime.eager import EagerRunner
from bsbr_export.runtime.engines import check_device
from bsbr_export.runtime.onnx import available_providers, provider_engine

VALIDATION_FILE = "validation.json"
CUDA_PROVIDER = "CUDAExecutionProvider"
VALIDATED_PROVIDERS = ("CPUExecutionProvider", CUDA_PROVIDER)


@dataclass(frozen=True)
class ArtifactCheck:
    """One artifact on one engine: its parity and, on failure, where it diverged."""

    artifact: str
    engine: str  # "ort-cpu", "ort-cuda", "torchscript", ...
    parity: ParityReport
    layers: tuple = ()  # LayerDiff per block, when localized
    first_bad_layer: str | None = None
    text: TextScore | None = None  # held-out bits per byte, for byte-level language models
    precision: str = "fp32"

    @property
    def judged_by_text(self) -> bool:
        """A reduced precision with a held-out text score passes on that score alone (its
        parity is reported): random ids move a trained model's logits far more than text
        does (int8 of bsbr-stdlib: top-1 0.34 on them, +1.6% bits per byte on text)."""
        return self.precision != "fp32" and self.text is not None

    @property
    def passed(self) -> bool:
        if self.judged_by_text:
            return self.text.passed
        return self.parity.passed and (self.text is None or self.text.passed)

    def to_dict(self) -> dict:
        return {
            "artifact": self.artifact,
            "engine": self.engine,
            "parity": self.parity.to_dict(),
            "layers": [dataclasses.asdict(d) | {"passed": d.passed} for d in self.layers],
            "first_bad_layer": self.first_bad_layer,
            "text": self.text.to_dict() if self.text else None,
            "precision": self.precision,
            "judged_by": "held-out text" if self.judged_by_text else "parity",
            "passed": self.passed,
        }


@dataclass(frozen=True)
class ValidationResult:
    """Every artifact of an export directory against its eager model."""

    export_dir: str
    tolerance: float
    checks: tuple[ArtifactCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {
            "export_dir": self.export_dir,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "checks": [c.to_dict() for c in self.checks],
        }


def validate_export(
    export_dir,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    lengths: list[int] | None = None,
    batches: tuple[int, ...] | None = None,
    providers: list[str] | None = None,
    seed: int = 1234,
    trust_code: bool = False,
    module=None,
    eval_text: bytes | None = None,
    accuracy_budget: float = DEFAULT_ACCURACY_BUDGET,
    device: str = "cpu",
) -> ValidationResult:
    """Check each artifact of `export_dir` (hashes first) against the eager model rebuilt
    from the directory (its config and weights; a user's module from the reference the
    manifest records, imported only with `trust_code`, or `module` given here), on fresh
    random inputs, comparing every output of the spec it was exported with.

    ONNX artifacts run on every provider in `providers` (default: every one available,
    CPU and CUDA); a failing full-sequence ONNX graph is localized to its first bad block.
    Byte-level language models are also scored on held-out text (`eval_text`, default the
    held-out stdlib slice): each full-sequence artifact's bits per byte may exceed eager's
    by at most `accuracy_budget` (relative). On `device` "cuda", ONNX graphs run on the
    CUDA provider and TorchScript on the GPU (the reference stays eager fp32 on the CPU).
    """
    if lengths is not None and any(n < 1 for n in lengths):
        raise UserError(f"lengths must be >= 1, got {lengths}")
    if batches is not None and any(b < 1 for b in batches):
        raise UserError(f"batches must be >= 1, got {list(batches)}")
    directory = Path(export_dir)
    manifest = read_manifest(directory)
    source = rebuild(directory, manifest, trust_code=trust_code, module=module)
    check_device(device)
    providers = check_providers(
        providers, device, any(FORMATS[a["format"]].per_provider for a in manifest["artifacts"])
    )
    scorer = TextScorer.of(source, eval_text, accuracy_budget)
    checks = []
    for artifact in manifest["artifacts"]:
        kind, settings = artifact_kind(artifact), artifact.get("settings", {})
        precision = settings.get("precision", "fp32")
        allowed = PRECISION_TOLERANCES.get(precision, tolerance)
        cases = artifact_cases(source.spec.chunk_size, kind, settings, lengths=lengths, batches=batches)
        reference = EagerRunner(source.module, source.spec, kind)
        for engine, runner in artifact_engines(
            directory / artifact["name"], artifact["format"], reference, providers, device
        ):
            report = check_parity(
                artifact["name"], reference, runner, cases, source.spec, allowed, seed, precise=reference.in_float64
            )
            score = scorer.score(runner) if kind == "full" and not settings.get("static_shape") else None
            check = ArtifactCheck(artifact["name"], engine, report, text=score, precision=precision)
            if not check.judged_by_text:
                layers = localized(
                    report, directory / artifact["name"], artifact["format"], kind, source, allowed, seed
                )
                check = replace(check, layers=layers, first_bad_layer=first_divergence(list(layers)))
            checks.append(check)
    return ValidationResult(str(directory), tolerance, tuple(checks))


def validate_and_record(export_dir, **options) -> ValidationResult:
    """`validate_export`, its result written to EXPORT_DIR/validation.json (the directory
    checked writable before the work, not after)."""
    directory = Path(export_dir)
    read_manifest(directory, verify=False)  # an export dir, and one validation.json can go into
    check_writable(directory)
    result = validate_export(directory, **options)
    with atomic_write(directory / VALIDATION_FILE) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def check_providers(providers: list[str] | None, device: str = "cpu", onnx_graphs: bool = True) -> list[str]:
    """The ONNX Runtime providers to validate on: those asked for (each must be
    installed here), or every usable one (on `device` "cuda": the CUDA provider, needed
    only when there are `onnx_graphs` to run)."""
    usable = [p for p in available_providers() if p in VALIDATED_PROVIDERS]
    for provider in providers or ():
        if provider not in available_providers():
            raise UserError(f"execution provider {provider} is not installed here (available: {', '.join(usable)})")
    if device == "cuda" and not providers:
        if not onnx_graphs:
            return []
        if CUDA_PROVIDER not in usable:
            raise UserError(
                f"--device cuda: ONNX Runtime's {CUDA_PROVIDER} is not available here: pip install "
                "onnxruntime-gpu, or pass --provider CPUExecutionProvider"
            )
        return [CUDA_PROVIDER]
    return providers or usable


def artifact_engines(
    path: Path, fmt: str, reference: Runner, providers: list[str], device: str = "cpu"
) -> list[tuple[str, Runner]]:
    """(engine label, runner) for an artifact: one per ONNX Runtime provider for formats
    validated per provider, else the format's own runner (on the GPU for `device`
    "cuda" where its runner computes there; on the CPU otherwise)."""
    names = reference.input_names, reference.output_names
    if FORMATS[fmt].per_provider:
        return [(provider_engine(p), open_artifact(fmt, path, *names, provider=p)) for p in providers]
    if device == "cuda" and FORMATS[fmt].on_cuda:
        return [(f"{fmt}-cuda", open_artifact(fmt, path, *names, device="cuda"))]
    return [(fmt, open_artifact(fmt, path, *names))]


def localized(
    report: ParityReport, path: Path, fmt: str, kind: str, source: Source, tolerance: float, seed: int
) -> tuple:
    """Per-block differences of a failing full ONNX graph on its first failing case
    (empty when it passed, or cannot be localized)."""
    if report.passed or fmt != "onnx" or kind != "full" or not source.spec.block_path:
        return ()
    index = next(i for i, r in enumerate(report.results) if not r.passed)
    feeds = make_inputs(report.results[index].case, source.spec, seed + index)
    return tuple(localize(path, source.module, source.spec, feeds, tolerance))


@dataclass(frozen=True)
class TextScorer:
    """Held-out bits per byte of a byte-level LM's artifacts against eager's (inactive:
    `text` None, for models held-out text cannot score)."""

    spec: object
    text: bytes | None = None
    reference: float = 0.0
    budget: float = DEFAULT_ACCURACY_BUDGET

    @classmethod
    def of(cls, source: Source, eval_text: bytes | None, budget: float) -> TextScorer:
        if not scores_text(source.spec):
            return cls(source.spec)
        check_budget(budget)
        text = eval_text if eval_text is not None else heldout_text()
        reference = bits_per_byte(logits_of(EagerRunner(source.module, source.spec), source.spec), text)
        return cls(source.spec, text, reference, budget)

    def score(self, runner: Runner) -> TextScore | None:
        if self.text is None:
            return None
        return TextScore(bits_per_byte(logits_of(runner, self.spec), self.text), self.reference, self.budget)
