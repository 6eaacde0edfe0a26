"""`bench`: a tiny run writes every report file, complete and parseable (no timing asserts)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from bsbr_export.proof.bench import peak_rss_mib


def test_tiny_bench_writes_complete_reports(capsys, export_copy):
    code, out, err = run_cli(
        capsys,
        "bench",
        export_copy,
        "--lengths",
        "8,19",
        "--engines",
        "eager,torchscript,ort-cpu-all,ort-cpu-disabled",
        "--decode",
        "8,20",
        "--validation-lengths",
        "3",
        "--budget",
        "0.05",
    )
    assert code == 0, err
    assert "ort-cpu-all" in out
    for name in ("report.json", "report.md", "latency.png", "memory.png", "decode.png"):
        assert (export_copy / name).stat().st_size > 0, name
    report = json.loads((export_copy / "report.json").read_text())
    engines = {row["engine"]: row for row in report["table"]}
    assert set(engines) == {"eager", "torchscript", "ort-cpu-all", "ort-cpu-disabled"}
    for row in engines.values():
        assert row["status"] == "✅"
        assert set(row["latency_ms"]) == {"8", "19"}  # JSON keys
        assert row["peak_rss_mib"]["19"] > 0
        assert row["max_abs"] <= 1e-4
    assert engines["ort-cpu-all"]["bytes"] > 0 and engines["eager"]["bytes"] is None
    assert [d["context"] for d in report["bench"]["decode"]] == [8, 20]
    assert report["validation"]["passed"] is True
    assert "versions" in report["bench"]["machine"]
    md = (export_copy / "report.md").read_text()
    assert "| ort-cpu-all | ✅ |" in md and "## Streaming decode" in md and "## Validation" in md


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lengths", "0"], "--lengths must be integers >= 1"),
        (["--engines", "tensorrt"], "unknown or unavailable engine(s) tensorrt"),
    ],
)
def test_bad_bench_options(capsys, export_copy, args, message):
    code, _, err = run_cli(capsys, "bench", export_copy, "--validation-lengths", "3", "--decode", "", *args)
    assert code == 2 and message in err and err.count("\n") == 1


def test_peak_rss_is_positive():
    assert peak_rss_mib() > 10


@pytest.mark.parametrize("existing", ["user-file", "export"])
def test_bench_refuses_non_empty_out_before_any_work(capsys, tmp_path, export_copy, existing):
    """`bench MODEL --out DIR` must never delete what it did not create (a user's keep.txt)."""
    out = export_copy if existing == "export" else tmp_path / "mine"
    if existing == "user-file":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli(capsys, "bench", "bsbr-tiny", "--out", out, "--lengths", "8", "--decode", "")
    assert code == 2 and err.count("\n") == 1
    assert ("already holds an export" if existing == "export" else "not empty") in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == before
    if existing == "user-file":
        assert (out / "keep.txt").read_text() == "mine"


def test_quick_bench_exports_and_times_its_subset_and_explicit_flags_win(capsys, tmp_path):
    out = tmp_path / "quick"
    code, stdout, err = run_cli(capsys, "bench", "bsbr-tiny", "--quick", "--out", out, "--lengths", "8,19")
    assert code == 0, err
    assert sorted(p.name for p in out.glob("model.*")) == ["model.onnx", "model.pt", "model.safetensors"]
    report = json.loads((out / "report.json").read_text())
    assert [row["engine"] for row in report["table"]] == ["eager", "torchscript", "ort-cpu-disabled", "ort-cpu-all"]
    assert report["bench"]["lengths"] == [8, 19] and report["bench"]["decode"] == []
    for row in report["table"]:
        for timing in row["latency_ms"].values():
            assert timing["iters"] >= 10 and timing["p10"] <= timing["p50"] <= timing["p90"]
            assert timing["spread"] >= 0 and timing["noisy"] == (timing["spread"] > 0.25)
    assert "drop --quick" in stdout
    # Plain progress lines, one per long step, since stderr is not a terminal here.
    assert "benchmarking ort-cpu-all" in err and "checking model.pt against eager" in err


def test_speedups_have_two_significant_digits():
    from bsbr_export.proof.bench import round_sig
    from bsbr_export.render import speedup_text

    assert [speedup_text(x) for x in (0.0512, 0.7, 1.0, 1.449, 9.96, 12.4, 153.0)] == [
        "0.051x",
        "0.70x",
        "1.0x",
        "1.4x",
        "10x",
        "12x",
        "150x",
    ]
    assert round_sig(0.04567) == 0.046 and round_sig(1234.0) == 1200.0


def test_validate_scores_bits_per_byte_against_eager(stdlib_export, capsys):
    out, text = stdlib_export
    code, stdout, _ = run_cli(capsys, "validate", out, "--lengths", "1,70", "--batches", "1", "--eval-text", text)
    assert code == 0 and "bits/byte" in stdout
    score = json.loads((out / "validation.json").read_text())["checks"][0]["text"]
    assert 1.0 < score["bits_per_byte"] < 6.0 and abs(score["change"]) < 1e-4 and score["passed"]


def test_int8_over_the_accuracy_budget_fails_and_is_never_recommended(stdlib_copy, capsys, tmp_path):
    """An all-int8 graph (accepted by a loose budget when written) benched under a tight
    one: reported as failing, exit 1, and the recommendation is an fp32 engine. Scored on
    the default 32 KiB slice, where int8 costs bits (on a few thousand it may not)."""
    from bsbr_export.proof.evaltext import DEFAULT_EVAL_BYTES, heldout_text, read_eval_text
    from bsbr_export.proof.optimize import quantize_int8

    out, _ = stdlib_copy
    text = tmp_path / "heldout.py"
    text.write_bytes(heldout_text(DEFAULT_EVAL_BYTES))
    quant = quantize_int8(out, length=64, text=read_eval_text(text), budget=1.0)
    assert quant.fp32_nodes == () and quant.steps[0].change > 0 and set(quant.steps[0].bits_per_byte) == {512, 4096}
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
        "1e-5",
    )
    assert code == 1 and "FAILED ort-cpu-int8: held-out bits per byte rose" in err
    report = json.loads((out / "report.json").read_text())
    rows = {r["engine"]: r for r in report["table"]}
    assert rows["ort-cpu-int8"]["bits_per_byte_change"] > 1e-5
    assert rows["ort-cpu-int8"]["status"] == "❎"  # judged by its loss, as validate judges it
    assert abs(rows["ort-cpu-all"]["bits_per_byte_change"]) < 1e-5
    assert "None" not in (out / "report.md").read_text().split("## Validation")[1]
    assert report["recommendation"]["engine"] in ("eager", "ort-cpu-all")
    assert "Recommended here" in stdout and "Recommended here" in (out / "report.md").read_text()


def test_a_spread_is_flagged_as_it_is_shown():
    from bsbr_export.proof.bench import NOISY_SPREAD, Timing, spread

    # p10 8.75, p90 11.25001 around a median of 10: 0.250001, shown (two digits) as 0.25.
    times = [10.0] * 4 + [8.75, 11.25001] * 3
    shown = spread(times)
    assert shown == NOISY_SPREAD
    assert not Timing(19, 1, len(times), 10.0, 11.25, 11.25, 1.9e3, 1.0, spread=shown).noisy
    assert spread([10.0] * 4 + [8.7, 11.3] * 3) == 0.26 > NOISY_SPREAD
