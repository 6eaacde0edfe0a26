"""ExecuTorch programs (.pte, XNNPACK): right at every length up to their maximum and
every batch up to theirs, listed by validate and bench, and refused in one line past
their limits, when corrupt, or when the executorch package is missing."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from conftest import EXECUTORCH_LIMITS, random_ids, rehash, run_cli

from bsbr_export import load_model

pytest.importorskip("executorch", reason='the executorch extra is not installed (pip install ".[executorch]")')

from bsbr_export.runtime.executorch import ExecuTorchRunner  # noqa: E402  (needs the package, skipped above)

NAMES = (["input_ids", "attention_mask"], ["logits"])


def test_export_records_its_limits_and_passes_its_checks(executorch_export):
    out, result = executorch_export
    assert result.passed and [a.name for a in result.artifacts] == ["model.pte"]  # no streaming .pte
    artifact = json.loads((out / "manifest.json").read_text())["artifacts"][0]
    assert {k: artifact["settings"][k] for k in EXECUTORCH_LIMITS} == EXECUTORCH_LIMITS
    checked = {(case["batch"], case["length"]) for case in artifact["checks"]["cases"]}
    # The default 2048 check is clamped to the program's maximum, not skipped.
    assert max(length for _, length in checked) == EXECUTORCH_LIMITS["max_length"]
    assert ExecuTorchRunner(out / "model.pte", *NAMES).limits == EXECUTORCH_LIMITS


def test_program_matches_eager_up_to_its_limits(executorch_export):
    out, _ = executorch_export
    model = load_model(out).eval()
    runner = ExecuTorchRunner(out / "model.pte", *NAMES)
    c, top = model.config.chunk_size, EXECUTORCH_LIMITS["max_length"]
    # Never the example's 2c + c/2: one token, one chunk and around it, ragged tails, the maximum.
    for length in (1, c - 1, c, c + 1, 3 * c + 5, top - 1, top):
        for batch in (1, EXECUTORCH_LIMITS["max_batch"]):
            ids = random_ids(model.config, batch, length, seed=11 * length + batch)
            mask = torch.ones_like(ids)
            mask[-1, length // 2 + 1 :] = 0  # the last row right-padded
            with torch.no_grad():
                want = model(ids, mask).numpy()
            got = runner.infer({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["logits"]
            valid = mask.bool().numpy()
            diff = abs(got - want)[valid].max()
            assert got.shape == want.shape and diff < 1e-4, (batch, length, diff)


def test_validate_and_bench_list_executorch(executorch_export, capsys):
    from bsbr_export.runtime.engines import available_engines

    out, _ = executorch_export
    assert "executorch" in available_engines(out)
    code, stdout, _ = run_cli(capsys, "validate", out)
    assert code == 0 and "model.pte" in stdout and "executorch" in stdout


def test_bench_times_executorch_at_one_thread(executorch_export):
    from bsbr_export.proof.bench import bench_engines

    # One thread resizes XNNPACK's pool, which must happen before the program's method loads.
    out, _ = executorch_export
    (result,) = bench_engines(out, ["executorch"], [9, EXECUTORCH_LIMITS["max_length"]], threads=1, budget_s=0.2)
    assert result.ok and [t.length for t in result.timings] == [9, EXECUTORCH_LIMITS["max_length"]], result


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 or (len(lines) == 2 and "validating" in lines[0]), err  # the progress line, then ours
    return lines[-1]


def test_length_past_the_maximum_is_refused_in_one_line(executorch_export, capsys):
    out, _ = executorch_export
    top = EXECUTORCH_LIMITS["max_length"]
    code, _, err = run_cli(capsys, "validate", out, "--lengths", top + 1)
    line = _one_line_error(err)
    assert code == 2 and f"length {top + 1}" in line and "--max-length" in line
    code, _, err = run_cli(capsys, "validate", out, "--batches", EXECUTORCH_LIMITS["max_batch"] + 1, "--lengths", 5)
    assert code == 2 and "--max-batch" in _one_line_error(err)


def test_corrupt_program_is_refused_in_one_line(executorch_export, tmp_path, capsys):
    out, _ = executorch_export
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    (copy / "model.pte").write_bytes((out / "model.pte").read_bytes()[:4096])  # a truncated copy
    rehash(copy, "model.pte")
    code, _, err = run_cli(capsys, "validate", copy)
    assert code == 2 and "not a loadable ExecuTorch program" in _one_line_error(err)


def test_export_without_the_package_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    code, _, err = run_cli(capsys, "export", "bsbr-tiny", "--format", "onnx,executorch", "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert 'pip install -c constraints.txt "bsbr-export[executorch]"' in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "onnx", "--max-length", "100"], "--max-length applies to --format executorch"),
        # bsbr-tiny traces with 2c + c/2 = 20 tokens (c = 8).
        (["--format", "executorch", "--max-length", "19"], "--max-length 19 is below the 20 tokens"),
    ],
)
def test_bad_limits_are_refused_in_one_line(args, message, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", "bsbr-tiny", *args, "--out", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 4)])
def test_layer_norm_decomposition_matches_torch(shape):
    from bsbr_export.export.executorch import _layer_norm

    generator = torch.Generator().manual_seed(len(shape))
    x = torch.randn(2, *shape, generator=generator)
    normalized = shape[1:]
    weight, bias = torch.randn(normalized, generator=generator), torch.randn(normalized, generator=generator)
    want = torch.nn.functional.layer_norm(x, normalized, weight, bias, eps=1e-5)
    assert torch.allclose(_layer_norm(x, normalized, weight, bias, 1e-5), want, atol=1e-5)
    assert torch.allclose(_layer_norm(x, normalized), torch.nn.functional.layer_norm(x, normalized), atol=1e-5)
