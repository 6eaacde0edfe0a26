"""Peak memory and latency: bsbr 0.1.1's own forward vs our bsbr-0.1.1 flavor (eager, ONNX).

One model of the package (hidden 256, 4 layers, 4 heads, chunk 64, ff 1024, random
weights), imported with `import_upstream`, exported to ONNX; then for each length every
engine runs in its own subprocess (so peak RSS is that engine's alone):

- `package`: `bsbr.BSBRModel.forward` itself (builds the padded L x L matrix);
- `eager`: our `UpstreamBSBRModel` (chunk-wise, linear memory);
- `ort-cpu`: our ONNX export on ONNX Runtime (CPU, ORT_ENABLE_ALL, no spinning).

Lengths past the package's 5000-row positional table run with the table extended on
both sides (the package's `PositionalEncoding(max_len=L)`, our `max_positions=L`); the
first 5000 rows are the same. Each result holds p50/min latency, RSS before the first
forward, peak RSS, and max abs error against the package's output at that length.
Writes tools/results/upstream_bench.json and .md.

    python tools/bench_upstream.py [--lengths 1024,4096,8192] [--threads 2] [--budget 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tools" / "results"
MODEL = dict(vocab_size=1000, hidden_dim=256, num_layers=4, num_heads=4, chunk_size=64, ff_dim=1024)
ENGINES = ("package", "eager", "ort-cpu")


def rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(engine: str, work: Path, length: int, threads: int, budget: float) -> dict:
    """Time one engine at one length in this process; save its output for the parity check."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    ids = np.random.default_rng(length).integers(0, MODEL["vocab_size"], size=(1, length), dtype=np.int64)
    if engine == "package":
        import bsbr
        from bsbr.bsbr import PositionalEncoding

        model = bsbr.BSBRModel(**MODEL).eval()
        model.load_state_dict(torch.load(work / "upstream.pt", weights_only=True))
        if length > model.pos_encoding.pe.shape[1]:  # its table stops at 5000: extend it, same rows below
            model.pos_encoding = PositionalEncoding(MODEL["hidden_dim"], 0.0, max_len=length).eval()

        def call():
            with torch.inference_mode():
                return model(torch.from_numpy(ids)).numpy()
    elif engine == "eager":
        from bsbr_export.model.checkpoint import load_model

        model = load_model(work / "ours")

        def call():
            with torch.inference_mode():
                return model(torch.from_numpy(ids)).numpy()
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(work / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}

        def call():
            return session.run(None, feeds)[0]

    before = current_rss_mib()
    out = call()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    np.save(work / f"out-{engine}-{length}.npy", out)
    return {
        "engine": engine,
        "length": length,
        "iters": len(times),
        "p50_ms": statistics.median(times),
        "min_ms": min(times),
        "rss_before_mib": before,
        "peak_rss_mib": rss_mib(),
        "forward_peak_mib": rss_mib() - before,
    }


def prepare(work: Path, max_length: int) -> None:
    """The package's model (random weights) -> its state dict -> imported -> ONNX."""
    import bsbr
    import torch

    from bsbr_export.export.onnx import export_onnx
    from bsbr_export.model.checkpoint import save_model
    from bsbr_export.model.upstream import import_upstream

    torch.manual_seed(0)
    model = bsbr.BSBRModel(**MODEL).eval()
    torch.save(model.state_dict(), work / "upstream.pt")
    positions = max_length if max_length > 5000 else None
    ours = import_upstream(work / "upstream.pt", MODEL["num_heads"], MODEL["chunk_size"], max_positions=positions)
    save_model(ours, work / "ours")
    (work / "onnx").mkdir()
    export_onnx(ours, work / "onnx" / "model.onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of timing per engine and length")
    parser.add_argument("--out", type=Path, default=RESULTS / "upstream_bench.json")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=int, metavar="MAX_LENGTH", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, length = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(engine, args.work, length, args.threads, args.budget)))
        return
    if args.prepare:
        prepare(args.work, args.prepare)
        return

    lengths = [int(n) for n in args.lengths.split(",")]
    load_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # The parent stays small (no torch): every child's memory is its own.
        subprocess.run([sys.executable, __file__, "--prepare", str(max(lengths)), "--work", str(work)], check=True)
        for length in lengths:
            for engine in ENGINES:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    engine,
                    str(length),
                    "--work",
                    str(work),
                    "--threads",
                    str(args.threads),
                    "--budget",
                    str(args.budget),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    results.append({"engine": engine, "length": length, "error": tail})
                    print(f"{engine:8} L={length}: FAILED {tail}", flush=True)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(row)
                print(
                    f"{engine:8} L={length}: p50 {row['p50_ms']:.1f} ms, forward peak +{row['forward_peak_mib']:.0f} "
                    f"MiB (peak RSS {row['peak_rss_mib']:.0f} MiB)",
                    flush=True,
                )
            _parity(work, length, results)
    torch_version = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    report = {
        "model": MODEL | {"compression_factor": None, "batch": 1},
        "threads": args.threads,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "torch": torch_version,
        "note": "each engine and length in its own process; forward_peak_mib = peak RSS - RSS before the "
        "first forward; lengths > 5000 run with the positional table extended on both sides",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def _parity(work: Path, length: int, results: list[dict]) -> None:
    import numpy as np

    ref = work / f"out-package-{length}.npy"
    if not ref.is_file():
        return
    want = np.load(ref)
    for row in results:
        out = work / f"out-{row['engine']}-{length}.npy"
        if row["length"] == length and out.is_file():
            row["max_abs_vs_package"] = float(np.abs(np.load(out) - want).max())


def markdown(report: dict) -> str:
    m = report["model"]
    lines = [
        "# bsbr 0.1.1 vs our bsbr-0.1.1 flavor",
        "",
        f"hidden {m['hidden_dim']}, {m['num_layers']} layers, {m['num_heads']} heads, chunk {m['chunk_size']}, "
        f"ff {m['ff_dim']}, batch 1, {report['threads']} threads, torch {report['torch']}; "
        f"load average {report['machine']['loadavg_start'][0]:.1f} -> {report['machine']['loadavg_end'][0]:.1f} "
        f"on {report['machine']['cpu_count']} CPUs.",
        "",
        "| length | engine | p50 ms | min ms | forward peak MiB | peak RSS MiB | max abs vs package |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['engine']} | failed: {r['error']} | | | | |")
            continue
        err = r.get("max_abs_vs_package")
        lines.append(
            f"| {r['length']} | {r['engine']} | {r['p50_ms']:.1f} | {r['min_ms']:.1f} | {r['forward_peak_mib']:.0f} "
            f"| {r['peak_rss_mib']:.0f} | {'-' if err is None else f'{err:.1e}'} |"
        )
    lines += ["", report["note"] + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
