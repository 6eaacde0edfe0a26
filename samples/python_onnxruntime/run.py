"""Run an exported BSBR model (model.onnx) with ONNX Runtime only: no PyTorch, no bsbr_export.

    python run.py EXPORT_DIR ID [ID ...]               one sequence from the command line
    python run.py EXPORT_DIR --ids-file IDS.txt        one sequence per line, ids split by spaces
    python run.py EXPORT_DIR ... --out logits.npy      also write the logits [batch, sequence, vocab]

EXPORT_DIR is what `bsbr-export export MODEL --format onnx` wrote. The graph's sha256 is
checked against the directory's manifest.json before it is loaded, so a file that
changed after export (or a half-copied one) is refused. Lines of different lengths are
right-padded with attention_mask 0: only the logits at each line's own positions are
meaningful. For each sequence it prints the greedy next token (the argmax of the
logits at its last position).

Exit status: 0 ok, 2 bad input (one line on stderr). Needs `pip install onnxruntime numpy`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

MANIFEST = "manifest.json"
ARTIFACT = "model.onnx"


class SampleError(Exception):
    """Something wrong with what the user passed: one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a SampleError (one line) instead of usage + error."""

    def error(self, message: str):
        raise SampleError(f"{message} (see --help)")


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
        raise SampleError(f"{export_dir}/{MANIFEST} lists no {name} (it has {listed}): export with --format onnx")
    for file_name, record in artifact["files"].items():
        path = export_dir / file_name
        if not path.is_file():
            raise SampleError(f"{path} is listed in {MANIFEST} but missing: copy the whole export directory")
        if sha256(path) != record["sha256"]:
            raise SampleError(f"{path} does not match its sha256 in {MANIFEST}: it changed after export; re-export")
    return export_dir / name


def open_session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf types, all multi-line
        raise SampleError(f"{path} is not a loadable ONNX model: {str(exc).splitlines()[0]}") from None


def parse_ids(words: list[str], where: str) -> list[int]:
    ids = []
    for word in words:
        if not (word.isascii() and word.isdigit()):
            raise SampleError(f"token id {word!r} in {where} is not a non-negative integer: pass ids like 17 4 250")
        ids.append(int(word))
    return ids


def read_sequences(ids: list[str], ids_file: str | None) -> list[list[int]]:
    """One sequence from argv, or one per non-empty line of `ids_file`."""
    if ids and ids_file:
        raise SampleError("pass token ids on the command line or with --ids-file, not both")
    if ids:
        return [parse_ids(ids, "the command line")]
    if not ids_file:
        raise SampleError("no token ids: pass ids like `17 4 250` or --ids-file IDS.txt")
    try:
        lines = Path(ids_file).read_text().splitlines()
    except OSError as exc:
        raise SampleError(f"cannot read --ids-file {ids_file}: {exc.strerror}") from None
    sequences = [parse_ids(line.split(), f"{ids_file} line {n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not sequences:
        raise SampleError(f"{ids_file} holds no token ids: write one sequence per line")
    return sequences


def batch(sequences: list[list[int]], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded input_ids and attention_mask, both int64 [batch, longest]."""
    for ids in sequences:
        if max(ids) >= vocab_size:
            raise SampleError(f"token id {max(ids)} is out of range: this model's vocabulary is [0, {vocab_size})")
    length = max(len(ids) for ids in sequences)
    input_ids = np.zeros((len(sequences), length), dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def save_npy(array: np.ndarray, path: Path) -> None:
    """Write `array` to `path` via a temp file, so a failed run leaves no half-written file."""
    if not path.parent.is_dir():
        raise SampleError(f"cannot write {path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path, help="directory written by `bsbr-export export`")
    parser.add_argument("ids", nargs="*", help="token ids of one sequence")
    parser.add_argument("--ids-file", metavar="FILE", help="file with one sequence of space-separated ids per line")
    parser.add_argument(
        "--out", type=Path, metavar="FILE.npy", help="write the logits here as .npy (float32 [batch, sequence, vocab])"
    )
    parser.add_argument("--threads", type=int, metavar="N", help="ORT intra-op threads [default: all cores]")
    try:
        args = parser.parse_args(argv)
        manifest = load_manifest(args.export_dir)
        model_path = verified_artifact(args.export_dir, manifest, ARTIFACT)
        sequences = read_sequences(args.ids, args.ids_file)
        input_ids, attention_mask = batch(sequences, manifest["config"]["vocab_size"])
        session = open_session(model_path, args.threads)
        # "logits", or "hidden_states" for a model exported without its LM head
        output = session.get_outputs()[0].name
        (logits,) = session.run([output], {"input_ids": input_ids, "attention_mask": attention_mask})
        if args.out:
            save_npy(logits, args.out)
    except SampleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"logits {list(logits.shape)} {logits.dtype}" + (f" -> {args.out}" if args.out else ""))
    for row, ids in enumerate(sequences):
        last = logits[row, len(ids) - 1]
        print(f"sequence {row}: {len(ids)} tokens, next token {int(last.argmax())} (logit {last.max():.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
