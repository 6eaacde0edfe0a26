"""`validate`: parity of every artifact, failures named and localized, bad input refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import rehash, run_cli, weight_used_only_in
from onnx import numpy_helper

from bsbr_export.compare.parity import compare
from bsbr_export.errors import UserError
from bsbr_export.proof.validate import validate_export


def test_clean_export_passes(capsys, export_copy):
    code, out, _ = run_cli(capsys, "validate", export_copy, "--lengths", "1,7,8,9,29", "--batches", "1,3")
    assert code == 0
    assert "model.streaming.onnx" in out and "ort-cpu" in out and "torchscript" in out
    report = json.loads((export_copy / "validation.json").read_text())
    assert report["passed"] is True
    case = report["checks"][0]["parity"]["cases"][0]
    assert {"max_abs", "max_rel", "mean_abs", "cosine", "top1"} <= set(case["outputs"][0])


def test_perturbed_weight_fails_and_names_the_layer(capsys, export_copy):
    path = export_copy / "model.onnx"
    proto = onnx.load(str(path))
    init = weight_used_only_in(proto, "model.blocks.1")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3.0, init.name))
    onnx.save(proto, str(path))
    rehash(export_copy, "model.onnx")
    code, out, err = run_cli(capsys, "validate", export_copy, "--lengths", "9,29", "--batches", "2")
    assert code == 1
    assert "FAILED model.onnx on ort-cpu: batch 2 x length 9" in err
    assert "model.onnx first diverges at blocks.1" in err
    result = validate_export(export_copy, lengths=[9], batches=(1,))
    onnx_check = next(c for c in result.checks if c.artifact == "model.onnx")
    assert [d.passed for d in onnx_check.layers] == [True, False, False]  # blocks.0, blocks.1, output


def test_compare_edge_cases():
    assert not compare("x", np.zeros((2, 3)), np.zeros((3, 2)), 1e-4).passed
    assert not compare("x", np.zeros(3), np.array([0, np.nan, 0]), 1e-4).passed
    empty = compare("x", np.zeros((0, 4)), np.zeros((0, 4)), 1e-4)
    assert empty.passed and empty.max_abs == 0
    d = compare("logits", np.array([[1.0, 2.0], [3.0, 0.0]]), np.array([[1.0, 2.5], [3.0, 0.0]]), 0.1, top1=True)
    assert d.max_abs == 0.5 and d.top1 == 1.0 and not d.passed


def test_no_manifest(capsys, tmp_path):
    code, _, err = run_cli(capsys, "validate", tmp_path)
    assert code == 2 and "has no manifest.json" in err


def test_hash_mismatch(capsys, export_copy):
    with open(export_copy / "model.pt", "ab") as f:
        f.write(b"x")
    code, _, err = run_cli(capsys, "validate", export_copy)
    assert code == 2 and "does not match the sha256" in err and err.count("\n") == 1


def test_artifact_not_onnx(capsys, export_copy):
    (export_copy / "model.onnx").write_bytes(b"not a model")
    rehash(export_copy, "model.onnx")
    code, _, err = run_cli(capsys, "validate", export_copy, "--lengths", "3")
    assert code == 2 and "is not a loadable ONNX model" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--provider", "TensorrtExecutionProvider"], "TensorrtExecutionProvider is not"),
        (["--lengths", "0,5"], "--lengths must be integers >= 1"),
        (["--lengths", "a"], "--lengths must be comma-separated integers"),
        (["--batches", "-1"], "--batches must be integers >= 1"),
    ],
)
def test_bad_options(capsys, export_copy, args, message):
    code, _, err = run_cli(capsys, "validate", export_copy, *args)
    assert code == 2 and message in err and err.count("\n") == 1


def test_reduced_precision_of_a_trained_lm_is_judged_by_its_loss_on_text(stdlib_copy, tmp_path):
    """All-int8 bsbr-stdlib is judged by held-out text alone, whatever its parity on random
    ids says (reported beside it): within a loose budget it passes, a tight one fails it.
    The fp32 graph is still held to parity. The text is the default 32 KiB slice: on a few
    thousand bytes int8 can score as well as fp32 (the gated model's did), and no budget
    fails it there."""
    from bsbr_export.proof.evaltext import DEFAULT_EVAL_BYTES, heldout_text, read_eval_text
    from bsbr_export.proof.optimize import optimize_export

    out, _ = stdlib_copy
    text = tmp_path / "heldout.py"
    text.write_bytes(heldout_text(DEFAULT_EVAL_BYTES))
    optimize_export(out, length=64, fp16=False, eval_text=read_eval_text(text), accuracy_budget=1.0)
    for budget, passes in ((1.0, True), (1e-5, False)):
        result = validate_export(
            out, lengths=[70], batches=(1,), eval_text=read_eval_text(text), accuracy_budget=budget
        )
        checks = {c.artifact: c for c in result.checks}
        int8, fp32 = checks["model.int8.onnx"], checks["model.onnx"]
        assert int8.judged_by_text and int8.parity.results and int8.layers == ()
        assert int8.passed is passes and int8.to_dict()["judged_by"] == "held-out text"
        assert not fp32.judged_by_text and fp32.parity.passed and fp32.passed


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: nothing to refuse")
def test_validate_on_cuda_without_a_gpu_is_one_line_and_exit_2(export_copy, capsys):
    code, _, err = run_cli(capsys, "validate", export_copy, "--device", "cuda")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--device cuda: torch" in err
    assert not (export_copy / "validation.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (CI has none): run on one")
def test_validate_on_cuda_runs_torchscript_on_the_gpu(tiny_export):
    out, _ = tiny_export
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        result = validate_export(out, lengths=[13], batches=(2,), device="cuda")
    except UserError as exc:  # torch sees a GPU, ONNX Runtime's CUDA provider may not be installed
        pytest.skip(str(exc))
    engines = {(c.artifact, c.engine) for c in result.checks}
    assert ("model.pt", "torchscript-cuda") in engines
    assert all(engine != "ort-cpu" for _, engine in engines) and result.passed


def test_on_cuda_the_onnx_graphs_need_the_cuda_provider_and_nothing_else_does():
    from bsbr_export.proof.validate import check_providers
    from bsbr_export.runtime.onnx import available_providers

    assert check_providers(None, "cuda", onnx_graphs=False) == []  # a TorchScript-only export
    if "CUDAExecutionProvider" in available_providers():
        assert check_providers(None, "cuda") == ["CUDAExecutionProvider"]
    else:
        with pytest.raises(UserError, match="pip install onnxruntime-gpu"):
            check_providers(None, "cuda")
    assert check_providers(["CPUExecutionProvider"], "cuda") == ["CPUExecutionProvider"]  # asked for: kept
