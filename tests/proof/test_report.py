"""The recommendation: the fastest engine that stays within the accuracy budget, never
one outside it, named with its artifact, precision and speed-ups."""

from __future__ import annotations

from bsbr_export.proof.report import precision_of, recommend, recommendation_text


def row(engine, speedups, status="✅", change=None, artifact="model.onnx"):
    return {
        "engine": engine,
        "status": status,
        "artifact": artifact,
        "precision": precision_of(engine),
        "speedup_vs_eager": speedups,
        "bits_per_byte": None if change is None else {256: 2.0 * (1 + change)},
        "bits_per_byte_change": change,
    }


def test_fastest_within_budget_wins_and_faster_ones_outside_are_named():
    rows = [
        row("eager", {256: 1.0, 4096: 1.0}, change=0.0, artifact=None),
        row("ort-cpu-all", {256: 1.5, 4096: 1.2}, change=0.0),
        row("ort-cpu-int8", {256: 2.0, 4096: 1.9}, status="❎", change=0.004),  # max abs off, loss fine
        row("openvino-bf16", {256: 3.0, 4096: 3.5}, change=0.08),  # the bf16 trap
    ]
    choice = recommend(rows, 0.01)
    assert choice["engine"] == "ort-cpu-int8" and choice["precision"] == "int8"
    assert choice["rejected"] == ["openvino-bf16"]
    assert choice["speedup_vs_eager"] == {256: 2.0, 4096: 1.9}
    text = recommendation_text(choice)
    assert "ort-cpu-int8 (model.onnx), int8" in text and "openvino-bf16" in text
    assert recommend(rows, 0.1)["engine"] == "openvino-bf16"


def test_without_text_parity_decides():
    rows = [
        row("eager", {256: 1.0}, artifact=None),
        row("ort-cpu-all", {256: 1.4}),
        row("ort-cpu-int8", {256: 2.0}, status="❎"),
        row("aoti", {256: 9.0}, status="❌"),
    ]
    assert recommend(rows, 0.01)["engine"] == "ort-cpu-all"
    assert recommend([row("x", {})], 0.01) is None
    assert "nothing to recommend" in recommendation_text(None)


def test_status_judges_reduced_precision_by_held_out_loss_as_validate_does():
    """int8 of a trained byte-level LM: off by random-id parity but within the budget on
    text is ✅ (bench's table and recommendation agree with validate); over it, ❎. fp32
    stays judged by parity; without text, int8 falls back to its parity tolerance."""
    from types import SimpleNamespace

    from bsbr_export.proof.report import status

    def engine(name, max_abs, bpb=None):
        return SimpleNamespace(engine=name, ok=True, max_abs=max_abs, logit_scale=10.0, bits_per_byte=bpb)

    eager = engine("eager", 0.0, {256: 2.0, 4096: 1.8})
    assert status(engine("ort-cpu-int8", 5.0, {256: 2.014, 4096: 1.801}), 1e-4, eager) == "✅"  # +0.7%
    assert status(engine("ort-cpu-int8", 5.0, {256: 2.03, 4096: 1.8}), 1e-4, eager) == "❎"  # +1.5%
    assert status(engine("ort-cpu-int8", 5.0, {256: 2.03, 4096: 1.8}), 1e-4, eager, accuracy_budget=0.02) == "✅"
    assert status(engine("ort-cpu-all", 5.0, {256: 2.0, 4096: 1.8}), 1e-4, eager) == "❎"
    assert status(engine("ort-cpu-int8", 5.0), 1e-4, None) == "❎"
    assert status(SimpleNamespace(engine="aoti", ok=False), 1e-4, eager) == "❌"
