"""Generation with an exported streaming BSBR graph, ONNX Runtime only.

    python generate.py EXPORT_DIR ID [ID ...] --max-new-tokens 32
    python generate.py EXPORT_DIR --prompt-file PROMPT.txt --out result.json
    python generate.py EXPORT_DIR --text "def main(" --max-new-tokens 60   # byte-level models
    python generate.py EXPORT_DIR --text "import " --temperature 0.8 --top-k 40 --seed 1

EXPORT_DIR is what `bsbr-export export MODEL --format onnx --streaming` wrote. The prompt
goes in with one call; then each call feeds one token and the state the previous call
returned. It runs model.decode.onnx when the export has it (else model.streaming.onnx):
that graph returns only what a step changed, the current chunk's `present.*` state and
the `new.*` rows of chunks it finished (usually none), which are appended here, so a
token costs the same at any context length. The state stays in ORT-owned OrtValues,
bound (IOBinding) as the next call's `past.*` inputs; only an append, once per chunk,
goes through numpy. Only the logits of the last position
come back to pick the next token: the most likely (greedy, the default), or with
--temperature T > 0 a draw from softmax(logits / T), over the --top-k most likely when
given, from a numpy generator seeded by --seed (the same seed gives the same tokens).

Tokens are printed as they come, then the prefill time and the per-token latency (one
call per token, after the prompt) as median and p90. --out writes the prompt, the
generated ids and every latency as JSON.

Exit status: 0 ok, 2 bad input (one line on stderr). Needs `pip install onnxruntime numpy`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

MANIFEST = "manifest.json"
ARTIFACTS = ("model.decode.onnx", "model.streaming.onnx")  # preferred first


class SampleError(Exception):
    """Something wrong with what the user passed: one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a SampleError (one line) instead of usage + error."""

    def error(self, message: str):
        raise SampleError(f"{message} (see --help)")


# The manifest checks are the same as samples/python_onnxruntime/run.py's: each sample
# stays one self-contained file that a user can copy out.


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(export_dir: Path) -> dict:
    """The export's manifest.json, parsed."""
    if not export_dir.is_dir():
        raise SampleError(f"{export_dir} is not a directory: pass the directory `bsbr-export export` wrote")
    path = export_dir / MANIFEST
    if not path.is_file():
        raise SampleError(f"{export_dir} has no {MANIFEST}: is it an export directory? (run `bsbr-export export`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SampleError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise SampleError(f"{path} is not a bsbr-export manifest (no 'artifacts' list)")
    return manifest


def verified_artifact(export_dir: Path, manifest: dict, name: str) -> Path:
    """`export_dir/name`, after every file of that artifact (the graph, and its external
    weights when there are any) matched the sha256 the manifest records."""
    artifact = next((a for a in manifest["artifacts"] if a.get("name") == name), None)
    if artifact is None:
        listed = ", ".join(a.get("name", "?") for a in manifest["artifacts"]) or "nothing"
        raise SampleError(
            f"{export_dir}/{MANIFEST} lists no {name} (it has {listed}): export with --format onnx --streaming"
        )
    for file_name, record in artifact["files"].items():
        path = export_dir / file_name
        if not path.is_file():
            raise SampleError(f"{path} is listed in {MANIFEST} but missing: copy the whole export directory")
        if sha256(path) != record["sha256"]:
            raise SampleError(f"{path} does not match its sha256 in {MANIFEST}: it changed after export; re-export")
    return export_dir / name


class StreamingSession:
    """A streaming graph for one sequence, its state held in ORT-owned OrtValues.

    `step(ids)` feeds the next tokens and returns the logits of the last one. Outputs are
    bound to CPU memory that ORT allocates at run time (the state grows, so no buffer can
    be preallocated), and the output bindings are renewed before every call so that ORT
    never writes into a buffer that is now bound as an input.
    """

    def __init__(self, path: Path, state_shapes: dict[str, list], threads: int | None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf types, all multi-line
            raise SampleError(f"{path} is not a loadable ONNX model: {str(exc).splitlines()[0]}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.output_names[0] != "logits":
            raise SampleError(
                f"{path} outputs {self.output_names[0]}, not logits: generation needs a model with its LM head"
            )
        self.binding = self.session.io_binding()
        # The empty state: zeros with batch 1 and no past chunks or tokens. `past` keeps
        # the arrays that decode-graph appends grow (finished chunks' keys and states).
        self.past = {}
        for name in (i.name for i in self.session.get_inputs() if i.name != "input_ids"):
            shape = [1 if dim == "batch" else 0 if isinstance(dim, str) else dim for dim in state_shapes[name]]
            self.past[name] = np.zeros(shape, np.float32)
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(self.past[name]))

    def step(self, ids: np.ndarray) -> np.ndarray:
        """ids int64 [1, new_tokens] -> the logits [vocab] at the last new token."""
        self.binding.bind_cpu_input("input_ids", ids)
        self.binding.clear_binding_outputs()
        for name in self.output_names:
            self.binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(self.binding)
        logits, *outputs = self.binding.get_outputs()
        for name, value in zip(self.output_names[1:], outputs):
            if name.startswith("present."):
                self.binding.bind_ortvalue_input(name.replace("present.", "past.", 1), value)
            elif value.shape()[2]:  # new.*: chunks this step finished, appended to the past
                past = name.replace("new.", "past.", 1)
                self.past[past] = np.concatenate([self.past[past], value.numpy()], axis=2)
                self.binding.bind_ortvalue_input(past, ort.OrtValue.ortvalue_from_numpy(self.past[past]))
        return logits.numpy()[0, -1]


def parse_ids(words: list[str], where: str) -> list[int]:
    ids = []
    for word in words:
        if not (word.isascii() and word.isdigit()):
            raise SampleError(f"token id {word!r} in {where} is not a non-negative integer: pass ids like 17 4 250")
        ids.append(int(word))
    return ids


def read_prompt(ids: list[str], prompt_file: str | None, vocab_size: int) -> list[int]:
    """The prompt's token ids, from argv or from a file of space-separated ids."""
    if ids and prompt_file:
        raise SampleError("pass the prompt on the command line or with --prompt-file, not both")
    if prompt_file:
        try:
            prompt = parse_ids(Path(prompt_file).read_text().split(), prompt_file)
        except OSError as exc:
            raise SampleError(f"cannot read --prompt-file {prompt_file}: {exc.strerror}") from None
    else:
        prompt = parse_ids(ids, "the command line")
    if not prompt:
        raise SampleError("no prompt: pass token ids like `17 4 250` or --prompt-file PROMPT.txt")
    if max(prompt) >= vocab_size:
        raise SampleError(f"token id {max(prompt)} is out of range: this model's vocabulary is [0, {vocab_size})")
    return prompt


def show_id(token: int) -> None:
    print(token, end=" ", flush=True)


def show_byte(token: int) -> None:
    # A byte-level model's token is one UTF-8 byte: write it raw, so multi-byte
    # characters come out whole once their last byte arrives.
    sys.stdout.buffer.write(bytes([token]))
    sys.stdout.flush()


def text_prompt(text: str, manifest: dict) -> list[int]:
    """--text: the prompt's UTF-8 bytes, for a byte-level model (spec tokenizer "bytes")."""
    if (manifest.get("spec") or {}).get("tokenizer") != "bytes":
        raise SampleError("--text needs a byte-level model (its spec's tokenizer is \"bytes\"); pass token ids instead")
    if not text:
        raise SampleError("--text is empty")
    return list(text.encode("utf-8"))


def pick(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """The next token: the most likely when `temperature` is 0, else a draw from
    softmax(logits / temperature) over the `top_k` most likely (all when None)."""
    logits = np.asarray(logits, dtype=np.float64).ravel()
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits / temperature
    if top_k:
        scaled = np.where(scaled >= np.sort(scaled)[-top_k], scaled, -np.inf)
    weights = np.exp(scaled - scaled.max())
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def generate(session: StreamingSession, prompt: list[int], max_new_tokens: int, show=show_id,
             temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0) -> tuple[list[int], float, list[float]]:
    """Decode `max_new_tokens` after `prompt` (see `pick`): (new token ids, prefill
    seconds, seconds of each one-token call)."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    logits = session.step(np.array([prompt], dtype=np.int64))
    prefill = time.perf_counter() - start
    tokens, latencies = [], []
    while True:
        token = pick(logits, temperature, top_k, rng)
        tokens.append(token)
        show(token)
        if len(tokens) == max_new_tokens:
            break
        start = time.perf_counter()
        logits = session.step(np.array([[token]], dtype=np.int64))
        latencies.append(time.perf_counter() - start)
    print()
    return tokens, prefill, latencies


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
    parser.add_argument("export_dir", type=Path, help="directory written by `bsbr-export export ... --streaming`")
    parser.add_argument("ids", nargs="*", help="token ids of the prompt")
    parser.add_argument("--prompt-file", metavar="FILE", help="file with the prompt's token ids, split by spaces")
    parser.add_argument("--text", metavar="PROMPT", help="a text prompt, for byte-level models: output is text too")
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="tokens to generate [default: 20]")
    parser.add_argument("--out", type=Path, metavar="FILE.json", help="write prompt, generated ids and latencies here")
    parser.add_argument("--threads", type=int, metavar="N", help="ORT intra-op threads [default: all cores]")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sample from softmax(logits / T); 0 = greedy [default: 0]")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator [default: 0]")
    try:
        args = parser.parse_args(argv)
        if args.max_new_tokens < 1:
            raise SampleError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if not args.temperature >= 0:  # also refuses nan
            raise SampleError(f"--temperature must be >= 0, got {args.temperature}")
        if args.top_k is not None and args.top_k < 1:
            raise SampleError(f"--top-k must be >= 1, got {args.top_k}")
        manifest = load_manifest(args.export_dir)
        listed = {a.get("name") for a in manifest["artifacts"]}
        name = next((n for n in ARTIFACTS if n in listed), ARTIFACTS[-1])
        model_path = verified_artifact(args.export_dir, manifest, name)
        if args.text is not None and (args.ids or args.prompt_file):
            raise SampleError("pass --text or token ids, not both")
        if args.text is not None:
            prompt = text_prompt(args.text, manifest)
        else:
            prompt = read_prompt(args.ids, args.prompt_file, manifest["config"]["vocab_size"])
        session = StreamingSession(model_path, manifest["state"]["inputs"], args.threads)
        if args.text is not None:
            print(args.text, end="", flush=True)
        tokens, prefill, latencies = generate(session, prompt, args.max_new_tokens,
                                              show_byte if args.text is not None else show_id,
                                              args.temperature, args.top_k, args.seed)
        if args.out:
            write_json({"prompt": prompt, "generated": tokens, "prefill_ms": prefill * 1e3,
                        "token_ms": [s * 1e3 for s in latencies], "temperature": args.temperature,
                        "top_k": args.top_k, "seed": args.seed}, args.out)
    except SampleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"prompt {len(prompt)} tokens: prefill {prefill * 1e3:.2f} ms")
    if latencies:
        ms = sorted(s * 1e3 for s in latencies)
        p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
        print(f"{len(tokens)} new tokens: per-token latency median {statistics.median(ms):.3f} ms, "
              f"p90 {p90:.3f} ms ({1e3 / statistics.median(ms):.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
