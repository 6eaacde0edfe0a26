"""samples/python_onnxruntime: run.py (onnxruntime + numpy only) gives eager PyTorch's
logits, never imports torch or bsbr_export, and rejects bad input with one line, exit 2."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bsbr_export.model.checkpoint import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "samples" / "python_onnxruntime" / "run.py"
TOLERANCE = 1e-4  # max abs error of the sample's logits against eager

# Calls run.py's main() in this interpreter, then reports which heavy modules got imported.
WRAPPER = """
import json, runpy, sys
main = runpy.run_path(sys.argv[1])["main"]
status = main(sys.argv[2:])
print(json.dumps({"status": status, "imported": sorted(m for m in ("torch", "bsbr_export") if m in sys.modules)}))
"""


@pytest.fixture(scope="session")
def exported(tiny_export):
    """The session's bsbr-tiny export and the eager model it was made from."""
    out, _ = tiny_export
    return out, load_model(out)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def eager(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def test_padded_batch_matches_eager(exported, tmp_path):
    out, model = exported
    c = model.config.chunk_size
    # Lengths the export never traced (2c + c/2): one token, a ragged tail, several chunks.
    sequences = [[(7 * i + 3) % model.config.vocab_size for i in range(n)] for n in (1, c + 3, 3 * c + 5)]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("".join(" ".join(map(str, s)) + "\n" for s in sequences))
    done = run(out, "--ids-file", ids_file, "--out", tmp_path / "logits.npy")
    assert done.returncode == 0, done.stderr
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (3, 3 * c + 5, model.config.vocab_size) and logits.dtype == np.float32
    for row, ids in enumerate(sequences):
        expected = eager(model, ids)
        err = np.abs(logits[row, : len(ids)] - expected).max()
        assert err <= TOLERANCE, f"sequence of {len(ids)} tokens: max abs err {err:.2e}"
        assert f"sequence {row}: {len(ids)} tokens, next token {int(expected[-1].argmax())} " in done.stdout


def test_ids_from_the_command_line(exported, tmp_path):
    out, model = exported
    ids = [5, 17, 4, 60, 2, 2, 9, 31, 40, 11, 0]
    done = run(out, *ids, "--out", tmp_path / "logits.npy")
    assert done.returncode == 0, done.stderr
    assert np.abs(np.load(tmp_path / "logits.npy")[0] - eager(model, ids)).max() <= TOLERANCE


def test_imports_neither_torch_nor_bsbr_export(exported, tmp_path):
    out, _ = exported
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(SCRIPT), str(out), "1", "2", "3", "--out", str(tmp_path / "l.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report == {"status": 0, "imported": []}


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    return copy


def _missing_dir(out, tmp_path):
    return tmp_path / "nowhere", "is not a directory"


def _missing_model(out, tmp_path):
    copy = _copy(out, tmp_path)
    (copy / "model.onnx").unlink()
    return copy, "is listed in manifest.json but missing"


def _changed_model(out, tmp_path):
    copy = _copy(out, tmp_path)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    return copy, "does not match its sha256"


def _not_onnx(out, tmp_path):
    """Garbage whose sha256 the manifest agrees with: only loading it can tell."""
    copy = _copy(out, tmp_path)
    (copy / "model.onnx").write_bytes(b"not an onnx model")
    manifest = json.loads((copy / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        if artifact["name"] == "model.onnx":
            artifact["files"]["model.onnx"]["sha256"] = hashlib.sha256(b"not an onnx model").hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy, "is not a loadable ONNX model"


def _no_manifest(out, tmp_path):
    copy = _copy(out, tmp_path)
    (copy / "manifest.json").unlink()
    return copy, "has no manifest.json"


@pytest.mark.parametrize("make", [_missing_dir, _missing_model, _changed_model, _not_onnx, _no_manifest])
def test_bad_artifact_is_one_line_and_exit_2(exported, tmp_path, make):
    out, _ = exported
    export_dir, message = make(out, tmp_path)
    done = run(export_dir, 1, 2, 3, "--out", tmp_path / "logits.npy")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "logits.npy").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["1", "x"], "is not a non-negative integer"),
        (["1", "97"], "out of range"),  # bsbr-tiny's vocabulary is [0, 97)
        ([], "no token ids"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_ids_are_one_line_and_exit_2(exported, args, message):
    out, _ = exported
    done = run(out, *args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
