"""AOTInductor packages: right at shapes the export never saw, listed by validate and
bench, and refused in one line when corrupt or built for a CPU ISA this one lacks."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
import user_models
from conftest import EDGE_LENGTHS, random_ids, rehash, run_cli

from bsbr_export import load_model
from bsbr_export.runtime.aoti import AotiRunner, host_isas, package_device, package_isa


def test_export_writes_a_checked_package_with_its_isa(aoti_export):
    out, result = aoti_export
    assert result.passed and [a.name for a in result.artifacts] == ["model.pt2", "model.decode.pt2"]
    manifest = json.loads((out / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        assert artifact["settings"]["cpu_isa"] == package_isa(out / artifact["name"])
        assert artifact["settings"]["device"] == package_device(out / artifact["name"]) == "cpu"
        assert artifact["checks"]["passed"]
    assert package_isa(out / "model.pt2").upper() in host_isas()


def test_package_matches_eager_at_unseen_lengths_and_batches(aoti_export):
    out, _ = aoti_export
    model = load_model(out).eval()
    runner = AotiRunner(out / "model.pt2", ["input_ids", "attention_mask"], ["logits"])
    c = model.config.chunk_size
    for name, length in EDGE_LENGTHS.items():
        for batch in (1, 3):
            ids = random_ids(model.config, batch, length(c), seed=7 * length(c) + batch)
            feeds = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
            with torch.no_grad():
                want = model(ids).numpy()
            diff = abs(runner.infer(feeds)["logits"] - want).max()
            assert diff < 1e-4, (name, batch, diff)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_package_rolls_out_like_eager_from_an_empty_state(aoti_export, batch):
    """model.decode.pt2 stepped through splits that cross every chunk boundary off-step,
    from no past chunks (0 and 1 past chunks, and steps finishing 0, 1 and 2 chunks, are
    what the example never had), at batches other than the example's."""
    from bsbr_export.model.graphs import flatten_state
    from bsbr_export.model.probe import spec_for
    from bsbr_export.runtime.state import advance_state

    out, _ = aoti_export
    model = load_model(out).eval()
    spec = spec_for(model)
    c = model.config.chunk_size
    names = list(spec.state.inputs)
    runner = AotiRunner(out / "model.decode.pt2", ["input_ids", *names], ["logits", *spec.state.update_names()])
    pieces = [1, 1, c - 1, 3, 2 * c + 2, 1, c]
    ids = random_ids(model.config, batch, sum(pieces), seed=23 + batch)
    state = dict(zip(names, [t.numpy() for t in flatten_state(model.init_state(batch))]))
    logits, at = [], 0
    for size in pieces:
        result = runner.infer({"input_ids": ids[:, at : at + size].numpy(), **state})
        assert result["new.0.meta_keys"].shape[2] == (at % c + size) // c  # the chunks this step closed
        state = advance_state(state, result)
        logits.append(result["logits"])
        at += size
    with torch.no_grad():
        _, eager_state = model.stream(ids, model.init_state(batch))
        assert abs(np.concatenate(logits, axis=1) - model(ids).numpy()).max() <= 1e-4
    for name, want in zip(names, flatten_state(eager_state)):
        assert abs(state[name] - want.numpy()).max() <= 1e-4, name


def test_validate_and_bench_list_aoti(aoti_export, capsys):
    from bsbr_export.runtime.engines import available_engines

    out, _ = aoti_export
    assert "aoti" in available_engines(out)
    code, stdout, _ = run_cli(capsys, "validate", out)
    assert code == 0 and "model.pt2" in stdout


def _with_metadata(path, **entries):
    """Rewrite what a package says it was compiled for (as another machine's would)."""
    with zipfile.ZipFile(path) as archive:
        files = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            if name.endswith("wrapper_metadata.json"):
                data = json.dumps({**json.loads(data), **entries}).encode()
            archive.writestr(name, data)


def _validate_with_metadata(aoti_export, tmp_path, capsys, **entries) -> tuple[int, str]:
    """`validate` on a copy of the export whose model.pt2 says `entries` (rehashed)."""
    import shutil

    out, _ = aoti_export
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    _with_metadata(copy / "model.pt2", **entries)
    rehash(copy, "model.pt2")
    code, _, err = run_cli(capsys, "validate", copy)
    return code, err


def test_package_for_another_isa_is_refused_in_one_line(aoti_export, tmp_path, capsys):
    code, err = _validate_with_metadata(aoti_export, tmp_path, capsys, AOTI_CPU_ISA="AVX512 AMX_FP16 SVE256")
    assert code == 2 and "AMX_FP16 SVE256, which this CPU lacks" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: nothing to refuse")
def test_package_for_a_gpu_is_refused_in_one_line_without_one(aoti_export, tmp_path, capsys):
    code, err = _validate_with_metadata(aoti_export, tmp_path, capsys, AOTI_DEVICE_KEY="cuda")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is compiled for a CUDA GPU, and torch" in err and "sees no CUDA GPU here" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: nothing to refuse")
def test_export_for_a_gpu_without_one_is_one_line_and_writes_nothing(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "export", "bsbr-tiny", "--format", "aoti", "--device", "cuda", "--out", tmp_path / "out"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--format aoti --device cuda: torch" in err and not (tmp_path / "out").exists()


def test_device_is_refused_for_formats_that_do_not_take_it(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "export", "bsbr-tiny", "--format", "onnx", "--device", "cpu", "--out", tmp_path / "out"
    )
    assert code == 2 and "--device applies to --format aoti only" in err and not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (CI has none): run on one")
def test_a_gpu_package_matches_eager_and_is_recorded(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "export", "bsbr-tiny", "--format", "aoti", "--device", "cuda", "--out", tmp_path / "out"
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["artifacts"][0]["settings"]["device"] == "cuda" and manifest["artifacts"][0]["checks"]["passed"]


def test_corrupt_package_is_refused_in_one_line(aoti_export, tmp_path, capsys):
    import shutil

    out, _ = aoti_export
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    (copy / "model.pt2").write_bytes(b"not a zip archive")
    rehash(copy, "model.pt2")
    code, _, err = run_cli(capsys, "validate", copy)
    assert code == 2 and "not an AOTInductor package" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "make", [lambda: load_model("bsbr-tiny"), user_models.rotary_decoder], ids=["native", "grouped-query"]
)
@pytest.mark.parametrize("kind", ["decode", "streaming"])
def test_streaming_step_exports_without_guards(kind, make):
    """The step's ExportedProgram keeps every named axis a plain, unbounded Dim and has no
    runtime assert: torch.export needed nothing of new_tokens, past_chunks or past_tokens,
    also where 2 key/value heads serve 4 query heads (a user's module)."""
    from torch.utils._sympy.numbers import int_oo
    from torch.utils._sympy.value_ranges import ValueRanges

    from bsbr_export.export.aoti import dynamic_program as export_program
    from bsbr_export.export.examples import graph_axes
    from bsbr_export.model.probe import spec_for

    model = make().eval()
    program = export_program(model, kind=kind)
    labels = {label for axes in graph_axes(spec_for(model), kind).values() for label in axes.values()}
    assert labels == {"batch", "new_tokens", "past_chunks", "past_tokens"}
    assert len(program.range_constraints) == len(labels)  # one symbol per named axis
    assert all(r == ValueRanges(0, int_oo) for r in program.range_constraints.values())
    assert not [n for n in program.graph.nodes if n.target is torch.ops.aten._assert_scalar.default]
