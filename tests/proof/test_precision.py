"""bf16 routes: autocast and OpenVINO runners against eager, the groups they can keep in
fp32, and the greedy choice by measured sensitivity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_ids, run_cli

from bsbr_export import load_model
from bsbr_export.model.probe import spec_for
from bsbr_export.proof.precision import choose_fp32, module_groups
from bsbr_export.runtime.eager import AutocastRunner, EagerRunner, autocast_bf16
from bsbr_export.runtime.openvino import OpenVinoRunner, openvino_missing


def feeds_of(ids):
    return {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}


def test_groups_are_each_blocks_children_and_the_rest():
    model = load_model("bsbr-tiny")
    groups = module_groups(model, "blocks")
    assert "blocks.0.attn" in groups and "blocks.1.ff" in groups and "embedding" in groups
    assert "blocks" not in groups


def test_autocast_keeps_chosen_modules_fp32_and_restores_them():
    model = load_model("bsbr-tiny")
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.dtype))
        for n in ("blocks.0.attn", "blocks.1.attn")
    ]
    ids = random_ids(model.config, 1, 13)
    with torch.no_grad(), autocast_bf16(model, ("blocks.0.attn",)):
        model(ids)
    assert seen == {"blocks.0.attn": torch.float32, "blocks.1.attn": torch.bfloat16}
    for h in hooks:
        h.remove()
    assert "forward" not in model.get_submodule("blocks.0.attn").__dict__


def test_autocast_runner_is_close_to_eager_at_unseen_lengths():
    model = load_model("bsbr-tiny")
    spec = spec_for(model)
    for length in (1, 7, 29):
        ids = random_ids(model.config, 2, length, seed=length)
        want = EagerRunner(model, spec).infer(feeds_of(ids))["logits"]
        got = AutocastRunner(model, spec).infer(feeds_of(ids))["logits"]
        assert got.dtype == np.float32
        assert np.abs(got - want).max() < 5e-2 * max(1.0, np.abs(want).max())
        assert np.abs(got - want).max() > 0  # it really ran in bf16


def test_compiled_autocast_runner_keeps_its_fp32_groups_at_unseen_lengths():
    """compile-bf16: torch.compile over the same autocast regions, fp32 groups patched once."""
    model = load_model("bsbr-tiny")
    spec = spec_for(model)
    keep = ("blocks.0.attn",)
    seen = {}
    model.get_submodule("blocks.0.attn").register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o.dtype))
    compiled = AutocastRunner(model, spec, keep, compile=True)
    for length in (1, 7, 29):  # one dynamic compile serves every length
        ids = random_ids(model.config, 2, length, seed=length)
        want = EagerRunner(model, spec).infer(feeds_of(ids))["logits"]
        bf16 = AutocastRunner(model, spec, keep).infer(feeds_of(ids))["logits"]
        got = compiled.infer(feeds_of(ids))["logits"]
        assert got.dtype == np.float32
        assert np.abs(got - want).max() < 5e-2 * max(1.0, np.abs(want).max())
        assert np.abs(got - bf16).max() < 5e-2 * max(1.0, np.abs(want).max())
        assert np.abs(got - want).max() > 0  # it really ran in bf16
    assert "forward" in model.get_submodule("blocks.0.attn").__dict__  # still patched: the runner owns the model


@pytest.mark.skipif(openvino_missing() is not None, reason=str(openvino_missing()))
def test_openvino_fp32_matches_eager(tiny_onnx_export):
    model = load_model(tiny_onnx_export)
    runner = OpenVinoRunner(tiny_onnx_export / "model.onnx", precision="f32")
    for length, batch in ((1, 1), (7, 3), (29, 2)):
        ids = random_ids(model.config, batch, length, seed=length)
        want = EagerRunner(model).infer(feeds_of(ids))["logits"]
        assert np.abs(runner.infer(feeds_of(ids))["logits"] - want).max() < 1e-4


def test_choose_fp32_returns_the_most_helpful_groups_until_every_window_is_within_budget():
    # Bits each group adds in bf16, by window: "a" hurts long windows only (the bf16
    # trap), "b" short ones; "c" barely matters.
    harm = {"a": {64: 0.0, 4096: 0.30}, "b": {64: 0.05, 4096: 0.0}, "c": {64: 0.01, 4096: 0.01}}
    fp32 = {64: 2.0, 4096: 1.5}
    calls = []

    def score(keep):
        calls.append(keep)
        return {n: fp32[n] + sum(h[n] for g, h in harm.items() if g not in keep) for n in fp32}

    plan = choose_fp32(score, list(harm), fp32_bpb=fp32, budget=0.01, engine="x")
    # Ranked by the relative gain summed over windows: "a" (long), then "b" (short); "c" is not needed.
    assert plan.keep_fp32 == ("a", "b") and plan.passed and plan.windows == (64, 4096)
    assert plan.all_bf16_bpb == pytest.approx({64: 2.06, 4096: 1.81})
    assert plan.bpb == pytest.approx({64: 2.01, 4096: 1.51}) and plan.change == pytest.approx(0.01 / 1.5)
    # Nothing to keep when bf16 is within budget already: no sensitivity runs.
    plan = choose_fp32(lambda keep: {64: 2.001, 4096: 1.5001}, list(harm), fp32, 0.01, "x")
    assert plan.keep_fp32 == () and plan.sensitivity == {}
    # A group that only helps one window while another gets worse is judged by the worst.
    assert not choose_fp32(lambda keep: {64: 2.5, 4096: 1.5}, ["a"], fp32, 0.01, "x").passed


def test_engine_that_cannot_run_here_is_one_line_exit_2(tiny_onnx_export, capsys, monkeypatch):
    import bsbr_export.runtime.engines as engines

    monkeypatch.setattr(engines, "openvino_missing", lambda: 'OpenVINO is not installed: pip install ".[openvino]"')
    code, _, err = run_cli(capsys, "bench", tiny_onnx_export, "--engines", "eager,openvino-fp32", "--lengths", "16")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "engine openvino-fp32 cannot run here: OpenVINO is not installed" in err
