"""tools/web_load.py at a tiny size: bsbr-tiny's web page in headless Chromium (wasm on one
thread and threaded, WebGPU or its wasm fallback) beside native onnxruntime."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("native_1", "native_2", "wasm_1", "wasm_threads", "webgpu")


def test_web_load_smoke(run_study):
    """Every engine generates at --smoke's context with positive figures, the page's load
    is measured, and the report has a row per engine."""
    needs = {"node": shutil.which("node"), "chromium": shutil.which("chromium")}
    needs["web/node_modules"] = (ROOT / "web" / "node_modules" / "puppeteer-core").is_dir()
    missing = [what for what, there in needs.items() if not there]
    if missing and not os.environ.get("CI"):  # as tests/serve/test_web.py: CI must drive the page
        pytest.skip(f"nothing to drive the page with: no {', '.join(missing)}")
    result, report = run_study("web_load")
    (model,) = result["results"]
    assert model["model"] == "bsbr-tiny" and model["web_bytes"] > 0
    (row,) = model["rows"]
    assert row["context"] == 20
    for engine in ENGINES:
        figures = row[engine]
        assert not figures.get("error"), (engine, figures)
        assert figures["token_ms"] > 0 and figures["prefill_ms"] > 0
    for engine in ("wasm_1", "wasm_threads", "webgpu"):
        assert row[engine]["load_ms"] > 0 and row[engine]["tokens_per_s"] > 0
    assert result["tokens"] == 4 and result["machine"]["matmul_gflops"] > 0 and result["machine"]["chromium"]
    rows = [line for line in report.splitlines() if line.startswith("| 20 |")]  # a row per engine
    assert len(rows) == len(ENGINES) and "--smoke" in report
