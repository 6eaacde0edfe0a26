"""Parity: an artifact's outputs against a reference's, on the same inputs.

Functions return measurements (`ParityReport`); callers decide what a failure means
(the CLI exits 1). One diff helper, `compare`, owns the edge cases.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from bsbr_export.compare.cases import Case, make_inputs
from bsbr_export.defaults import DEFAULT_TOLERANCE
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.base import Runner
from bsbr_export.runtime.state import advance_state, empty_state_tensor


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
                {
                    "case": r.case.label,
                    **dataclasses.asdict(r.case),
                    "passed": r.passed,
                    "outputs": [dataclasses.asdict(d) for d in r.diffs],
                }
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
    allowed = tolerance * output_scale(expected)
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


def output_scale(expected: np.ndarray) -> float:
    """What tolerances are relative to: the reference's largest magnitude, at least 1."""
    return max(1.0, float(np.abs(expected).max())) if np.size(expected) else 1.0


def compare_outputs(
    spec: ModelSpec, want: dict[str, np.ndarray], got: dict[str, np.ndarray], valid: np.ndarray | None, tolerance: float
) -> list[OutputDiff]:
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
    reference: Runner,
    runner: Runner,
    cases: list[Case],
    spec: ModelSpec,
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
            valid = inputs[mask.name].astype(bool) if mask is not None and mask.name in inputs else None
            diffs = compare_outputs(spec, want, got, valid, tolerance)
            # A row step's `row.*` outputs (each row's new key and value) besides the model's.
            diffs += [compare(n, want[n], got[n], tolerance) for n in want if n not in spec.output_names]
        results.append(CaseResult(case, tuple(diffs)))
    return ParityReport(artifact, tuple(results))


def _rollout(runner: Runner, spec: ModelSpec, ids: np.ndarray, pieces: tuple[int, ...]):
    """Feed `ids` in `pieces` through a streaming runner from the empty state; returns
    (outputs concatenated along the sequence, final `present.*` state)."""
    state = {n: empty_state_tensor(shape, ids.shape[0]) for n, shape in spec.state.inputs.items()}
    outputs, at = [], 0
    for size in pieces:
        out = runner.infer({spec.tokens.name: ids[:, at : at + size], **state})
        outputs.append(out)
        state = advance_state(state, out)
        at += size
    joined = {
        o.name: np.concatenate([step[o.name] for step in outputs], axis=1) if o.per_position else outputs[-1][o.name]
        for o in spec.outputs
    }
    return joined, {p.replace("past.", "present.", 1): v for p, v in state.items()}
