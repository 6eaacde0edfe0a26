"""samples/node: run.js (onnxruntime-node) gives eager PyTorch's logits for model.onnx, and
rejects a missing or changed artifact with one line, exit 2.

Needs node and `cd samples/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci` (CI runs it).
Without them the tests skip, except under CI (`CI` set), where a skip would hide a
broken setup, so they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bsbr_export.model.checkpoint import load_model

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "node"
TOLERANCE = 1e-4  # max abs error of node's logits against eager
INSTALL = "cd samples/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci"
MAX_IR_VERSION = 13  # the newest ONNX IR version onnxruntime-node 1.30 loads


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, once samples/node's packages are installed."""
    node = shutil.which("node")
    if node is None:
        missing = "node is not installed (apt-get install nodejs npm)"
    elif not (SAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        missing = f"samples/node has no node_modules: run `{INSTALL}`"
    else:
        return node
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the node sample: {missing}")
    pytest.skip(missing)


@pytest.fixture(scope="session")
def exported(tiny_export):
    """The session's bsbr-tiny export and the eager model it was made from."""
    out, _ = tiny_export
    return out, load_model(out)


def run(node: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(SAMPLE / "run.js"), *map(str, args)], capture_output=True, text=True, timeout=120)


def eager(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def test_ir_version_loads_in_onnxruntime_node(exported):
    out, _ = exported
    assert onnx.load(str(out / "model.onnx"), load_external_data=False).ir_version <= MAX_IR_VERSION


@pytest.mark.parametrize("length", [11, 29])  # the trace used 2c+c/2 = 20; c = 8
def test_matches_eager(node, exported, length):
    out, model = exported
    ids = [(13 * i + 2) % model.config.vocab_size for i in range(length)]
    done = run(node, out, *ids)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dims"] == [1, length, model.config.vocab_size]
    err = np.abs(np.array(result["logits"], dtype=np.float32)[0] - eager(model, ids)).max()
    assert err <= TOLERANCE, f"max abs err {err:.2e}"


def test_padded_batch_to_file(node, exported, tmp_path):
    out, model = exported
    sequences = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8]]
    (tmp_path / "ids.txt").write_text("\n".join(" ".join(map(str, s)) for s in sequences) + "\n")
    done = run(node, out, "--ids-file", tmp_path / "ids.txt", "--out", tmp_path / "logits.json")
    assert done.returncode == 0, done.stderr
    logits = np.array(json.loads((tmp_path / "logits.json").read_text())["logits"], dtype=np.float32)
    for row, ids in enumerate(sequences):
        assert np.abs(logits[row, : len(ids)] - eager(model, ids)).max() <= TOLERANCE


@pytest.mark.parametrize(
    "change, message",
    [
        ("delete", "is listed in manifest.json but missing"),
        ("append", "does not match its sha256"),
    ],
)
def test_bad_artifact_is_one_line_and_exit_2(node, exported, tmp_path, change, message):
    out, _ = exported
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    if change == "delete":
        (copy / "model.onnx").unlink()
    else:
        with open(copy / "model.onnx", "ab") as f:
            f.write(b"\0")
    done = run(node, copy, 1, 2, 3)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


def test_missing_export_dir_is_one_line_and_exit_2(node, tmp_path):
    done = run(node, tmp_path / "nowhere", 1, 2, 3)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "is not a directory" in done.stderr, done.stderr
