"""Module references on the command line: `file.py:factory` with --trust-code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import user_models
from conftest import run_cli

MODELS = Path(user_models.__file__)


@pytest.mark.parametrize(
    "ref, extra, message",
    [
        (f"{MODELS}:value_head_model", [], "pass --trust-code"),
        ("no/such/file.py:factory", ["--trust-code"], "no such file"),
        ("no_such_package.models:factory", ["--trust-code"], "no module named 'no_such_package'"),
        (f"{MODELS}:missing", ["--trust-code"], "has no attribute 'missing'"),
        (f"{MODELS}:NOT_CALLABLE", ["--trust-code"], "not a callable"),
        (f"{MODELS}:not_a_module", ["--trust-code"], "returned a int, not a torch.nn.Module"),
        (f"{MODELS}:chunk_loop", ["--trust-code"], "no BSBR attention layer"),
        (f"{MODELS}:text_out", ["--trust-code"], "outputs label are not tensors"),
        (f"{MODELS}:pooled_model", ["--trust-code", "--weights", "missing.safetensors"], "does not exist"),
        (f"{MODELS}:pooled_model", ["--trust-code", "--spec", "missing.json"], "spec file missing.json does not exist"),
        ("bsbr-tiny", ["--weights", "w.safetensors"], "apply to a module reference"),
    ],
)
def test_bad_module_refs_are_one_line_and_write_nothing(capsys, tmp_path, ref, extra, message):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", ref, "--out", out, *extra)
    assert code == 2, err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_weights_that_do_not_fit(capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"body.embedding.weight": torch.zeros(3, 3)}, tmp_path / "w.safetensors")
    code, _, err = run_cli(
        capsys,
        "export",
        f"{MODELS}:pooled_model",
        "--trust-code",
        "--weights",
        tmp_path / "w.safetensors",
        "--out",
        tmp_path / "out",
    )
    assert code == 2 and "do not fit MeanPooled" in err and "missing" in err and "wrong shapes" in err
    assert not (tmp_path / "out").exists()


def test_a_module_with_gated_retrieval_through_doctor_export_validate(capsys, tmp_path):
    """A user's decoder on the public layer with retrieval="gated": doctor finds it clean,
    its full, streaming and decode graphs export and validate at unseen lengths."""
    ref = f"{MODELS}:gated_decoder"
    code, stdout, err = run_cli(capsys, "doctor", ref, "--trust-code")
    assert code == 0, err + stdout
    out = tmp_path / "gated"
    code, _, err = run_cli(
        capsys, "export", ref, "--trust-code", "--format", "onnx,torchscript", "--streaming", "--out", out
    )
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "validate", out, "--lengths", "3,9,22", "--trust-code")
    assert code == 0, err + stdout
    checks = json.loads((out / "validation.json").read_text())["checks"]
    assert {c["artifact"] for c in checks if c["passed"]} == {
        f"model{kind}{suffix}" for kind in ("", ".streaming", ".decode") for suffix in (".onnx", ".pt")
    }


def test_export_and_validate_a_module_ref(capsys, tmp_path):
    out = tmp_path / "vh"
    code, _, err = run_cli(
        capsys, "export", f"{MODELS}:value_head_model", "--trust-code", "--format", "onnx", "--out", out
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "module" and manifest["source"]["ref"].endswith(
        "user_models.py:value_head_model"
    )
    assert [o["name"] for o in manifest["spec"]["outputs"]] == ["logits", "value"]
    code, _, err = run_cli(capsys, "validate", out, "--lengths", "5,14")
    assert code == 2 and "--trust-code" in err
    code, stdout, err = run_cli(capsys, "validate", out, "--lengths", "5,14", "--trust-code")
    assert code == 0, err
    report = json.loads((out / "validation.json").read_text())
    names = {d["name"] for c in report["checks"] for case in c["parity"]["cases"] for d in case["outputs"]}
    assert names == {"logits", "value"}
    # optimize rebuilds the same eager reference: refused, then allowed, like validate.
    code, _, err = run_cli(capsys, "optimize", out, "--length", "21", "--no-int8", "--no-fp16")
    assert code == 2 and "--trust-code" in err and not (out / "model.optimized.onnx").exists()
    code, stdout, err = run_cli(capsys, "optimize", out, "--length", "21", "--no-int8", "--no-fp16", "--trust-code")
    assert code == 0, err
    assert (out / "model.optimized.onnx").is_file() and "matches eager" in stdout


@pytest.fixture(scope="module")
def tokens_export(tmp_path_factory):
    """An ONNX export (with streaming graphs) of a module whose only input is `tokens`."""
    from bsbr_export.cli import main

    out = tmp_path_factory.mktemp("module") / "tokens"
    args = ["export", f"{MODELS}:tokens_only", "--trust-code", "--format", "onnx", "--streaming", "--out", str(out)]
    assert main(args) == 0
    assert [i["name"] for i in json.loads((out / "manifest.json").read_text())["spec"]["inputs"]] == ["tokens"]
    return out


def test_optimize_a_module_that_takes_no_mask(capsys, tokens_export):
    """optimize feeds what the spec names: a graph without an attention_mask input is not
    handed one (ONNX Runtime refuses unknown inputs), and its token input is `tokens`."""
    out = tokens_export
    code, stdout, err = run_cli(
        capsys, "optimize", out, "--trust-code", "--length", "21", "--static-int8", "--target-top1", "0.5", "--no-fp16"
    )
    assert code == 0, err
    assert all((out / name).is_file() for name in ("model.optimized.onnx", "model.int8.onnx", "model.int8-static.onnx"))


def test_bench_feeds_what_the_spec_names(capsys, tokens_export):
    """bench's timing, parity and decode inputs are named by the spec, not `input_ids`."""
    code, _, err = run_cli(
        capsys,
        "bench",
        tokens_export,
        "--trust-code",
        "--engines",
        "eager,ort-cpu-all",
        "--lengths",
        "9,14",
        "--decode",
        "5",
        "--validation-lengths",
        "3",
        "--budget",
        "0.05",
    )
    assert code == 0, err
    report = json.loads((tokens_export / "report.json").read_text())
    assert {row["engine"]: row["status"] for row in report["table"]} == {"eager": "✅", "ort-cpu-all": "✅"}
    assert all(row["max_abs"] <= 1e-4 for row in report["table"])
    assert [d["context"] for d in report["bench"]["decode"]] == [5]
