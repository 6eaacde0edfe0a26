"""`bsbr-export export`: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import pytest
from conftest import run_cli

from bsbr_export.export import torchscript
from bsbr_export.runtime.eager import EagerRunner


def test_export_prints_table(capsys, tmp_path):
    code, out, err = run_cli(capsys, "export", "bsbr-tiny", "--out", tmp_path / "e", "--format", "torchscript")
    assert code == 0
    assert "model.pt" in out and "passed" in out
    # Not a terminal: one plain, time-stamped line per step on stderr, in order.
    steps = [line.split("] ", 1)[1] for line in err.splitlines()]
    assert steps == ["loading model", "exporting model.pt", "checking model.pt against eager"], err
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "config.json",
        "manifest.json",
        "model.pt",
        "model.safetensors",
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "onx"], "unknown format 'onx': did you mean onnx?"),
        (["--format", "tflite"], "unknown format 'tflite'"),
        (["--opset", "7"], "opset 7 is not supported"),
        (["--static", "2by3"], "--static must look like"),
        (["--static", "2x12", "--streaming"], "--static applies to the full-sequence graph only"),
    ],
)
def test_bad_options(capsys, tmp_path, extra, message):
    code, _, err = run_cli(capsys, "export", "bsbr-tiny", "--out", tmp_path / "e", *extra)
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "e").exists()
    assert not list(tmp_path.iterdir())


def test_out_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    code, _, err = run_cli(capsys, "export", "bsbr-tiny", "--out", tmp_path / "f", "--format", "torchscript")
    assert code == 2 and "a file with that name exists" in err
    code, _, err = run_cli(capsys, "export", "bsbr-tiny", "--out", tmp_path / "f" / "sub", "--format", "torchscript")
    assert code == 2 and "is a file, not a directory" in err


def test_non_empty_out_needs_force(capsys, tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "old").write_text("x")
    code, _, err = run_cli(capsys, "export", "bsbr-tiny", "--out", tmp_path / "e", "--format", "torchscript")
    assert code == 2 and "not empty" in err
    code, _, _ = run_cli(capsys, "export", "bsbr-tiny", "--out", tmp_path / "e", "--format", "torchscript", "--force")
    assert code == 0 and not (tmp_path / "e" / "old").exists()


def test_ctrl_c_leaves_nothing(capsys, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torchscript, "export_torchscript", interrupted)  # what the torchscript format calls
    code, _, err = run_cli(capsys, "export", "bsbr-tiny", "--out", tmp_path / "e", "--format", "torchscript")
    assert code == 130 and "interrupted" in err
    assert not list(tmp_path.iterdir())


def test_an_export_within_fp32s_own_error_passes_and_says_so(capsys, tmp_path):
    # A 1e-12 tolerance is below fp32 rounding: ORT passes only as close to the float64
    # model as eager is, and the table says how many cases passed that way.
    code, out, err = run_cli(
        capsys, "export", "bsbr-tiny", "--out", tmp_path / "e", "--format", "onnx", "--tolerance", "1e-12"
    )
    assert code == 0, err
    assert "within fp32's own error" in " ".join(out.split())


def test_failed_parity_exits_1(capsys, tmp_path, monkeypatch):
    # ONNX Runtime's float32 results differ from eager by ~1e-6: a 1e-12 tolerance must fail
    # once the float64 judge is away (with it, ORT is as close to float64 as eager is, and
    # passes: tests/compare/test_parity.py).
    monkeypatch.setattr(EagerRunner, "in_float64", lambda self: None)
    code, out, err = run_cli(
        capsys, "export", "bsbr-tiny", "--out", tmp_path / "e", "--format", "onnx", "--tolerance", "1e-12"
    )
    assert code == 1
    assert "FAILED model.onnx: batch 1 x length 1" in err
    assert "FAILED" in out
