"""Generation with an exported streaming BSBR graph: a command line over bsbr-export's
Python API (`bsbr_export.runtime.generate`).

    python generate.py EXPORT_DIR ID [ID ...] --max-new-tokens 32
    python generate.py EXPORT_DIR --prompt-file PROMPT.txt --out result.json
    python generate.py EXPORT_DIR --text "def main(" --max-new-tokens 60   # models with a tokenizer
    python generate.py EXPORT_DIR --text "import " --temperature 0.8 --top-k 40 --seed 1

EXPORT_DIR is what `bsbr-export export MODEL --format onnx --streaming` wrote. The prompt
goes in with one call; then each call feeds one token and the state the previous call
returned, through model.decode.onnx when the export has it (else model.streaming.onnx):
that graph returns only what a step changed, so a token costs the same at any context.
--text works for byte-level models (bsbr-stdlib) and exports that carry a tokenizer.json
(a Hugging Face model directory's). The next token is the most likely (greedy, the
default), or with --temperature T > 0 a draw from softmax(logits / T), over the --top-k
most likely and the --top-p nucleus when given, seeded by --seed. --engine runs another
engine the export holds a decode graph for (e.g. torchscript).

Tokens are printed as they come, then the prefill time and the per-token latency (one
call per token, after the prompt) as median and p90. --out writes the prompt, the
generated ids and every latency as JSON.

Exit status: 0 ok, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bsbr_export.errors import UserError
from bsbr_export.io import atomic_write
from bsbr_export.runtime.generate import DEFAULT_ENGINE, load_generator


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError (one line) instead of usage + error."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def parse_ids(words: list[str], where: str) -> list[int]:
    ids = []
    for word in words:
        if not (word.isascii() and word.isdigit()):
            raise UserError(f"token id {word!r} in {where} is not a non-negative integer: pass ids like 17 4 250")
        ids.append(int(word))
    return ids


def read_prompt(args) -> str | list[int]:
    """The prompt: --text, or token ids from argv or from a file of space-separated ids."""
    given = [
        name
        for name, value in (
            ("token ids", args.ids),
            ("--prompt-file", args.prompt_file),
            ("--text", args.text is not None),
        )
        if value
    ]
    if len(given) > 1:
        raise UserError(f"pass one prompt: {' and '.join(given)} given")
    if args.text is not None:
        return args.text
    if args.prompt_file:
        try:
            return parse_ids(Path(args.prompt_file).read_text().split(), args.prompt_file)
        except OSError as exc:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror}") from None
    if not args.ids:
        raise UserError("no prompt: pass token ids like `17 4 250`, --prompt-file PROMPT.txt or --text")
    return parse_ids(args.ids, "the command line")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path, help="directory written by `bsbr-export export ... --streaming`")
    parser.add_argument("ids", nargs="*", help="token ids of the prompt")
    parser.add_argument("--prompt-file", metavar="FILE", help="file with the prompt's token ids, split by spaces")
    parser.add_argument(
        "--text", metavar="PROMPT", help="a text prompt (byte-level models, or a tokenizer.json): output is text too"
    )
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="tokens to generate [default: 20]")
    parser.add_argument("--out", type=Path, metavar="FILE.json", help="write prompt, generated ids and latencies here")
    parser.add_argument("--threads", type=int, metavar="N", help="ORT intra-op threads [default: all cores]")
    parser.add_argument("--engine", default=DEFAULT_ENGINE, help=f"engine to run [default: {DEFAULT_ENGINE}]")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="sample from softmax(logits / T); 0 = greedy [default: 0]",
    )
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens only")
    parser.add_argument("--top-p", type=float, metavar="P", help="sample among the most likely tokens up to mass P")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator [default: 0]")
    try:
        args = parser.parse_args(argv)
        prompt = read_prompt(args)
        generator = load_generator(args.export_dir, args.engine, args.threads)
        tokens = generator.generate(
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stream=True,
        )
        text = isinstance(prompt, str)
        if text:
            print(prompt, end="", flush=True)
        generated, seconds = [], []
        for token in tokens:  # printed as they come: the text a token completes, or its id
            print(token.text if text else token.id, end="" if text else " ", flush=True)
            generated.append(token.id)
            seconds.append(token.seconds)
        print()
        prefill, latencies = seconds[0], seconds[1:]
        if args.out:
            with atomic_write(args.out) as tmp:
                tmp.write_text(
                    json.dumps(
                        {
                            "prompt": generator.encode(prompt),
                            "generated": generated,
                            "prefill_ms": prefill * 1e3,
                            "token_ms": [s * 1e3 for s in latencies],
                            "engine": args.engine,
                            "graph": generator.kind,
                            "temperature": args.temperature,
                            "top_k": args.top_k,
                            "top_p": args.top_p,
                            "seed": args.seed,
                        }
                    )
                )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"prompt {len(generator.encode(prompt))} tokens: prefill {prefill * 1e3:.2f} ms")
    if latencies:
        ms = sorted(s * 1e3 for s in latencies)
        p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
        print(
            f"{len(generated)} new tokens: per-token latency median {statistics.median(ms):.3f} ms, "
            f"p90 {p90:.3f} ms ({1e3 / statistics.median(ms):.0f} tokens/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
