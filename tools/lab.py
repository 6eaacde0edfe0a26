"""What every study in tools/ shares: its command line, a child process, timing, the
machine it ran on (with ONNX Runtime's own MatMul rate, the machine's limit, measured in
the same run), and how results are written.

A study is a script: `python tools/STUDY.py [options] [--out DIR] [--smoke]`. It builds a
`result` dict and calls `write(out, name, result, report)`, which writes `name.json` and
`name.md` (tools/results by default) and prints the markdown. `--smoke` runs it at a tiny
size, for tests/tools/ (every study has one there, in `make quick`), never for figures.
Scripts import this module as `lab`: Python puts a script's own folder first on sys.path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bsbr_export.defaults import DEFAULT_THREADS
from bsbr_export.export.pipeline import export_model
from bsbr_export.formats import FORMATS
from bsbr_export.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A study's argument parser, with the options every study takes: `--out` (a folder)
    and `--smoke` (a tiny size)."""
    parsed = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parsed.add_argument("--out", type=Path, default=RESULTS, help="folder the results go to (default tools/results)")
    parsed.add_argument("--smoke", action="store_true", help="a tiny size that only proves the study runs")
    return parsed


def command() -> str:
    """The command line that ran this study, as a reader would type it again."""
    return " ".join(["python", f"tools/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def write(out: Path, name: str, result: dict, report: Callable[[dict], str]) -> None:
    """`result` as `out/name.json` and `report(result)` as `out/name.md` (printed too)."""
    out.mkdir(parents=True, exist_ok=True)
    text = report(result)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)


def streaming_export(model: str, export: Path | None, study: str) -> Path:
    """`export` when given, else preset `model` exported as ONNX with its streaming graphs
    into a work folder kept between runs (`/tmp/bsbr_STUDY/MODEL`)."""
    if export is not None:
        return export
    export = Path(tempfile.gettempdir()) / f"bsbr_{study}" / model
    if not (export / "manifest.json").is_file():
        export_model(model, export, [FORMATS["onnx"]], streaming=True, overwrite=True)
    return export


def in_child(function: Callable, *args: Any, timeout: float | None = None, env: dict | None = None) -> Any:
    """`function(*args)` in a fresh Python process (its own memory peak, threads, and CPU
    state), its result back. `function` is a module-level function of a file in tools/;
    arguments and result travel as JSON."""
    module = sys.modules[function.__module__]
    call = {"file": str(Path(module.__file__).resolve()), "function": function.__name__, "args": args}
    done = subprocess.run(
        [sys.executable, __file__, json.dumps(call, default=str)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{function.__name__}{args!r} failed in its child process:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_call(call: dict) -> None:
    """The child's side of `in_child`: import the study's file, call, print the result."""
    spec = importlib.util.spec_from_file_location(Path(call["file"]).stem, call["file"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps(getattr(module, call["function"])(*call["args"])))


def timed(call: Callable[[], Any]) -> float:
    """Seconds one `call()` takes."""
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def progress(what: str, measure: Callable, *args: Any) -> Any:
    """`measure(*args)`, saying on stderr what is measured and how long it took."""
    begin = time.perf_counter()
    result = measure(*args)
    print(f"{what}: {time.perf_counter() - begin:.1f} s", file=sys.stderr, flush=True)
    return result


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank; nan when there are none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def machine(threads: int = DEFAULT_THREADS, hidden: int = 256) -> dict:
    """What the figures were measured on (`bsbr_export.machine.machine_info`), and ONNX
    Runtime's own fp32 MatMul rate there at `threads`, measured now in a child process."""
    return {**machine_info(), "threads": threads, "matmul_gflops": in_child(matmul_rate, hidden, threads)}


def matmul_rate(hidden: int, threads: int) -> float:
    """ORT's fp32 MatMul GFLOP/s here: [4096, hidden] x [hidden, 4 hidden] (p50 of repeats)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bsbr_export.proof.bench import time_lengths
    from bsbr_export.runtime.onnx import OnnxRunner

    weight = np.random.default_rng(0).standard_normal((hidden, 4 * hidden), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["L", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["L", 4 * hidden])],
        [numpy_helper.from_array(weight, "w")],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), str(path))
        runner = OnnxRunner(path, threads=threads, spinning=True)  # alone in its process
        rows = 4096
        (timing,) = time_lengths(
            lambda x: runner.session.run(None, {"x": x}),
            lambda n: np.ones((n, hidden), np.float32),
            [rows],
            warmup=2,
            min_iters=5,
        )
    return 2 * rows * hidden * 4 * hidden / (timing.p50_ms / 1e3) / 1e9


if __name__ == "__main__":
    _run_call(json.loads(sys.argv[1]))
