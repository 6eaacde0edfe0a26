"""samples/cpp: the C++ program, built against the torch wheel's libtorch, runs model.pt
like eager PyTorch at lengths the trace never saw, and rejects bad input with exit 2."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bsbr_export.model.checkpoint import load_model
from bsbr_export.runtime.eager import EagerRunner

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "cpp"
TOLERANCE = 1e-4  # max abs error of the C++ logits against eager


@pytest.fixture(scope="session")
def bsbr_run(tmp_path_factory, request) -> Path:
    """samples/cpp configured and built once per session; the build time is printed."""
    cmake = shutil.which("cmake")
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cmake or not compiler:
        pytest.skip("samples/cpp needs cmake and a C++ compiler (apt-get install cmake g++)")
    build = tmp_path_factory.mktemp("cpp-build")
    start = time.perf_counter()
    for step in (
        [cmake, "-S", SAMPLE, "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        [cmake, "--build", build, "--parallel"],
    ):
        done = subprocess.run([str(a) for a in step], capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(map(str, step))} failed:\n{done.stdout}\n{done.stderr}"
    seconds = time.perf_counter() - start
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nsamples/cpp: cmake configure + build took {seconds:.1f}s")
    return build / "bsbr_run"


@pytest.fixture(scope="session")
def exported(tiny_export):
    """The session's bsbr-tiny export and the eager model it was made from."""
    out, _ = tiny_export
    return out, load_model(out)


def run(binary: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=120)


def eager_logits(model, ids: np.ndarray) -> np.ndarray:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return EagerRunner(model).infer(feeds)["logits"]


def check_against_eager(binary: Path, artifact: Path, model, tmp_path: Path, ids: np.ndarray) -> None:
    """Run `artifact` through the program on `ids` (one line each) and compare with eager."""
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(" ".join(map(str, row)) for row in ids) + "\n")
    done = run(binary, artifact, tmp_path / "logits.npy", "--ids-file", ids_file)
    assert done.returncode == 0, done.stderr
    logits = np.load(tmp_path / "logits.npy")
    expected = eager_logits(model, ids)
    assert logits.dtype == np.float32 and logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= TOLERANCE


@pytest.mark.parametrize("length", [13, 37])  # the trace used 2c+c/2 = 20; c = 8
def test_matches_eager(bsbr_run, exported, tmp_path, length):
    out, model = exported
    ids = np.random.default_rng(length).integers(0, model.config.vocab_size, (2, length))
    check_against_eager(bsbr_run, out / "model.pt", model, tmp_path, ids)


def test_ids_from_argv_and_ragged_lines(bsbr_run, exported, tmp_path):
    """Ids on the command line; lines of different lengths are right-padded and masked,
    and each line's own positions match that line run alone."""
    out, model = exported
    rng = np.random.default_rng(0)
    short, long = rng.integers(0, model.config.vocab_size, 5), rng.integers(0, model.config.vocab_size, 19)
    done = run(bsbr_run, out / "model.pt", tmp_path / "one.npy", *short)
    assert done.returncode == 0, done.stderr
    assert np.abs(np.load(tmp_path / "one.npy") - eager_logits(model, short[None])).max() <= TOLERANCE

    (tmp_path / "ids.txt").write_text(f"{' '.join(map(str, long))}\n\n{' '.join(map(str, short))}\n")
    done = run(bsbr_run, out / "model.pt", tmp_path / "two.npy", "--ids-file", tmp_path / "ids.txt")
    assert done.returncode == 0, done.stderr
    logits = np.load(tmp_path / "two.npy")
    assert logits.shape[:2] == (2, 19)
    assert np.abs(logits[0] - eager_logits(model, long[None])[0]).max() <= TOLERANCE
    assert np.abs(logits[1, :5] - eager_logits(model, short[None])[0]).max() <= TOLERANCE


@pytest.mark.parametrize(
    "artifact, ids, message",
    [
        ("missing.pt", ["1", "2"], "cannot read model"),
        ("model.streaming.pt", ["1", "2"], "not model.streaming.pt"),
        ("model.onnx", ["1", "2"], "is not a TorchScript file"),
        ("model.pt", ["1", "x"], "token id 'x' is not a non-negative integer"),
        ("model.pt", ["1", "100000"], "check the ids are below the model's vocab size"),
        ("model.pt", ["--ids-file", "missing.txt"], "cannot read ids file"),
        ("model.pt", [], "usage: bsbr_run"),
    ],
)
def test_bad_input_exits_2(bsbr_run, exported, tmp_path, artifact, ids, message):
    out, _ = exported
    done = run(bsbr_run, out / artifact, tmp_path / "logits.npy", *ids)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("length", [13, 37])  # the compile's example was 2c+c/2 = 20; c = 8
def test_aoti_package_matches_eager(bsbr_run, aoti_export, tmp_path, length):
    """The same program runs model.pt2 through torch::inductor::AOTIModelPackageLoader."""
    out, _ = aoti_export
    model = load_model(out)
    ids = np.random.default_rng(length + 1).integers(0, model.config.vocab_size, (3, length))
    check_against_eager(bsbr_run, out / "model.pt2", model, tmp_path, ids)


def test_corrupt_aoti_package_exits_2(bsbr_run, tmp_path):
    (tmp_path / "model.pt2").write_bytes(b"not a zip archive")
    done = run(bsbr_run, tmp_path / "model.pt2", tmp_path / "logits.npy", "1", "2")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "is not an AOTInductor package" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]
