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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bsbr_export.defaults import DEFAULT_THREADS
from bsbr_export.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


class StudyParser(argparse.ArgumentParser):
    """An argument parser whose `--smoke` runs never write into the real results: without
    `--out`, they go to a temporary folder."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.smoke and parsed.out == self.get_default("out"):
            parsed.out = Path(tempfile.gettempdir()) / f"bsbr-smoke-{Path(sys.argv[0]).stem}"
        return parsed


def parser(
    doc: str | None,
    out: Path = RESULTS,
    *,
    model: str | None = None,
    models: str | None = None,
    export: str | None = None,
) -> argparse.ArgumentParser:
    """A study's argument parser, with the options every study takes: `--out` (a folder,
    `out` unless given) and `--smoke` (a tiny size; its results go to a temporary folder
    unless `--out` says where). What it measures, where given: `--model` (one preset,
    `model` by default) or `--models` (comma-separated), and `--export`, an existing
    export to use instead, with `export` saying what the study does with it."""
    parsed = StudyParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    shown = out.relative_to(RESULTS.parents[1])
    parsed.add_argument("--out", type=Path, default=out, help=f"folder the results go to (default {shown})")
    parsed.add_argument("--smoke", action="store_true", help="a tiny size that only proves the study runs")
    if model:
        parsed.add_argument("--model", default=model, help=f"the preset measured (default {model})")
    if models:
        parsed.add_argument("--models", default=models, help=f"presets measured, comma-separated ({models})")
    if export:
        parsed.add_argument("--export", type=Path, default=None, help=f"an existing export to {export}, not exporting")
    return parsed


def command() -> str:
    """The command line that ran this study, as a reader would type it again."""
    return " ".join(["python", f"tools/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def write(out: Path, name: str, result: dict, report: Callable[[dict], str]) -> None:
    """`result` as `out/name.json` and `report(result)` as `out/name.md` (printed too),
    the command that made them recorded in both (in the result as "command", unless it
    names one of its own, as a training record does)."""
    out.mkdir(parents=True, exist_ok=True)
    result.setdefault("command", command())
    text = f"{report(result).rstrip()}\n\n`{command()}`\n"
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
        # Imported here: torch's exporter takes seconds to import, and every child of
        # `in_child` imports this module.
        from bsbr_export.export.pipeline import export_model
        from bsbr_export.formats import FORMATS

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


def table(head: list[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table's lines: `head`, its rule, and one line per row (cells as `str`)."""
    return [f"| {' | '.join(head)} |", "|" + "---|" * len(head), *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def target_lines(rows: list[tuple[str, float | None, str]]) -> list[str]:
    """A markdown table of (what, measured, target like '>= 1.5') rows, each marked met or
    not (a figure that could not be measured, None, is not met)."""
    lines = ["| ratio | measured | target | met |", "|---|---|---|---|"]
    for what, measured, target in rows:
        op, bound = target.split()
        met = measured is not None and (measured <= float(bound) if op == "<=" else measured >= float(bound))
        shown = "-" if measured is None else f"{measured:.2f}"
        lines.append(f"| {what} | {shown} | {target} | {'yes' if met else 'NO'} |")
    return lines


def machine(threads: int = DEFAULT_THREADS, hidden: int = 256) -> dict:
    """What the figures were measured on (`bsbr_export.machine.machine_info`), and ONNX
    Runtime's own fp32 MatMul rate there at `threads`, measured now in a child process."""
    rate = in_child(matmul_rate, hidden, threads)
    return {**machine_info(), "threads": threads, "matmul_hidden": hidden, "matmul_gflops": rate}


def heading(title: str, machine: dict) -> list[str]:
    """A report's first lines: its title, then the machine it ran on (`describe`)."""
    return [f"# {title}", "", describe(machine), ""]


def describe(machine: dict) -> str:
    """The sentence every report opens with: the CPU, its vector units, the versions, and
    ORT's own MatMul rate where `machine` measured it (`machine()`)."""
    features = ", ".join(machine.get("cpu_features") or []) or "no AVX2, AVX-512 or AMX"
    versions = machine.get("versions", {})
    text = (
        f"Machine: **{machine['processor']}**, {machine['cpu_count']} cores ({features}), {machine['platform']}; "
        + ", ".join(f"{name} {versions[name]}" for name in ("python", "torch", "onnxruntime") if name in versions)
        + "."
    )
    if "matmul_gflops" in machine:
        hidden, threads = machine.get("matmul_hidden", 256), machine["threads"]
        text += (
            f" ORT's own fp32 MatMul [4096, {hidden}] x [{hidden}, {4 * hidden}] at {threads} "
            f"thread{'s' if threads != 1 else ''}: "
            f"{machine['matmul_gflops']:.0f} GFLOP/s (same run)."
        )
    return text


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


def onnx_timings(path: str, lengths: list[int], vocab: int, threads: int = DEFAULT_THREADS) -> dict:
    """An ONNX graph over ids and a mask, timed in this process at each length (random
    ids, batch 1, `time_lengths`): {"load_rss_mib", "timings": [Timing fields]}. Run it
    with `in_child`, so each graph has its own memory peak and spinning threads."""
    from bsbr_export.proof.bench import peak_rss_mib, random_feeds, time_lengths
    from bsbr_export.runtime.onnx import OnnxRunner

    runner = OnnxRunner(path, threads=threads, spinning=True)  # alone in its process
    base = peak_rss_mib()
    timings = time_lengths(
        lambda feeds: runner.session.run(None, {n: feeds[n] for n in runner.input_names}),
        lambda n: random_feeds(vocab, 1, n),
        lengths,
        warmup=1,
        min_iters=3,
        budget_s=1.0,
    )
    return {"load_rss_mib": base, "timings": [t.__dict__ for t in timings]}


if __name__ == "__main__":
    _run_call(json.loads(sys.argv[1]))
