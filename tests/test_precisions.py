"""precisions.py, the one table of reduced precisions: the engines, `optimize`'s options
and `bench`'s plan all derive from its rows."""

from __future__ import annotations

import pytest
from conftest import run_cli

from bsbr_export.precisions import PRECISION, PRECISIONS, wanted
from bsbr_export.proof.optimize import optimize_export
from bsbr_export.runtime.engines import ENGINES


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.name)
def test_every_engine_a_precision_names_exists_and_runs_what_it_makes(precision):
    assert precision.engines
    for name in precision.engines:
        engine = ENGINES[name]
        # An ONNX precision's engines run its file; the others rebuild or convert the model.
        assert engine.artifact == precision.artifact or precision.artifact.endswith(".json")
        assert engine.precision != "fp32"


def test_optimize_takes_one_option_per_precision(capsys):
    """`bsbr-export optimize --help` lists --NAME/--no-NAME for every row, no more."""
    code, text, _ = run_cli(capsys, "optimize", "--help")
    assert code == 0
    for precision in PRECISIONS:
        assert f"{precision.flag} / --no-{precision.flag[2:]}" in text
    assert text.count("/ --no-") == len(PRECISIONS)


def test_defaults_follow_the_rows():
    assert wanted(PRECISION["int8"], None, []) is True
    assert wanted(PRECISION["int8-static"], None, []) is False
    assert wanted(PRECISION["fp16"], None, ["CPUExecutionProvider"]) is False
    assert wanted(PRECISION["fp16"], None, ["CUDAExecutionProvider", "CPUExecutionProvider"]) is True
    assert wanted(PRECISION["fp16"], True, []) is True and wanted(PRECISION["int8"], False, []) is False


def test_optimize_export_refuses_an_option_no_row_names(tmp_path):
    with pytest.raises(TypeError, match="unknown precision options \\['int4'\\]"):
        optimize_export(tmp_path, int4=True)
