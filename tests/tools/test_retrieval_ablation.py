"""tools/retrieval_ablation.py at a tiny size: every arm trained by tools/train.py in its
own process, scored, and reported."""

from __future__ import annotations

import json
import math

ARMS = ["sum", "gated", "none", "linear"]


def test_retrieval_ablation_smoke(run_study, tmp_path):
    """Each arm trains 2 steps in a train.py process of its own (a log and a re-runnable
    command), is scored at every window and gets its row; the gated arm's gates are read."""
    record, report = run_study("retrieval_ablation", "--runs", tmp_path / "runs")
    assert list(record["arms"]) == ARMS and record["jobs"] == 2
    for arm, result in record["arms"].items():
        assert result["steps"] == 2 and result["bytes_seen"] == 2 * 1 * 128
        assert list(result["bpb"]) == ["512", "4096", "16384"]
        assert all(0 < bpb < math.inf for bpb in result["bpb"].values()) and result["chunk_alone_bpb"] > 0
        run = tmp_path / "runs" / arm
        assert "2 steps" in (run / "train.log").read_text()
        assert json.loads((run / "train.json").read_text())["command"].startswith(
            f"python tools/train.py --retrieval {arm} --steps 2 --batch 1 --length 128"
        )
        assert f"| `{arm}` |" in report
    assert [row["layer"] for row in record["arms"]["gated"]["learned"]] == [0, 1, 2, 3]
    assert record["machine"]["matmul_gflops"] > 0
    assert "Does block retrieval beat no retrieval?" in report and "--smoke" in report
