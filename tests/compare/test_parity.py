"""Parity's verdicts: the plain tolerance, and the float64 model as the judge where fp32
rounding alone reaches it."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from bsbr_export.compare.cases import default_cases
from bsbr_export.compare.parity import check_parity
from bsbr_export.model.checkpoint import build_model
from bsbr_export.model.probe import spec_for
from bsbr_export.runtime.eager import EagerRunner

# So small that fp32's own rounding misses it: only the float64 judge can pass an artifact.
TINY_TOLERANCE = 1e-12


class Shifted:
    """A runner that answers as `inner` does, logits moved by `shift` (a wrong artifact),
    in float32 as an exported graph would."""

    def __init__(self, inner, shift: float = 0.0) -> None:
        self.inner, self.shift = inner, shift
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def infer(self, feeds):
        outputs = self.inner.infer(feeds)
        return {n: (v + self.shift if n == "logits" else v).astype(np.float32) for n, v in outputs.items()}


class NoFloat64:
    """A float64 model whose forward cannot run (a module building fp32 tensors of its own)."""

    input_names, output_names = ["input_ids"], ["logits"]

    def infer(self, feeds):
        raise RuntimeError("expected scalar type Double but found Float")


@pytest.fixture(params=["full", "streaming"])
def graph(request):
    """The fp32 reference of a tiny model's graph, its spec, and its cases (ragged
    lengths, a masked batch or uneven stream splits)."""
    model = build_model(tiny_config(), seed=3)
    spec = spec_for(model)
    cases = default_cases(spec.chunk_size, request.param, long_length=23, batches=(2,))
    return EagerRunner(model, spec, request.param), spec, cases


def test_an_artifact_as_close_to_float64_as_eager_passes_where_the_plain_tolerance_fails(graph):
    reference, spec, cases = graph
    exact = Shifted(reference.in_float64())  # the float64 model's answers, rounded once to fp32
    plain = check_parity("exact", reference, exact, cases, spec, TINY_TOLERANCE)
    assert not plain and all(d.fp64_max_abs is None for r in plain.results for d in r.diffs)
    judged = check_parity("exact", reference, exact, cases, spec, TINY_TOLERANCE, precise=reference.in_float64)
    assert judged, judged.failures
    assert plain.judged_by_float64 == 0 < judged.judged_by_float64 <= len(cases)
    widened = [d for r in judged.results for d in r.diffs if d.fp64_max_abs is not None]
    assert widened and all(0 < d.reference_error and d.fp64_max_abs <= 2 * d.reference_error for d in widened)


def test_a_wrong_artifact_still_fails_and_says_how_far_from_float64_it_is(graph):
    reference, spec, cases = graph
    wrong = Shifted(reference, shift=1e-3)  # far past fp32's own error (~1e-6 here)
    report = check_parity("wrong", reference, wrong, cases, spec, 1e-4, precise=reference.in_float64)
    assert not report
    assert all("logits" in f and "from the float64 model" in f for f in report.failures)
    failed = [d for r in report.results for d in r.diffs if not d.passed]
    assert all(d.fp64_max_abs > 9e-4 and d.reference_error < 1e-4 for d in failed)


def test_a_model_that_cannot_run_in_float64_keeps_the_plain_tolerance(graph):
    reference, spec, cases = graph
    exact = Shifted(reference.in_float64())
    report = check_parity("exact", reference, exact, cases, spec, TINY_TOLERANCE, precise=NoFloat64)
    assert not report and all("float64" not in f for f in report.failures)


def test_the_float64_copy_leaves_the_reference_in_fp32():
    model = build_model(tiny_config(), seed=3)
    reference = EagerRunner(model, None, "full")
    exact = reference.in_float64()
    assert exact.module is not reference.module
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.float64 for p in exact.module.parameters())
