"""The engine table: every engine names a file, a runner and a precision, and what it
runs from an export directory agrees with eager on inputs it never saw."""

import numpy as np
import pytest

from bsbr_export.compare.parity import compare
from bsbr_export.formats import FORMATS, artifact_name
from bsbr_export.manifest import manifest_spec
from bsbr_export.proof.bench import spec_feeds
from bsbr_export.runtime.engines import ENGINES, available_engines, open_engine, why_not
from bsbr_export.runtime.onnx import available_providers


def test_every_engine_is_one_row():
    for name, engine in ENGINES.items():
        assert engine.name == name
        assert engine.precision in ("fp32", "bf16", "int8", "fp16")
        assert (engine.artifact is None) == (engine.runs in ("eager", "compile", "autocast"))
    # One engine per format torch runs, named like the format, running the format's full graph.
    for fmt in FORMATS.values():
        if fmt.engine:
            assert ENGINES[fmt.name].artifact == artifact_name(fmt, "full")
    assert [n for n in ENGINES if n.startswith("ort-cpu-")][:4] == [f"ort-cpu-{level}" for level in
                                                                    ("disabled", "basic", "extended", "all")]


def test_available_engines_follow_the_files(tiny_onnx_export):
    available = available_engines(tiny_onnx_export)
    assert {"eager", "compile", "ort-cpu-disabled", "ort-cpu-all"} <= set(available)
    assert "torchscript" not in available and "ort-cpu-int8" not in available
    assert "model.int8.onnx" in why_not(ENGINES["ort-cpu-int8"], tiny_onnx_export)
    if "CUDAExecutionProvider" not in available_providers():
        assert "ort-cuda-all" not in available
        assert "CUDAExecutionProvider" in why_not(ENGINES["ort-cuda-all"], tiny_onnx_export)


@pytest.mark.parametrize("engine", ["ort-cpu-disabled", "ort-cpu-all"])
def test_an_opened_engine_matches_eager(tiny_onnx_export, engine):
    spec = manifest_spec(tiny_onnx_export)
    feeds = spec_feeds(spec, 3, 2 * spec.chunk_size + 5, seed=11)  # not a multiple of the chunk size
    eager = open_engine("eager", tiny_onnx_export).infer(feeds)
    runner = open_engine(engine, tiny_onnx_export, threads=1)
    got = runner.infer(feeds)
    assert list(got) == spec.output_names
    diff = compare("logits", eager["logits"], got["logits"], 1e-4, top1=True)
    assert diff.passed and diff.top1 == 1.0, diff
    assert not np.array_equal(eager["logits"][0], eager["logits"][1])  # rows differ: the feeds are real
