"""Greedy generation from a Triton Inference Server: the prompt goes in as a sequence.

Talks to a `<model>_streaming_python` model served by `bsbr-export serve` (or any Triton
with the Python backend), over HTTP or gRPC with tritonclient. The first request carries
the whole prompt with sequence_start; each later one carries the token just picked
(argmax of the last position's logits) under the same sequence id; the one whose answer
gives the last token carries sequence_end, which frees the sequence's state on the
server. The server keeps the state between requests, so each request is one token.

Tokens are printed as they come, then the prefill time and the per-token latency (median
and p90). --out writes the prompt, the generated ids and every latency as JSON.

Exit status: 0 ok, 2 bad input or a server error (one line on stderr).
Needs `pip install "tritonclient[http,grpc]" numpy`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}


class SampleError(Exception):
    """Something wrong with what the user passed or the server said: one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a SampleError (one line) instead of usage + error."""

    def error(self, message: str):
        raise SampleError(f"{message} (see --help)")


class Sequence:
    """One sequence on a Triton streaming model: `step(ids, end)` -> last position's logits."""

    def __init__(self, protocol: str, url: str, model: str, sequence_id: int) -> None:
        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
        from tritonclient.utils import InferenceServerException

        self.client_module, self.errors = client, (InferenceServerException, OSError)
        self.client = client.InferenceServerClient(url)
        self.model, self.sequence_id, self.started = model, sequence_id, False
        try:
            ready = self.client.is_model_ready(model)
        except self.errors as exc:
            raise SampleError(f"cannot reach Triton at {url} ({protocol}): {_message(exc)}") from None
        if not ready:
            raise SampleError(
                f"model {model} is not ready on {url}: is it a <model>_streaming_python model "
                "that `bsbr-export serve` loaded?"
            )

    def step(self, ids: list[int], end: bool) -> np.ndarray:
        tensor = self.client_module.InferInput("input_ids", [1, len(ids)], "INT64")
        tensor.set_data_from_numpy(np.array([ids], dtype=np.int64))
        try:
            result = self.client.infer(
                self.model,
                [tensor],
                outputs=[self.client_module.InferRequestedOutput("logits")],
                sequence_id=self.sequence_id,
                sequence_start=not self.started,
                sequence_end=end,
            )
        except self.errors as exc:
            raise SampleError(f"{self.model} refused the request: {_message(exc)}") from None
        self.started = True
        return result.as_numpy("logits")[0, -1]


def _message(exc: Exception) -> str:
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return " ".join(str(text).split())


def generate(sequence: Sequence, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float, list[float]]:
    """Greedy decoding: (new token ids, prefill seconds, seconds of each one-token request)."""
    start = time.perf_counter()
    logits = sequence.step(prompt, end=max_new_tokens == 1)
    prefill = time.perf_counter() - start
    tokens, latencies = [], []
    while True:
        token = int(logits.argmax())
        tokens.append(token)
        print(token, end=" ", flush=True)
        if len(tokens) == max_new_tokens:
            break
        start = time.perf_counter()
        # The request whose answer gives the last token ends the sequence: no extra call.
        logits = sequence.step([token], end=len(tokens) + 1 == max_new_tokens)
        latencies.append(time.perf_counter() - start)
    print()
    return tokens, prefill, latencies


def read_prompt(ids: list[str], prompt_file: str | None) -> list[int]:
    """The prompt's token ids, from argv or a file of space-separated ids (the server checks the range)."""
    if ids and prompt_file:
        raise SampleError("pass the prompt on the command line or with --prompt-file, not both")
    if prompt_file:
        try:
            ids = Path(prompt_file).read_text().split()
        except OSError as exc:
            raise SampleError(f"cannot read --prompt-file {prompt_file}: {exc.strerror}") from None
    for word in ids:
        if not (word.isascii() and word.isdigit()):
            raise SampleError(f"token id {word!r} is not a non-negative integer: pass ids like 17 4 250")
    if not ids:
        raise SampleError("no prompt: pass token ids like `17 4 250` or --prompt-file PROMPT.txt")
    return [int(word) for word in ids]


# write_json and the latency summary in main() are samples/streaming/generate.py's: each
# sample stays one self-contained file that a user can copy out.


def write_json(data: dict, path: Path) -> None:
    """Write `data` to `path` via a temp file, so a failed run leaves no half-written file."""
    if not path.parent.is_dir():
        raise SampleError(f"cannot write {path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the streaming model's name, e.g. bsbr-small_streaming_python")
    parser.add_argument("ids", nargs="*", help="token ids of the prompt")
    parser.add_argument("--protocol", choices=sorted(DEFAULT_URLS), default="http", help="[default: http]")
    parser.add_argument("--url", help="host:port [default: 127.0.0.1:8000 for http, :8001 for grpc]")
    parser.add_argument("--prompt-file", metavar="FILE", help="file with the prompt's token ids, split by spaces")
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="tokens to generate [default: 20]")
    parser.add_argument("--sequence-id", type=int, metavar="ID", help="correlation id >= 1 [default: random]")
    parser.add_argument("--out", type=Path, metavar="FILE.json", help="write prompt, generated ids and latencies here")
    try:
        args = parser.parse_args(argv)
        if args.max_new_tokens < 1:
            raise SampleError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.sequence_id is not None and not 1 <= args.sequence_id < 2**63:
            raise SampleError(f"--sequence-id must be in [1, 2**63), got {args.sequence_id}")
        prompt = read_prompt(args.ids, args.prompt_file)
        # Sequence ids must differ between clients of one server: draw one unless given.
        sequence_id = args.sequence_id or random.SystemRandom().randrange(1, 2**63)
        sequence = Sequence(args.protocol, args.url or DEFAULT_URLS[args.protocol], args.model, sequence_id)
        tokens, prefill, latencies = generate(sequence, prompt, args.max_new_tokens)
        if args.out:
            write_json(
                {
                    "prompt": prompt,
                    "generated": tokens,
                    "prefill_ms": prefill * 1e3,
                    "token_ms": [s * 1e3 for s in latencies],
                },
                args.out,
            )
    except SampleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"prompt {len(prompt)} tokens: prefill {prefill * 1e3:.2f} ms")
    if latencies:
        ms = sorted(s * 1e3 for s in latencies)
        p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
        print(
            f"{len(tokens)} new tokens: per-token latency median {statistics.median(ms):.3f} ms, "
            f"p90 {p90:.3f} ms ({1e3 / statistics.median(ms):.0f} tokens/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
