"""torchscript-mobile: model.ptl loads in PyTorch Mobile's lite interpreter and matches
eager at lengths the trace never saw, whole and streamed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.jit.mobile import _load_for_lite_interpreter

from bsbr_export.cli import main
from bsbr_export.compare.cases import stream_pieces
from bsbr_export.model.checkpoint import load_model
from bsbr_export.runtime.eager import EagerRunner
from bsbr_export.runtime.state import empty_state_tensor

TOLERANCE = 1e-4  # max abs error against eager


@pytest.fixture(scope="session")
def exported(tiny_export):
    out, _ = tiny_export
    return out, load_model(out)


def ids_of(model, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(length).integers(0, model.config.vocab_size, (batch, length))


@pytest.mark.parametrize("batch, length", [(2, 13), (3, 37), (1, 1)])  # traced at 2 x 20
def test_lite_interpreter_matches_eager(exported, batch, length):
    out, model = exported
    module = _load_for_lite_interpreter(str(out / "model.ptl"))
    ids = ids_of(model, batch, length)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    with torch.inference_mode():
        logits = module(torch.from_numpy(ids), torch.from_numpy(feeds["attention_mask"])).numpy()
    assert np.abs(logits - EagerRunner(model).infer(feeds)["logits"]).max() <= TOLERANCE


def test_streamed_lite_interpreter_matches_full_eager(exported):
    """model.streaming.ptl, fed uneven pieces with the state carried, equals one full
    eager forward."""
    out, model = exported
    module = _load_for_lite_interpreter(str(out / "model.streaming.ptl"))
    state_shapes = json.loads((out / "manifest.json").read_text())["state"]["inputs"]
    ids = ids_of(model, 2, 29)
    state = [torch.from_numpy(empty_state_tensor(shape, 2)) for shape in state_shapes.values()]
    pieces, start = [], 0
    with torch.inference_mode():
        for size in stream_pieces(ids.shape[1], model.config.chunk_size):
            logits, *state = module(torch.from_numpy(ids[:, start : start + size]), *state)
            pieces.append(logits.numpy())
            start += size
    expected = EagerRunner(model).infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    assert np.abs(np.concatenate(pieces, axis=1) - expected).max() <= TOLERANCE


def test_manifest_records_mobile_optimizer(exported):
    out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model.ptl", "model.streaming.ptl"} <= {a["name"] for a in manifest["artifacts"]}
    note = manifest["settings"]["optimize_for_mobile"]
    assert note == (
        "not applied"
        if torch._C._is_xnnpack_enabled()
        else "skipped: this torch build has no XNNPACK, which the pass needs"
    )


def test_cli_writes_ptl(capsys, tmp_path):
    code = main(["export", "bsbr-tiny", "--out", str(tmp_path / "e"), "--format", "torchscript-mobile"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "config.json",
        "manifest.json",
        "model.ptl",
        "model.safetensors",
    ]
