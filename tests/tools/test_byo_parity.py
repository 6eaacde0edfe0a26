"""tools/byo_parity.py at a tiny size: the test suite's user models, loaded by module
reference as a user's file is, exported and compared with eager output by output."""

from __future__ import annotations

KINDS = {  # model kind -> the artifacts it has (a model with `stream` also gets its streaming graph)
    "upstream-layer classifier (pooled)": ["onnx", "torchscript"],
    "rotary GQA decoder on bsbr_export.nn": ["onnx", "torchscript", "streaming onnx"],
    "native model + value head": ["onnx", "torchscript", "streaming onnx"],
    "native mean-pooled classifier": ["onnx", "torchscript"],
}


def test_byo_parity_smoke(run_study):
    """Each kind's every artifact and output has an error per smoke shape, all at round-off."""
    result, report = run_study("byo_parity")
    assert [r["model"] for r in result["results"]] == list(KINDS)
    for row in result["results"]:
        assert row["passed"] and row["chunk_size"] == 4
        assert list(row["errors"]) == KINDS[row["model"]]
        for outputs in row["errors"].values():
            assert list(outputs) == row["outputs"]
            for cells in outputs.values():
                assert list(cells) == ["1x1", "3x1", "1x5", "3x5"]  # batches 1, 3 at lengths 1 and c + 1
                assert all(0 <= error < 1e-4 for error in cells.values()), cells
    value_head = result["results"][2]
    assert value_head["outputs"] == ["logits", "value"] and result["results"][0]["swapped"]
    assert result["machine"]["matmul_gflops"] > 0
    assert "| value |" in report and "## native mean-pooled classifier" in report
