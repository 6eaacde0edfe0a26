"""Peak memory and latency: bsbr 0.1.1's own forward vs our bsbr-0.1.1 flavor (eager, ONNX).

One model of the package (hidden 256, 4 layers, 4 heads, chunk 64, ff 1024, random
weights), imported with `import_upstream`, exported to ONNX; then for each length every
engine runs in its own child process (so peak RSS is that engine's alone):

- `package`: `bsbr.BSBRModel.forward` itself (builds the padded L x L matrix);
- `eager`: our `UpstreamBSBRModel` (chunk-wise, linear memory);
- `ort-cpu`: our ONNX export on ONNX Runtime (CPU, ORT_ENABLE_ALL, no spinning).

Lengths past the package's 5000-row positional table run with the table extended on
both sides (the package's `PositionalEncoding(max_len=L)`, our `max_positions=L`); the
first 5000 rows are the same. Each result holds p50/p10 latency (`time_lengths`, for
--budget seconds at most), RSS before the first forward, peak RSS, and max abs error
against the package's output at that length. ORT's own MatMul rate is measured in the
same run. Writes upstream_bench.{json,md} to --out.

    python tools/bench_upstream.py [--lengths 1024,4096,8192] [--threads 2] [--budget 5]
        [--out tools/results] [--smoke]

`--smoke`: lengths 64 and 100, one thread, a 0.1 s budget.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import lab

MODEL = dict(vocab_size=1000, hidden_dim=256, num_layers=4, num_heads=4, chunk_size=64, ff_dim=1024)
ENGINES = ("package", "eager", "ort-cpu")


def current_rss_mib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(engine: str, work: str, length: int, threads: int, budget: float) -> dict:
    """Time one engine at one length in this process; save its output for the parity check."""
    import numpy as np
    import torch

    from bsbr_export.proof.bench import time_lengths

    work = Path(work)
    torch.set_num_threads(threads)
    ids = np.random.default_rng(length).integers(0, MODEL["vocab_size"], size=(1, length), dtype=np.int64)
    if engine == "ort-cpu":
        from bsbr_export.runtime.onnx import OnnxRunner

        session = OnnxRunner(work / "onnx" / "model.onnx", threads=threads).session

        def run(ids):
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    else:
        if engine == "package":
            import bsbr
            from bsbr.bsbr import PositionalEncoding

            model = bsbr.BSBRModel(**MODEL).eval()
            model.load_state_dict(torch.load(work / "upstream.pt", weights_only=True))
            if length > model.pos_encoding.pe.shape[1]:  # its table stops at 5000: extend it, same rows below
                model.pos_encoding = PositionalEncoding(MODEL["hidden_dim"], 0.0, max_len=length).eval()
        else:
            from bsbr_export.model.checkpoint import load_model

            model = load_model(work / "ours")

        def run(ids):
            with torch.inference_mode():
                return model(torch.from_numpy(ids)).numpy()

    before = current_rss_mib()
    np.save(work / f"out-{engine}-{length}.npy", run(ids))  # the warm-up's output
    (timing,) = time_lengths(run, lambda _: ids, [length], warmup=0, min_iters=3, budget_s=budget)
    return {
        "engine": engine,
        "length": length,
        "iters": timing.iters,
        "p50_ms": timing.p50_ms,
        "p10_ms": timing.p10_ms,
        "rss_before_mib": before,
        "peak_rss_mib": timing.peak_rss_mib,
        "forward_peak_mib": timing.peak_rss_mib - before,
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
    parser = lab.parser(__doc__)
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of timing per engine and length")
    args = parser.parse_args()
    if args.smoke:
        # One thread: on a busy machine (CI) torch's second OpenMP thread waits for a core at every op.
        args.lengths, args.budget, args.threads = "64,100", 0.1, 1
    lengths = [int(n) for n in args.lengths.split(",")]
    load_start = os.getloadavg()
    machine = lab.machine(threads=args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, max(lengths))
        for length in lengths:
            for engine in ENGINES:
                try:
                    row = lab.in_child(worker, engine, str(work), length, args.threads, args.budget)
                except RuntimeError as exc:  # e.g. the package's L x L matrix out of memory
                    tail = str(exc).splitlines()[-1]
                    results.append({"engine": engine, "length": length, "error": tail})
                    print(f"{engine:8} L={length}: FAILED {tail}", flush=True)
                    continue
                results.append(row)
                print(
                    f"{engine:8} L={length}: p50 {row['p50_ms']:.1f} ms, forward peak +{row['forward_peak_mib']:.0f} "
                    f"MiB (peak RSS {row['peak_rss_mib']:.0f} MiB)",
                    flush=True,
                )
            _parity(work, length, results)
    result = {
        "model": MODEL | {"compression_factor": None, "batch": 1},
        "threads": args.threads,
        "machine": machine | {"loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "torch": machine["versions"]["torch"],
        "note": "each engine and length in its own process; forward_peak_mib = peak RSS - RSS before the "
        "first forward; lengths > 5000 run with the positional table extended on both sides",
        "results": results,
    }
    lab.write(args.out, "upstream_bench", result, report)


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


def report(result: dict) -> str:
    """The results table, with the model and the machine they were measured on."""
    m, machine = result["model"], result["machine"]
    lines = [
        "# bsbr 0.1.1 vs our bsbr-0.1.1 flavor",
        "",
        f"hidden {m['hidden_dim']}, {m['num_layers']} layers, {m['num_heads']} heads, chunk {m['chunk_size']}, "
        f"ff {m['ff_dim']}, batch 1, {result['threads']} threads, torch {result['torch']}; "
        f"load average {machine['loadavg_start'][0]:.1f} -> {machine['loadavg_end'][0]:.1f}.",
        "",
        lab.describe(machine),
        "",
        "| length | engine | p50 ms | p10 ms | forward peak MiB | peak RSS MiB | max abs vs package |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['engine']} | failed: {r['error']} | | | | |")
            continue
        err = r.get("max_abs_vs_package")
        lines.append(
            f"| {r['length']} | {r['engine']} | {r['p50_ms']:.1f} | {r['p10_ms']:.1f} | {r['forward_peak_mib']:.0f} "
            f"| {r['peak_rss_mib']:.0f} | {'-' if err is None else f'{err:.1e}'} |"
        )
    lines += ["", result["note"] + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
