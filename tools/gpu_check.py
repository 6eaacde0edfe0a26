"""The prepared GPU run: torch's CUDA paths for BSBR models, measured in one go.

    python tools/gpu_check.py --smoke              # here, on the CPU, tiny sizes: proves the script
    python tools/gpu_check.py --out DIR            # on the GPU machine, within --minutes

For each model (default bsbr-small and the trained bsbr-stdlib): parity of every torch engine
on the GPU (eager fp32 with TF32 off, eager bf16 autocast; torch.compile fp32 last, for the
first model, as time allows) against eager
fp32 on the GPU and an fp64 CPU reference (max abs, top-1; bits per byte on held-out text
for bsbr-stdlib); forward latency and tokens/s at each batch and length (CUDA events,
after warm-up; compile time reported apart); decode per token at each context (the
stream state carried, one token per call); peak GPU memory. Then BSBR attention against
`scaled_dot_product_attention` (flash, causal) at the same sizes, attention alone, and the
torch engines once more through the product (`benchmark` with `BenchOptions(device="cuda")`).

Each figure is written to DIR/gpu_check.json as soon as it is measured, so a run cut off
by its deadline still returns what it measured; sections past the deadline are skipped
and listed; DIR/gpu_check.md tables them at the end. ONNX Runtime's CUDA provider is not
measured here (its wheel is not on that machine). DIR is /tmp/gpu_check by default.
`--smoke`: on the CPU, bsbr-tiny and bsbr-stdlib at lengths 70 and 130, every section run.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path

import lab
import numpy as np
import torch
import torch.nn.functional as F

from bsbr_export.model.attention import bsbr_attention
from bsbr_export.model.sources import load_source
from bsbr_export.proof.evaltext import bits_per_byte, heldout_text

FULL = {
    "models": "bsbr-small,bsbr-stdlib",
    "lengths": "1024,8192,32768",
    "batches": "1,8",
    "contexts": "256,1024,4096,16384,65536",
    "attention_lengths": "1024,8192,32768,65536",
}
SMOKE = {
    "models": "bsbr-tiny,bsbr-stdlib",
    "lengths": "70,130",
    "batches": "1,2",
    "contexts": "8,40",
    "attention_lengths": "128,300",
}


class Deadline:
    """Sections start only while time is left; what was skipped is recorded."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def allows(self, section: str, needs: float = 0.0) -> bool:
        if time.perf_counter() + needs < self.end:
            return True
        self.skipped.append(section)
        return False


class Results:
    """The JSON file, rewritten whole after every figure."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.data = path, {**header, "rows": []}
        self.flush()

    def add(self, **row) -> None:
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.flush()

    def flush(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def median_ms(fn, device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of `fn()` (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            times.append(lab.timed(fn) * 1e3)
    return statistics.median(times)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def engines(model, device: torch.device, compiled: bool) -> dict:
    """name -> forward on ids [B, L]: eager fp32 and bf16 autocast, or torch.compile
    (dynamic shapes: one compile for every length, paid by the first call)."""
    if compiled:
        module = torch.compile(model, dynamic=True)

        def compile_fp32(ids):
            with torch.inference_mode():
                return module(ids)

        return {"compile-fp32": compile_fp32}

    def eager(ids):
        with torch.inference_mode():
            return model(ids)

    def bf16(ids):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            return model(ids)

    return {"eager-fp32": eager, "eager-bf16": bf16}


def compare(out: torch.Tensor, reference: torch.Tensor) -> dict:
    out, reference = out.double().cpu(), reference.double().cpu()
    return {
        "max_abs": float((out - reference).abs().max()),
        "top1": float((out.argmax(-1) == reference.argmax(-1)).double().mean()),
        "logit_scale": float(reference.abs().max()),
    }


def check_model(
    name: str, args, device: torch.device, results: Results, deadline: Deadline, compiled: bool = False
) -> None:
    """Parity and latency of the model's engines (`engines`), then its decode latency
    (eager only)."""
    source = load_source(name)
    model = source.module.eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    reference_ids = torch.randint(0, vocab, (1, args.lengths[0]), generator=generator)
    with torch.inference_mode():
        fp64 = model.double()(reference_ids)  # the fp64 CPU reference, at the shortest length
    model.float().to(device)
    with torch.inference_mode():
        fp32_gpu = model(reference_ids.to(device))
    runs = engines(model, device, compiled)
    text = heldout_text(args.text_bytes) if vocab == 256 else None
    for engine, run in runs.items():
        if not deadline.allows(f"{name} {engine}", 20):
            continue
        reset_peak(device)
        start = time.perf_counter()
        out = run(reference_ids.to(device))  # the first call compiles
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {
            "model": name,
            "engine": engine,
            "what": "parity",
            "first_call_s": round(time.perf_counter() - start, 2),
            "vs_gpu_fp32": compare(out, fp32_gpu),
            "vs_cpu_fp64": compare(out, fp64),
            "length": args.lengths[0],
        }
        if text is not None:

            def logits_of(ids, run=run):
                return run(torch.from_numpy(ids).to(device)).float().cpu().numpy()

            row["bits_per_byte"] = {w: bits_per_byte(logits_of, text, window=w) for w in args.windows}
        results.add(**row)
        for batch in args.batches:
            for length in args.lengths:
                if not deadline.allows(f"{name} {engine} b{batch} L{length}", 10):
                    continue
                ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
                reset_peak(device)
                try:
                    ms = median_ms(lambda run=run, ids=ids: run(ids), device, repeats=args.repeats)
                except torch.OutOfMemoryError:
                    results.add(model=name, engine=engine, what="latency", batch=batch, length=length, error="OOM")
                    continue
                results.add(
                    model=name,
                    engine=engine,
                    what="latency",
                    batch=batch,
                    length=length,
                    ms=round(ms, 3),
                    tokens_per_s=round(batch * length / ms * 1e3),
                    peak_mib=peak_mib(device),
                )
    if not compiled:
        decode(name, model, vocab, args, device, results, deadline)


def decode(name: str, model, vocab: int, args, device: torch.device, results: Results, deadline: Deadline) -> None:
    """Per-token latency at each context: the context streamed in, then one token per call."""
    generator = torch.Generator().manual_seed(1)
    for context in args.contexts:
        if not deadline.allows(f"{name} decode {context}", 10):
            continue
        with torch.inference_mode():
            state = model.init_state(1)
            ids = torch.randint(0, vocab, (1, context), generator=generator).to(device)
            _, state = model.stream(ids, state)
            carried = {"state": state, "token": ids[:, -1:]}
            steps = []

            def step(carried=carried):
                _, carried["state"] = model.stream(carried["token"], carried["state"])

            reset_peak(device)
            for _ in range(3):
                step()
            for _ in range(args.decode_tokens):
                steps.append(median_ms(step, device, repeats=1, warmup=0))
        results.add(
            model=name,
            what="decode",
            context=context,
            ms_per_token=round(statistics.median(steps), 4),
            p90_ms=round(lab.percentile(steps, 0.9), 4),
            peak_mib=peak_mib(device),
        )


def attention_race(args, device: torch.device, results: Results, deadline: Deadline) -> None:
    """BSBR attention against causal SDPA (flash on the GPU), attention alone, bf16, batch 1."""
    heads, e, c = 4, 64, 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for length in args.attention_lengths:
        if not deadline.allows(f"attention L{length}", 10):
            continue
        q, k, v, mq, mk = (
            torch.randn(1, heads, length, e, device=device, dtype=dtype) / math.sqrt(e) for _ in range(5)
        )
        row = {"what": "attention", "length": length, "dtype": str(dtype)}
        for label, fn in (
            ("bsbr", lambda q=q, k=k, v=v, mq=mq, mk=mk: bsbr_attention(q, k, v, mq, mk, c)),
            ("sdpa", lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ):
            reset_peak(device)
            try:
                with torch.inference_mode():
                    row[f"{label}_ms"] = round(median_ms(fn, device, repeats=args.repeats), 4)
                row[f"{label}_peak_mib"] = peak_mib(device)
            except torch.OutOfMemoryError:
                row[f"{label}_ms"] = "OOM"
        if isinstance(row.get("sdpa_ms"), float) and isinstance(row.get("bsbr_ms"), float):
            row["sdpa_over_bsbr"] = round(row["sdpa_ms"] / row["bsbr_ms"], 3)
        results.add(**row)


def product_bench(args, device: torch.device, results: Results, deadline: Deadline) -> None:
    """The same engines through the product: `bsbr-export bench MODEL --device cuda` (the
    python call under it), so the figures above are not only a script's."""
    from bsbr_export.workflows import BenchExport, BenchOptions, benchmark

    if not deadline.allows("product bench", 60):
        return
    engines = (
        ("eager", "torchscript")
        if device.type == "cpu"
        else ("eager-cuda", "eager-cuda-bf16", "compile-cuda", "torchscript-cuda")
    )
    options = BenchOptions(
        lengths=tuple(args.lengths[:2]), engines=engines, budget_s=0.5, reduced_precision=False, device=device.type
    )
    export = BenchExport(
        out_dir=args.out / "product_bench",
        formats=("torchscript",),
        streaming=False,
        long_length=args.lengths[-1],
        overwrite=True,
    )
    run = benchmark(args.models[0], options, export)
    results.add(
        what="product bench",
        device=device.type,
        validated=run.validation.passed,
        table=json.loads((run.directory / "report.json").read_text())["table"],
    )


def report(data: dict) -> str:
    """The run's rows as markdown tables: parity, latency, decode, attention, the product's bench."""
    rows = {}
    for row in data["rows"]:
        rows.setdefault(row["what"], []).append(row)
    lines = [
        f"# GPU check on {data['device']}",
        "",
        f"torch {data['torch']}, CUDA {data['cuda']}, TF32 {'on' if data['tf32'] else 'off'}; medians of "
        f"{'the wall clock' if data['smoke'] else 'CUDA events'}. Skipped at the deadline: "
        f"{', '.join(data.get('skipped', [])) or 'nothing'}.",
        "",
        "## Parity (max abs, top-1) at the shortest length",
        "",
    ]
    lines += lab.table(
        ["model", "engine", "L", "first call s", "vs GPU fp32", "vs CPU fp64", "bits per byte"],
        (
            [r["model"], r["engine"], r["length"], r["first_call_s"]]
            + [f"{r[k]['max_abs']:.2e}, {r[k]['top1']:.3f}" for k in ("vs_gpu_fp32", "vs_cpu_fp64")]
            + [", ".join(f"{w}: {v:.4f}" for w, v in r.get("bits_per_byte", {}).items()) or "-"]
            for r in rows.get("parity", [])
        ),
    )
    lines += ["", "## Forward latency", ""]
    lines += lab.table(
        ["model", "engine", "batch", "L", "ms", "tokens/s", "peak MiB"],
        (
            [r["model"], r["engine"], r["batch"], r["length"], r.get("ms", r.get("error"))]
            + [r.get("tokens_per_s", "-"), r.get("peak_mib") or "-"]
            for r in rows.get("latency", [])
        ),
    )
    lines += ["", "## Decode, one token per call", ""]
    lines += lab.table(
        ["model", "context", "ms per token", "p90 ms", "peak MiB"],
        (
            [r["model"], r["context"], r["ms_per_token"], r["p90_ms"], r["peak_mib"] or "-"]
            for r in rows.get("decode", [])
        ),
    )
    lines += ["", "## Attention alone, batch 1", ""]
    lines += lab.table(
        ["L", "dtype", "BSBR ms", "SDPA ms", "SDPA / BSBR"],
        (
            [r["length"], r["dtype"], r["bsbr_ms"], r["sdpa_ms"], r.get("sdpa_over_bsbr", "-")]
            for r in rows.get("attention", [])
        ),
    )
    for r in rows.get("product bench", []):
        lines += ["", f"The product's bench on {r['device']}: validation {'passed' if r['validated'] else 'FAILED'}."]
    return "\n".join(lines)


def main() -> None:
    parser = lab.parser(__doc__)
    # Not tools/results: the product's bench writes an export beside the figures.
    parser.set_defaults(out=Path("/tmp/gpu_check"))
    parser.add_argument("--minutes", type=float, default=3.5, help="no section starts after this")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--decode-tokens", type=int, default=50)
    parser.add_argument("--text-bytes", type=int, default=32 * 1024, help="held-out bytes bits per byte is scored on")
    for key in FULL:
        parser.add_argument(f"--{key.replace('_', '-')}", default=None)
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    for key, default in sizes.items():
        value = getattr(args, key) or default
        setattr(args, key, value.split(",") if key == "models" else [int(n) for n in value.split(",")])
    args.windows = [min(4096, max(args.lengths))]
    if args.smoke:  # every section runs, however slow the CPU: the deadline is the GPU run's
        args.text_bytes, args.decode_tokens, args.repeats, args.minutes = 2048, 5, 2, 60
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        # Like with like: torch's fp32 matmul is IEEE fp32 only with TF32 off.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    machine = lab.machine()
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine["processor"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tf32": False,
        "smoke": args.smoke,
        "machine": machine,
    }
    results = Results(args.out / "gpu_check.json", header)
    deadline = Deadline(args.minutes * 60)
    attention_race(args, device, results, deadline)
    for name in args.models:
        check_model(name, args, device, results, deadline)
    product_bench(args, device, results, deadline)
    # Last: a compile can take a minute; what the deadline leaves goes to the first model.
    check_model(args.models[0], args, device, results, deadline, compiled=True)
    results.data["skipped"] = deadline.skipped
    lab.write(args.out, "gpu_check", results.data, report)


if __name__ == "__main__":
    main()
