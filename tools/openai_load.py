"""The OpenAI-compatible server under load, measured by NVIDIA's `aiperf` (a client nobody
here wrote): time to first token, inter-token latency and tokens/s at each concurrency.

    python3 -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf==0.13.0   # once
    python tools/openai_load.py [--model bsbr-stdlib | --export DIR] [--concurrency 1,4,16,32,64]
        [--input-tokens 256] [--output-tokens 64] [--aiperf .venv-aiperf/bin/aiperf] [--out tools/results] [--smoke]

`bsbr-export serve-openai` runs on core 0 (one ORT thread) and aiperf on core 1, pinned
with `taskset`. For every concurrency aiperf keeps that many streamed `/v1/completions`
in flight (synthetic prompts of `--input-tokens`, `--output-tokens` new tokens each,
`ignore_eos`), for max(16, 4 x concurrency) requests. aiperf counts tokens with a
tokenizer: this tool writes a byte-level one (a token is a UTF-8 byte, as bsbr-stdlib's)
into a temporary directory, so nothing is downloaded. Writes openai_load.{json,md} to
--out; nothing asserted. `--smoke`: concurrency 1 and 2, 8-token prompts, 4 new tokens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import lab
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from bsbr_export.serve.openai import OpenAIServerProcess

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, CLIENT_CORE = "0", "1"
SETUP = "python3 -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf==0.13.0"


def byte_tokenizer(directory: Path) -> Path:
    """A Hugging Face tokenizer directory whose token ids are UTF-8 bytes (GPT-2's byte to
    character map, no merges), for aiperf's token counts."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {b: chr(b) for b in printable}
    extra = iter(range(256, 512))
    for b in range(256):
        characters.setdefault(b, chr(next(extra)))
    tokenizer = Tokenizer(models.BPE(vocab={characters[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    sample = "def é(x):\n\treturn x"
    if tokenizer.encode(sample).ids != list(sample.encode()):
        raise SystemExit("the byte-level tokenizer does not map bytes to their own ids")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return directory


def profile(aiperf: str, url: str, model: str, tokenizer: Path, concurrency: int, args, work: Path) -> dict:
    """One aiperf run at `concurrency` (max(`args.requests`, 4 x concurrency) requests); its figures."""
    artifacts = work / f"c{concurrency}"
    command = ["taskset", "-c", CLIENT_CORE, aiperf, "profile", "--model", model, "--url", url]
    command += ["--endpoint-type", "completions", "--streaming", "--tokenizer", str(tokenizer), "--ui-type", "none"]
    command += ["--concurrency", str(concurrency), "--request-count", str(max(args.requests, 4 * concurrency))]
    command += ["--synthetic-input-tokens-mean", str(args.input_tokens), "--synthetic-input-tokens-stddev", "0"]
    command += ["--output-tokens-mean", str(args.output_tokens), "--output-tokens-stddev", "0"]
    command += ["--extra-inputs", "ignore_eos:true", "--use-server-token-count", "--artifact-dir", str(artifacts)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"aiperf failed at concurrency {concurrency}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    figures = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    return {
        "concurrency": concurrency,
        "requests": figures["request_count"]["avg"],
        "errors": (figures.get("error_summary") or []),
        "ttft_p50_ms": figures["time_to_first_token"]["p50"],
        "ttft_p99_ms": figures["time_to_first_token"]["p99"],
        "itl_p50_ms": figures["inter_token_latency"]["p50"],
        "itl_p99_ms": figures["inter_token_latency"]["p99"],
        "tokens_s": figures["output_token_throughput"]["avg"],
    }


def report(result: dict) -> str:
    machine = result["machine"]
    rows = result["levels"]
    one = next((r for r in rows if r["concurrency"] == 1), None)
    lines = [
        *lab.heading(f"`serve-openai` under aiperf: {result['model']}", machine),
        "The server on core "
        f"{SERVER_CORE} with one ORT thread, aiperf {result['aiperf_version']} on core {CLIENT_CORE}. Streamed "
        f"`/v1/completions`, prompts of {result['input_tokens']} tokens, {result['output_tokens']} new tokens each "
        "(`ignore_eos`), token counts from the server's `usage`. One run per concurrency.",
        "",
        "| concurrency | requests | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | tokens/s | vs one |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['tokens_s'] / one['tokens_s']:.1f}x" if one else "-"
        lines.append(
            f"| {r['concurrency']} | {r['requests']:.0f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
            f"{r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} | {r['tokens_s']:.0f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = lab.parser(__doc__, model="bsbr-stdlib", export="serve (with --streaming)")
    parser.add_argument("--concurrency", default="1,4,16,32,64")
    parser.add_argument("--input-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--aiperf", default=None, help="the aiperf command [default: .venv-aiperf/bin/aiperf, PATH]")
    args = parser.parse_args()
    args.requests = 16
    if args.smoke:
        args.concurrency, args.input_tokens, args.output_tokens, args.requests = "1,2", 8, 4, 4
    aiperf = args.aiperf or next(
        (p for p in (str(ROOT / ".venv-aiperf" / "bin" / "aiperf"), shutil.which("aiperf")) if p and Path(p).exists()),
        None,
    )
    if aiperf is None:
        raise SystemExit(f"aiperf not found: {SETUP}")
    export_dir = lab.streaming_export(args.model, args.export, "openai_load")
    version = subprocess.run([aiperf, "--version"], capture_output=True, text=True).stdout.strip()
    machine = lab.machine(threads=1)
    with tempfile.TemporaryDirectory() as tmp, OpenAIServerProcess(export_dir, options=["--threads", "1"]) as server:
        subprocess.run(["taskset", "-a", "-cp", SERVER_CORE, str(server.pid)], capture_output=True, check=True)
        tokenizer = byte_tokenizer(Path(tmp) / "tokenizer")
        model = json.loads((export_dir / "manifest.json").read_text())["model"]
        levels = []
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            levels.append(profile(aiperf, server.url, model, tokenizer, concurrency, args, Path(tmp)))
            print(json.dumps(levels[-1]), file=sys.stderr, flush=True)
    result = {
        "model": model,
        "input_tokens": args.input_tokens,
        "output_tokens": args.output_tokens,
        "aiperf_version": version,
        "machine": machine,
        "levels": levels,
    }
    lab.write(args.out, "openai_load", result, report)


if __name__ == "__main__":
    main()
