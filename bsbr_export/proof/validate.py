"""Parity: an artifact's outputs against the eager model's, on inputs it never saw.

Functions return measurements (`ParityReport`); callers decide what a failure means
(the CLI exits 1). One diff helper, `compare`, owns the edge cases.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from bsbr_export.export.graphs import stream_pieces
from bsbr_export.proof.evaltext import DEFAULT_ACCURACY_BUDGET, TextScore, bits_per_byte, logits_of, scores_text

DEFAULT_TOLERANCE = 1e-4  # fp32 max abs error, relative to the logit scale (max |logit|, at least 1)
# Other precisions carry their own rounding: fp16 ~1e-3 relative per op; int8 dynamic
# quantization moves logits by up to ~0.1 of their scale (its top-1 agreement is reported).
# bf16 keeps 8 mantissa bits (~4e-3 relative per op). For byte-level LMs held-out bits
# per byte judge them instead (evaltext).
PRECISION_TOLERANCES = {"fp16": 1e-2, "bf16": 5e-2, "int8": 0.25}
DEFAULT_BATCHES = (1, 2, 3)


@dataclass(frozen=True)
class Case:
    """One input shape to check: right-padded with a mask when `masked`, streamed in
    `pieces` for streaming graphs."""

    batch: int
    length: int
    masked: bool = False
    pieces: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        text = f"batch {self.batch} x length {self.length}"
        if self.masked:
            text += " (right-padded, masked)"
        if self.pieces:
            text += f" streamed {'+'.join(map(str, self.pieces))}"
        return text


@dataclass(frozen=True)
class OutputDiff:
    """How far one output is from the reference."""

    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    top1: float | None  # share of positions whose argmax agrees (logits only)
    tolerance: float  # the max abs error allowed for this output
    passed: bool


@dataclass(frozen=True)
class CaseResult:
    case: Case
    diffs: tuple[OutputDiff, ...]

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.diffs)


@dataclass(frozen=True)
class ParityReport:
    """Every case of one artifact; falsy when any case failed."""

    artifact: str
    results: tuple[CaseResult, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs(self) -> float:
        return max((d.max_abs for r in self.results for d in r.diffs), default=float("nan"))

    @property
    def failures(self) -> list[str]:
        return [
            f"{r.case.label}: {d.name} max abs {d.max_abs:.2e} > {d.tolerance:.2e}"
            for r in self.results
            for d in r.diffs
            if not d.passed
        ]

    def to_dict(self) -> dict:
        return {
            "artifact": self.artifact,
            "passed": self.passed,
            "max_abs": self.max_abs,
            "cases": [
                {"case": r.case.label, **dataclasses.asdict(r.case), "passed": r.passed,
                 "outputs": [dataclasses.asdict(d) for d in r.diffs]}
                for r in self.results
            ],
        }


def compare(name: str, expected: np.ndarray, actual: np.ndarray, tolerance: float, top1: bool = False) -> OutputDiff:
    """Diff statistics of `actual` against `expected`; shape mismatch or NaN fails."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape:
        return OutputDiff(name, float("inf"), float("inf"), float("inf"), float("nan"), None, tolerance, False)
    if expected.size == 0:
        return OutputDiff(name, 0.0, 0.0, 0.0, 1.0, None, tolerance, True)
    diff = np.abs(expected - actual)
    max_abs = float(diff.max()) if np.isfinite(actual).all() else float("inf")
    denom = np.linalg.norm(expected) * np.linalg.norm(actual)
    cosine = float((expected * actual).sum() / denom) if denom > 0 else float(max_abs == 0)
    agree = None
    if top1:
        agree = float((expected.argmax(-1) == actual.argmax(-1)).mean())
    allowed = tolerance * max(1.0, float(np.abs(expected).max()))
    return OutputDiff(
        name=name,
        max_abs=max_abs,
        max_rel=float((diff / (np.abs(expected) + 1e-7)).max()),
        mean_abs=float(diff.mean()),
        cosine=cosine,
        top1=agree,
        tolerance=allowed,
        passed=max_abs <= allowed,
    )


def default_lengths(chunk_size: int, long_length: int = 2048) -> list[int]:
    """1, c-1, c, c+1, 3c+5 (k*c + r) and a long one: where chunked code breaks."""
    c = chunk_size
    return sorted({1, max(c - 1, 1), c, c + 1, 3 * c + 5, long_length})


def default_cases(
    chunk_size: int,
    streaming: bool = False,
    long_length: int = 2048,
    lengths: list[int] | None = None,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
) -> list[Case]:
    """Every length x batch, plus a right-padded masked batch (full graphs) or uneven
    stream splits (streaming graphs)."""
    lengths = lengths or default_lengths(chunk_size, long_length)
    cases = [Case(batch, length) for length in lengths for batch in batches]
    if streaming:
        return [dataclasses.replace(k, pieces=tuple(stream_pieces(k.length, chunk_size))) for k in cases]
    return [*cases, Case(max(batches), max(lengths), masked=True)]


def fit_cases(cases: list[Case], chunk_size: int, max_batch: int | None, max_length: int | None) -> list[Case]:
    """Cases clamped to an artifact's largest batch and length (an ExecuTorch program
    has its memory planned up to them), duplicates dropped: the limit itself is checked
    instead of shapes the artifact refuses by design."""
    fitted = []
    for case in cases:
        batch, length = min(case.batch, max_batch or case.batch), min(case.length, max_length or case.length)
        pieces = tuple(stream_pieces(length, chunk_size)) if case.pieces else ()
        fitted.append(dataclasses.replace(case, batch=batch, length=length, pieces=pieces))
    return list(dict.fromkeys(fitted))


def make_inputs(case: Case, spec, seed: int) -> dict[str, np.ndarray]:
    """Fresh random inputs for one case, drawn as the spec says (token ids below their
    vocabulary, floats, and a right-padding mask that pads only `masked` cases)."""
    from bsbr_export.model.spec import example_inputs

    inputs = example_inputs(spec, case.batch, case.length, seed=seed, masked=case.masked)
    return {name: tensor.numpy() for name, tensor in inputs.items()}


def compare_outputs(spec, want: dict[str, np.ndarray], got: dict[str, np.ndarray], valid: np.ndarray | None,
                    tolerance: float) -> list[OutputDiff]:
    """Every output of the spec: per-position outputs at valid positions only (padding
    is don't-care), pooled outputs whole; top-1 only for outputs marked as logits."""
    diffs = []
    for out in spec.outputs:
        w, g = want[out.name], got[out.name]
        if out.per_position and valid is not None and w.shape[:2] == valid.shape == g.shape[:2]:
            w, g = w[valid], g[valid]
        diffs.append(compare(out.name, w, g, tolerance, top1=out.logits))
    return diffs


def check_parity(
    artifact: str,
    reference,
    runner,
    cases: list[Case],
    spec,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 1234,
) -> ParityReport:
    """Run `runner` and `reference` (runners over the same graph kind) on every case and
    compare every output of `spec` (a `ModelSpec`).

    Streaming cases (with `pieces`) start from the empty state of `spec.state` and
    compare the final state too.
    """
    results = []
    for i, case in enumerate(cases):
        inputs = make_inputs(case, spec, seed + i)
        if case.pieces:
            tokens = inputs[spec.tokens.name]
            want, want_state = _rollout(reference, spec, tokens, case.pieces)
            got, got_state = _rollout(runner, spec, tokens, case.pieces)
            diffs = compare_outputs(spec, want, got, None, tolerance)
            diffs += [compare(n, want_state[n], got_state[n], tolerance) for n in want_state]
        else:
            want = reference.infer({n: inputs[n] for n in reference.input_names})
            got = runner.infer({n: inputs[n] for n in runner.input_names})
            mask = spec.mask
            valid = inputs[mask.name].astype(bool) if mask is not None else None
            diffs = compare_outputs(spec, want, got, valid, tolerance)
        results.append(CaseResult(case, tuple(diffs)))
    return ParityReport(artifact, tuple(results))


def _rollout(runner, spec, ids: np.ndarray, pieces: tuple[int, ...]):
    """Feed `ids` in `pieces` through a streaming runner from the empty state; returns
    (outputs concatenated along the sequence, final `present.*` state)."""
    state = {n: empty_state_tensor(shape, ids.shape[0]) for n, shape in spec.state.inputs.items()}
    outputs, at = [], 0
    for size in pieces:
        out = runner.infer({spec.tokens.name: ids[:, at : at + size], **state})
        outputs.append(out)
        state = advance_state(state, out)
        at += size
    joined = {o.name: np.concatenate([step[o.name] for step in outputs], axis=1) if o.per_position
              else outputs[-1][o.name] for o in spec.outputs}
    return joined, {p.replace("past.", "present.", 1): v for p, v in state.items()}


def advance_state(state: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `past.*` feeds for the next step: `present.*` outputs replace their entry; a
    decode graph's `new.*` rows (chunks it finished) are appended, and only when there
    are any, so a step that finishes no chunk copies nothing."""
    advanced = {}
    for name, value in state.items():
        appended = outputs.get(name.replace("past.", "new.", 1))
        if appended is None:
            advanced[name] = outputs[name.replace("past.", "present.", 1)]
        else:
            advanced[name] = np.concatenate([value, appended], axis=2) if appended.shape[2] else value
    return advanced


def empty_state_tensor(shape: list, batch: int) -> np.ndarray:
    """One tensor of the initial (empty) state: its named dims are 0 except `batch`."""
    dims = [batch if d == "batch" else (d if isinstance(d, int) else 0) for d in shape]
    return np.zeros(dims, dtype=np.float32)


def engine_name(provider: str) -> str:
    """Short engine label: CPUExecutionProvider -> ort-cpu."""
    return "ort-" + provider.removesuffix("ExecutionProvider").lower()


@dataclass(frozen=True)
class ArtifactCheck:
    """One artifact on one engine: its parity and, on failure, where it diverged."""

    artifact: str
    engine: str  # "ort-cpu", "ort-cuda", "torchscript", ...
    parity: ParityReport
    layers: tuple = ()  # LayerDiff per block, when localized
    first_bad_layer: str | None = None
    text: TextScore | None = None  # held-out bits per byte, for byte-level language models

    @property
    def passed(self) -> bool:
        return self.parity.passed and (self.text is None or self.text.passed)

    def to_dict(self) -> dict:
        return {
            "artifact": self.artifact,
            "engine": self.engine,
            "parity": self.parity.to_dict(),
            "layers": [dataclasses.asdict(d) | {"passed": d.passed} for d in self.layers],
            "first_bad_layer": self.first_bad_layer,
            "text": self.text.to_dict() if self.text else None,
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
) -> ValidationResult:
    """Check each artifact of `export_dir` (hashes first) against the eager model rebuilt
    from the directory (its config and weights; a user's module from the reference the
    manifest records, imported only with `trust_code`, or `module` given here), on fresh
    random inputs, comparing every output of the spec it was exported with.

    ONNX artifacts run on every provider in `providers` (default: every one available,
    CPU and CUDA); a failing full-sequence ONNX graph is localized to its first bad block.
    Byte-level language models are also scored on held-out text (`eval_text`, default the
    held-out stdlib slice): each full-sequence artifact's bits per byte may exceed eager's
    by at most `accuracy_budget` (relative).
    """
    from pathlib import Path

    from bsbr_export.errors import UserError
    from bsbr_export.export.formats import FORMATS
    from bsbr_export.export.manifest import read_manifest
    from bsbr_export.model.sources import rebuild
    from bsbr_export.proof.localize import first_divergence, localize
    from bsbr_export.proof.runners import EagerRunner, available_providers

    if lengths is not None and any(n < 1 for n in lengths):
        raise UserError(f"lengths must be >= 1, got {lengths}")
    if batches is not None and any(b < 1 for b in batches):
        raise UserError(f"batches must be >= 1, got {list(batches)}")
    directory = Path(export_dir)
    manifest = read_manifest(directory)
    source = rebuild(directory, manifest, trust_code=trust_code, module=module)
    spec = source.spec
    usable = [p for p in available_providers() if p in ("CPUExecutionProvider", "CUDAExecutionProvider")]
    providers = providers or usable
    for provider in providers:
        if provider not in available_providers():
            raise UserError(f"execution provider {provider} is not installed here (available: {', '.join(usable)})")
    text = None
    if scores_text(spec):
        from bsbr_export.proof.evaltext import check_budget, heldout_text

        check_budget(accuracy_budget)
        text = eval_text if eval_text is not None else heldout_text()
        reference_bpb = bits_per_byte(logits_of(EagerRunner(source.module, spec), spec), text)
    checks = []
    for artifact in manifest["artifacts"]:
        path = directory / artifact["name"]
        kind = artifact["kind"]
        streaming = kind != "logits"
        reference = EagerRunner(source.module, spec, kind)
        settings = artifact.get("settings", {})
        static = settings.get("static_shape")
        allowed = PRECISION_TOLERANCES.get(settings.get("precision", "fp32"), tolerance)
        cases = [Case(*static)] if static else default_cases(spec.chunk_size, streaming, lengths=lengths,
                                                              batches=batches or DEFAULT_BATCHES)
        # Default shapes are clamped to an artifact's limits; asked-for ones past them are refused.
        cases = fit_cases(cases, spec.chunk_size, settings.get("max_batch") if batches is None else None,
                          settings.get("max_length") if lengths is None else None)
        fmt = FORMATS[artifact["format"]]
        names = reference.input_names, reference.output_names
        if fmt.per_provider:
            engines = [(engine_name(p), fmt.runner(path, *names, provider=p)) for p in providers]
        else:
            engines = [(fmt.name, fmt.runner(path, *names))]
        for engine, runner in engines:
            report = check_parity(artifact["name"], reference, runner, cases, spec, allowed, seed)
            layers, first_bad = (), None
            if not report.passed and artifact["format"] == "onnx" and not streaming and spec.block_path:
                index = next(i for i, r in enumerate(report.results) if not r.passed)
                feeds = make_inputs(report.results[index].case, spec, seed + index)
                layers = tuple(localize(path, source.module, spec, feeds, allowed))
                first_bad = first_divergence(list(layers))
            score = None
            if text is not None and kind == "logits" and not static:
                score = TextScore(bits_per_byte(logits_of(runner, spec), text), reference_bpb, accuracy_budget)
            checks.append(ArtifactCheck(artifact["name"], engine, report, layers, first_bad, score))
    return ValidationResult(str(directory), tolerance, tuple(checks))
