"""`benchmark`'s reduced-precision step: what bench makes, finds and skips, and why."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from bsbr_export import workflows
from bsbr_export.manifest import read_manifest
from bsbr_export.precisions import PRECISION as BY_NAME
from bsbr_export.runtime.onnx import available_providers
from bsbr_export.workflows import NOT_A_BYTE_LM, plan_reduced_precision, precision_trial


def test_bench_makes_int8_judged_at_its_lengths_and_weighs_it(stdlib_copy, capsys, monkeypatch):
    """Given an export without int8, bench makes it (judged in windows of the lengths it
    times), times it beside fp32 and lists what it tried in both reports."""
    out, text = stdlib_copy
    calls = []
    real = workflows.optimize_export
    monkeypatch.setattr(workflows, "optimize_export", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    code, stdout, err = run_cli(
        capsys,
        "bench",
        out,
        "--engines",
        "eager,ort-cpu-all,ort-cpu-int8",
        "--lengths",
        "64,130",
        "--decode",
        "",
        "--validation-lengths",
        "1,70",
        "--budget",
        "0.2",
        "--eval-text",
        text,
        "--accuracy-budget",
        "0.5",
    )
    assert code == 0, err
    assert [(c["int8"], c["static_int8"], c["bf16"], c["fp16"], c["eval_windows"]) for c in calls] == [
        (True, False, False, False, (64, 130))
    ]
    assert (out / "model.int8.onnx").is_file() and "model.int8.onnx" in [
        a["name"] for a in read_manifest(out)["artifacts"]
    ]
    report = json.loads((out / "report.json").read_text())
    trials = {p["precision"]: p for p in report["precisions"]}
    assert set(trials) == {"int8"}  # no other reduced-precision engine was asked for
    assert trials["int8"]["outcome"] == "made" and trials["int8"]["engines"] == ["ort-cpu-int8"]
    int8 = next(r for r in report["table"] if r["engine"] == "ort-cpu-int8")
    assert int8["precision"] == "int8" and int8["bits_per_byte_change"] is not None
    assert "Reduced precision considered" in (out / "report.md").read_text()

    # A second run finds it there and makes nothing.
    calls.clear()
    code, _, err = run_cli(
        capsys,
        "bench",
        out,
        "--engines",
        "eager,ort-cpu-int8",
        "--lengths",
        "64",
        "--decode",
        "",
        "--validation-lengths",
        "1",
        "--budget",
        "0.1",
        "--eval-text",
        text,
        "--accuracy-budget",
        "0.5",
    )
    assert code == 0, err
    assert calls == []
    assert json.loads((out / "report.json").read_text())["precisions"][0]["outcome"] == "present"


def test_without_reduced_precision_nothing_is_made_and_int8_cannot_run(stdlib_copy, capsys):
    out, text = stdlib_copy
    code, _, err = run_cli(
        capsys,
        "bench",
        out,
        "--no-reduced-precision",
        "--engines",
        "eager,ort-cpu-int8",
        "--lengths",
        "64",
        "--decode",
        "",
        "--eval-text",
        text,
    )
    assert code == 2 and "engine ort-cpu-int8 cannot run here: no model.int8.onnx" in err
    assert not (out / "model.int8.onnx").exists() and not (out / "model.optimized.onnx").exists()


@pytest.mark.parametrize(
    "engine, message",
    [
        ("warp-drive", "unknown or unavailable engine(s) warp-drive"),
        ("ort-cpu-int8-static", "engine ort-cpu-int8-static cannot run here: no model.int8-static.onnx"),
    ],
)
def test_an_engine_that_will_not_run_is_refused_before_any_work(stdlib_copy, capsys, engine, message):
    """Asked for beside one bench would make (int8): refused at once, nothing made."""
    out, text = stdlib_copy
    code, _, err = run_cli(capsys, "bench", out, "--engines", f"eager,ort-cpu-int8,{engine}", "--lengths", "64")
    assert code == 2 and message in err
    assert not (out / "model.int8.onnx").exists() and not (out / "model.optimized.onnx").exists()


def test_a_model_not_judged_by_text_gets_no_reduced_precision(export_copy):
    """Random-weight token models have no held-out loss to judge reduced precision by:
    every precision is skipped with that reason (so bench makes nothing)."""
    trials = plan_reduced_precision(export_copy, None)  # every engine on the CPU: no fp16, which is for CUDA
    assert [t.precision for t in trials] == ["int8", "int8-static", "bf16"]
    assert {(t.outcome, t.reason) for t in trials} == {("skipped", NOT_A_BYTE_LM)}
    assert [t.precision for t in plan_reduced_precision(export_copy, None, "cuda")] == ["fp16"]


def test_precisions_this_machine_cannot_run_are_skipped_with_the_reason(export_copy, monkeypatch):
    monkeypatch.setattr("bsbr_export.runtime.engines.bf16_missing", lambda: "no bf16 units on this test's CPU")
    monkeypatch.setattr("bsbr_export.runtime.engines.openvino_missing", lambda: None)
    bf16 = precision_trial(BY_NAME["bf16"], export_copy)
    assert bf16.outcome == "skipped"
    assert bf16.reason.split("; ") == [f"{e}: no bf16 units on this test's CPU" for e in BY_NAME["bf16"].engines]

    fp16 = precision_trial(BY_NAME["fp16"], export_copy)
    if "CUDAExecutionProvider" in available_providers():
        assert fp16.outcome == "made"
    else:
        assert fp16.outcome == "skipped" and "CUDAExecutionProvider is not available here" in fp16.reason

    monkeypatch.setattr("bsbr_export.workflows.cpu_features", lambda: ["avx2"])
    int8 = precision_trial(BY_NAME["int8"], export_copy)
    assert int8.outcome == "made" and int8.reason == "no AVX512_VNNI or AMX_INT8 here"
    monkeypatch.setattr("bsbr_export.workflows.cpu_features", lambda: ["avx2", "avx512_vnni"])
    assert precision_trial(BY_NAME["int8"], export_copy).reason == "matrix units here: AVX512_VNNI"


def test_an_artifact_already_there_is_kept_and_one_without_its_source_is_skipped(export_copy):
    (export_copy / "bf16.json").write_text("{}\n")
    assert precision_trial(BY_NAME["bf16"], export_copy).outcome == "present"
    (export_copy / "model.onnx").unlink()
    int8 = precision_trial(BY_NAME["int8"], export_copy)
    assert int8.outcome == "skipped" and int8.reason.startswith("no model.onnx to make it from")
