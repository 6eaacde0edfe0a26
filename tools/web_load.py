"""The web page (`--format web`) in headless Chromium beside native onnxruntime, on the
same graphs: per-token latency and tokens/s at two contexts, page load time and bytes.

    python tools/web_load.py [--models bsbr-tiny,bsbr-small,bsbr-stdlib] [--contexts 256,4096]
        [--tokens 32] [--out tools/results] [--smoke]

Each model is exported with `--format web` into a temp dir. For each context
a random prompt of that many tokens goes in (prefill, timed apart), then `--tokens` greedy
tokens; the figure is the median per-token call. Engines, each in its own process:
Chromium (Debian's, driven by puppeteer-core through web/drive.mjs) on wasm with one thread
(page served without cross-origin isolation), on wasm with threads (isolated), and on
WebGPU (Chromium's SwiftShader adapter: the CPU; the row step there, the decode step on
wasm; the page falls back to wasm when WebGPU cannot run the row step, and the reason is
recorded); native onnxruntime on the page's own
graphs with 1 and 2 threads, called as the page calls them. ORT's float32 MatMul rate is measured in the same run.
Writes web_load.json and .md to --out. No number is asserted. `--smoke`: bsbr-tiny, context 20, 4 tokens.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lab
import numpy as np

from bsbr_export.defaults import DEFAULT_THREADS

HERE = Path(__file__).resolve().parent

DRIVER = HERE.parent / "web" / "drive.mjs"


def native(web: str, context: int, tokens: int, threads: int) -> dict:
    """In a child process: greedy generation on native onnxruntime over the page's own graphs, the way
    the page runs them (runtime.batching.Sequences: the row step for a token that leaves
    its chunk open, the decode step for the prompt and chunk-closing tokens)."""
    from bsbr_export.runtime.batching import Sequences

    web = Path(web)
    sequences = Sequences(web.parent, threads=threads, capacity=1, graphs="web")
    prompt = np.random.default_rng(context).integers(0, sequences.spec.tokens.high, context).tolist()
    start = time.perf_counter()
    logits = sequences.open(0, prompt)[-1]
    seconds = [time.perf_counter() - start]
    for _ in range(tokens):
        start = time.perf_counter()
        logits = sequences.feed({0: [int(logits.argmax())]})[0][-1]
        seconds.append(time.perf_counter() - start)
    return {"prefill_ms": seconds[0] * 1e3, "token_ms": statistics.median(seconds[1:]) * 1e3}


def browser(web: Path, context: int, tokens: int, backend: str, isolated: bool) -> dict:
    from bsbr_export.serve.web import page_server, serve_in_thread

    server = page_server(web, 0, isolated=isolated)
    serve_in_thread(server)
    prompt = (
        np.random.default_rng(context)
        .integers(0, json.loads((web / "web.json").read_text())["vocab_size"], context)
        .tolist()
    )
    try:
        done = subprocess.run(
            [
                "node",
                str(DRIVER),
                f"http://127.0.0.1:{server.server_address[1]}/",
                json.dumps({"prompt": prompt, "tokens": tokens + 1, "backend": backend}),
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            env={**os.environ, "BSBR_WEBGPU": "1" if backend == "webgpu" else "0"},
        )
    finally:
        server.shutdown()
        server.server_close()
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        key: result.get(key)
        for key in (
            "prefill_ms",
            "token_ms",
            "tokens_per_s",
            "backend",
            "threads",
            "note",
            "load_ms",
            "transferred_bytes",
            "error",
        )
    }


def measure(model: str, contexts: list[int], tokens: int) -> dict:
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    with tempfile.TemporaryDirectory(prefix="web-load-") as tmp:  # the exports are large: none is left behind
        out = Path(tmp) / model
        export_model(model, out, [FORMATS["web"]])  # the page's streaming graphs come with the format
        web = out / "web"
        rows = []
        for context in contexts:
            row = {"context": context}
            for threads in (1, 2):
                row[f"native_{threads}"] = lab.in_child(native, str(web), context, tokens, threads)
            row["wasm_1"] = browser(web, context, tokens, "wasm", isolated=False)
            row["wasm_threads"] = browser(web, context, tokens, "wasm", isolated=True)
            row["webgpu"] = browser(web, context, tokens, "webgpu", isolated=False)
            print(f"{model} {context}: {json.dumps(row)}", file=sys.stderr)
            rows.append(row)
        size = sum(f.stat().st_size for f in web.rglob("*") if f.is_file())
    return {"model": model, "rows": rows, "web_bytes": size}


def report(result: dict) -> str:
    machine = result["machine"]
    lines = [
        *lab.heading("The web page in headless Chromium beside native onnxruntime", machine),
        "Chromium "
        f"{machine['chromium']}, onnxruntime-web 1.31.1; native onnxruntime {machine['onnxruntime']} on the "
        "page's own opset-18 graphs, called as the page calls them (the row step for a token that leaves its "
        "chunk open, the decode step for the prompt and chunk-closing tokens). "
        f"Greedy, {result['tokens']} tokens after a random prompt of `context` tokens; "
        "ms per token is the median call, prefill the prompt's one call. WebGPU is Chromium's SwiftShader "
        "adapter (no GPU here: it emulates the GPU on the CPU, so its figures say the page runs there, not how "
        "fast a GPU is); WebGPU runs the row step, the decode step stays on wasm.",
        "",
    ]
    fallbacks: set[str] = set()
    for model in result["results"]:
        lines += [
            f"## {model['model']}",
            "",
            f"web/ holds {model['web_bytes'] / 1e6:.1f} MB (graphs, page, onnxruntime-web's wasm and WebGPU builds).",
            "",
            "| context | engine | ms/token | tokens/s | prefill ms | vs native 1 thread | page load ms "
            "| bytes loaded |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in model["rows"]:
            base = row["native_1"]["token_ms"]
            for name, label in (
                ("native_1", "native ORT, 1 thread"),
                ("native_2", "native ORT, 2 threads"),
                ("wasm_1", "Chromium wasm, 1 thread"),
                ("wasm_threads", "Chromium wasm, threaded"),
                ("webgpu", "Chromium WebGPU"),
            ):
                r = row[name]
                if r.get("error"):
                    lines.append(f"| {row['context']} | {label} | failed: {r['error']} | | | | | |")
                    continue
                if name == "webgpu" and r.get("backend") != "webgpu":
                    label += " (fell back to wasm, see below)"
                    fallbacks.add(r.get("note"))
                if name == "wasm_threads":
                    label = f"Chromium wasm, {r.get('threads')} threads"
                load = f"{r['load_ms']:.0f}" if r.get("load_ms") is not None else ""
                loaded = f"{r['transferred_bytes'] / 1e6:.1f} MB" if r.get("transferred_bytes") else ""
                lines.append(
                    f"| {row['context']} | {label} | {r['token_ms']:.2f} | {1e3 / r['token_ms']:.0f} | "
                    f"{r['prefill_ms']:.1f} | {r['token_ms'] / base:.2f}x | {load} | {loaded} |"
                )
        lines.append("")
    lines += [line for note in sorted(filter(None, fallbacks)) for line in (f"WebGPU: {note}", "")]
    return "\n".join(lines)


def main() -> None:
    parser = lab.parser(__doc__, models="bsbr-tiny,bsbr-small,bsbr-stdlib")
    parser.add_argument("--contexts", default="256,4096")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    if args.smoke:
        args.models, args.contexts, args.tokens = "bsbr-tiny", "20", 4
    import onnxruntime

    results = [measure(m, [int(c) for c in args.contexts.split(",")], args.tokens) for m in args.models.split(",")]
    chromium = subprocess.run(["chromium", "--version"], capture_output=True, text=True).stdout.split()[1]
    machine = {**lab.machine(threads=DEFAULT_THREADS), "chromium": chromium, "onnxruntime": onnxruntime.__version__}
    result = {"machine": machine, "tokens": args.tokens, "results": results}
    lab.write(args.out, "web_load", result, report)


if __name__ == "__main__":
    main()
