"""The engine table: every engine names a file, a runner and a precision, and what it
runs from an export directory agrees with eager on inputs it never saw."""

import numpy as np
import pytest
import torch
from conftest import run_cli

from bsbr_export.compare.parity import compare
from bsbr_export.formats import FORMATS, artifact_name
from bsbr_export.manifest import manifest_spec
from bsbr_export.proof.bench import spec_feeds
from bsbr_export.runtime.engines import BASELINES, DEVICES, ENGINES, available_engines, open_engine, why_not
from bsbr_export.runtime.onnx import available_providers


def test_every_engine_is_one_row():
    for name, engine in ENGINES.items():
        assert engine.name == name
        assert engine.precision in ("fp32", "bf16", "int8", "fp16") and engine.device in DEVICES
        assert (engine.device == "cuda") == (
            engine.provider == "CUDAExecutionProvider" or engine.options.get("device") == "cuda"
        )
        assert (engine.artifact is None) == (engine.runs in ("eager", "compile", "autocast"))
    # One engine per format torch runs, named like the format, running the format's full graph.
    for fmt in FORMATS.values():
        if fmt.engine:
            assert ENGINES[fmt.name].artifact == artifact_name(fmt, "full")
    assert [n for n in ENGINES if n.startswith("ort-cpu-")][:4] == [
        f"ort-cpu-{level}" for level in ("disabled", "basic", "extended", "all")
    ]


def test_available_engines_follow_the_files(tiny_onnx_export):
    available = available_engines(tiny_onnx_export)
    assert {"eager", "compile", "ort-cpu-disabled", "ort-cpu-all"} <= set(available)
    assert "torchscript" not in available and "ort-cpu-int8" not in available
    assert "model.int8.onnx" in why_not(ENGINES["ort-cpu-int8"], tiny_onnx_export)
    if "CUDAExecutionProvider" not in available_providers():
        assert "ort-cuda-all" not in available
        assert "CUDAExecutionProvider" in why_not(ENGINES["ort-cuda-all"], tiny_onnx_export)


@pytest.mark.parametrize("engine", ["ort-cpu-disabled", "ort-cpu-all"])
def test_an_opened_engine_matches_eager(tiny_onnx_export, engine):
    spec = manifest_spec(tiny_onnx_export)
    feeds = spec_feeds(spec, 3, 2 * spec.chunk_size + 5, seed=11)  # not a multiple of the chunk size
    eager = open_engine("eager", tiny_onnx_export).infer(feeds)
    runner = open_engine(engine, tiny_onnx_export, threads=1)
    got = runner.infer(feeds)
    assert list(got) == spec.output_names
    diff = compare("logits", eager["logits"], got["logits"], 1e-4, top1=True)
    assert diff.passed and diff.top1 == 1.0, diff
    assert not np.array_equal(eager["logits"][0], eager["logits"][1])  # rows differ: the feeds are real


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: nothing to refuse")
ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (CI has none): run on one")
TORCH_ON_CUDA = [e.name for e in ENGINES.values() if e.device == "cuda" and e.runs != "onnx"]


def test_each_device_has_its_torch_engines_and_baseline():
    assert TORCH_ON_CUDA == ["eager-cuda", "eager-cuda-bf16", "compile-cuda", "torchscript-cuda"]
    for device, baseline in BASELINES.items():
        assert ENGINES[baseline].device == device and ENGINES[baseline].runs == "eager"


@NO_CUDA
def test_without_a_gpu_the_cuda_engines_say_why(tiny_export):
    out, _ = tiny_export
    assert available_engines(out, "cuda") == []
    assert not any(ENGINES[e].device == "cuda" for e in available_engines(out))
    for name in TORCH_ON_CUDA:
        assert "sees no CUDA GPU here" in why_not(ENGINES[name], out)


@NO_CUDA
def test_bench_on_cuda_without_a_gpu_is_one_line_and_exit_2(export_copy, capsys):
    code, _, err = run_cli(capsys, "bench", export_copy, "--device", "cuda", "--lengths", "8")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--device cuda: torch" in err and "sees no CUDA GPU here" in err
    assert not (export_copy / "report.json").exists()


def test_a_gpu_engine_asked_for_on_the_cpu_is_refused_before_any_work(export_copy, capsys):
    code, _, err = run_cli(capsys, "bench", export_copy, "--engines", "eager,eager-cuda", "--lengths", "8")
    assert code == 2 and "engine eager-cuda cannot run here: it computes on cuda, not on --device cpu" in err
    assert not (export_copy / "report.json").exists() and not (export_copy / "validation.json").exists()


@ON_CUDA
@pytest.mark.parametrize(
    "engine, tolerance",
    [("eager-cuda", 1e-4), ("eager-cuda-bf16", 5e-2), ("compile-cuda", 1e-4), ("torchscript-cuda", 1e-4)],
)
def test_a_gpu_engine_matches_eager_on_the_cpu(tiny_export, engine, tolerance):
    out, _ = tiny_export
    spec = manifest_spec(out)
    feeds = spec_feeds(spec, 3, 2 * spec.chunk_size + 5, seed=11)
    torch.backends.cuda.matmul.allow_tf32 = False  # like with like: fp32 on both sides
    want = open_engine("eager", out).infer(feeds)["logits"]
    got = open_engine(engine, out).infer(feeds)["logits"]
    diff = compare("logits", want, got, tolerance, top1=True)
    assert diff.passed, diff
