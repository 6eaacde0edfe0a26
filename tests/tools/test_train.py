"""tools/train.py at a tiny size: it trains, checkpoints, scores and ships, into --out only."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shipped_files() -> dict[str, tuple[int, int]]:
    """(size, mtime) of what a real run ships: models/ and tools/results/train_*."""
    files = [*(ROOT / "models").rglob("*"), *(ROOT / "tools" / "results").glob("train_*")]
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()}


def test_train_smoke(run_study, tmp_path):
    """4 steps trained and checkpointed, the curve and every window scored, the preset and
    results written into --out, nothing into models/ or tools/results."""
    before = shipped_files()
    record, report = run_study("train", name="train_bsbr-stdlib")
    assert record["steps"] == 4 and record["tokens_seen"] == 4 * 2 * 256
    assert [point["step"] for point in record["curve"]] == [2, 4]
    assert all(point["train_bpb"] > 0 and point["heldout_bpb"] > 0 for point in record["curve"])
    assert record["heldout_bytes"] == record["slice_bytes"] == 4096
    assert list(record["heldout_bpb_by_window"]) == ["512", "4096", "16384"]
    assert all(0 < bpb < math.inf for bpb in record["heldout_bpb_by_window"].values())
    for compressors in record["compressors_by_window"].values():
        assert set(compressors) == {"gzip -9", "xz -9e"} and all(v > 0 for v in compressors.values())
    assert [row["layer"] for row in record["learned"]] == [0, 1, 2, 3]
    assert all(0 < gate < 1 for row in record["learned"] for gate in row["gate"])
    assert record["machine"]["matmul_gflops"] > 0 and record["scored_on"]["matmul_gflops"] > 0
    preset = tomllib.loads((tmp_path / "bsbr-stdlib.toml").read_text())
    assert preset["heldout_bpb"] == record["slice_bpb"] and preset["weights"] == "bsbr-stdlib.safetensors"
    assert (tmp_path / "bsbr-stdlib.safetensors").is_file() and (tmp_path / "run" / "weights.safetensors").is_file()
    assert (tmp_path / "train_bsbr-stdlib.png").is_file()
    assert shipped_files() == before
    assert "| bsbr-stdlib |" in report and "| 4 |" in report and "--smoke" in report
