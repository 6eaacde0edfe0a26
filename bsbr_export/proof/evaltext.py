"""Held-out text and bits per byte: the accuracy figure of a byte-level language model.

A byte-level model reads UTF-8 bytes as token ids (vocabulary 256). Its text comes from
CPython's standard library, which every machine running this package has. The split is a
fixed rule on each file's path relative to the stdlib root, so every machine draws the
same files without a file list: a file is held out when CRC-32 of that path is 0 mod
HELDOUT_EVERY. Training (`tools/train.py`) never reads a held-out file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sysconfig
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bsbr_export.defaults import EVAL_WINDOW
from bsbr_export.errors import UserError

BYTE_VOCAB = 256
HELDOUT_EVERY = 20  # one file in 20 held out
DEFAULT_EVAL_BYTES = 32 * 1024  # what validate/optimize/bench score by default: seconds, not minutes


def stdlib_root() -> Path:
    """The running interpreter's standard-library source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative: str) -> bool:
    """Whether the stdlib file at `relative` (a POSIX path under the root) is held out."""
    return zlib.crc32(relative.encode()) % HELDOUT_EVERY == 0


def stdlib_split(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every `.py` under the stdlib, sorted by path,
    installed packages (site-packages) excluded."""
    root = root or stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    train, heldout = [], []
    for path in files:
        (heldout if is_heldout(path.relative_to(root).as_posix()) else train).append(path)
    return train, heldout


def read_corpus(files: list[Path], limit: int | None = None) -> bytes:
    """The files' bytes joined by newlines (files that are not UTF-8 are skipped), up to
    `limit` bytes."""
    parts, size = [], 0
    for path in files:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        parts.append(data)
        size += len(data) + 1
        if limit is not None and size >= limit:
            break
    return b"\n".join(parts)[:limit]


def heldout_text(limit: int = DEFAULT_EVAL_BYTES) -> bytes:
    """The first `limit` bytes of the held-out stdlib files (the default evaluation text)."""
    return read_corpus(stdlib_split()[1], limit)


def read_eval_text(path: str | os.PathLike | None, limit: int = DEFAULT_EVAL_BYTES) -> bytes:
    """`--eval-text`: a UTF-8 file, or every file under a directory (sorted), up to
    `limit` bytes; None -> the held-out stdlib text. UserError when missing, empty or
    not UTF-8."""
    if path is None:
        return heldout_text(limit)
    path = Path(path)
    if not path.exists():
        raise UserError(f"--eval-text {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts, size = [], 0
    for file in files:
        data = file.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"--eval-text {file} is not UTF-8 text (byte {exc.start}): pass a text file") from None
        parts.append(data)
        size += len(data)
        if size >= limit:
            break
    text = b"\n".join(parts)[:limit]
    if len(text) < 2:
        raise UserError(f"--eval-text {path} is empty: it needs at least 2 bytes of text to score")
    return text


def windows(text: bytes, window: int = EVAL_WINDOW) -> list[np.ndarray]:
    """The text as rows of `window` consecutive bytes (int64 token ids); a shorter tail
    is its own row, so every byte after the first of a row is scored."""
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    rows = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [r for r in rows if len(r) > 1]


def byte_bits(
    logits_of: Callable[[np.ndarray], np.ndarray], text: bytes, window: int = EVAL_WINDOW, batch: int = 4
) -> np.ndarray:
    """-log2 p of each byte of `text` under a byte-level model (`logits_of(ids [B, L]) ->
    logits [B, L, 256]`) reading it in windows of `window`: [len(text)], NaN where a
    byte starts its window (nothing before it predicts it)."""
    bits = np.full(len(text), np.nan)
    # Rows of one length go together (the tail is its own batch).
    by_length: dict[int, list[tuple[int, np.ndarray]]] = {}
    for index, row in enumerate(windows(text, window)):  # row `index` starts at byte index * window
        by_length.setdefault(len(row), []).append((index * window, row))
    for group in by_length.values():
        for i in range(0, len(group), batch):
            offsets, rows = zip(*group[i : i + batch])
            ids = np.stack(rows)
            logits = np.asarray(logits_of(ids), dtype=np.float64)[:, :-1]
            logits = logits - logits.max(-1, keepdims=True)
            log_z = np.log(np.exp(logits).sum(-1))
            target = np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
            for offset, row_bits in zip(offsets, (log_z - target) / math.log(2)):
                bits[offset + 1 : offset + 1 + len(row_bits)] = row_bits
    return bits


def bits_per_byte(
    logits_of: Callable[[np.ndarray], np.ndarray], text: bytes, window: int = EVAL_WINDOW, batch: int = 4
) -> float:
    """Bits per byte of `text` under a byte-level model: the mean of `byte_bits` over the
    bytes it scores."""
    return float(np.nanmean(byte_bits(logits_of, text, window, batch)))


def bits_per_byte_by_window(
    logits_of: Callable[[np.ndarray], np.ndarray], text: bytes, windows_: tuple[int, ...]
) -> dict[int, float]:
    """`bits_per_byte` of `text` in windows of each length in `windows_`."""
    return {n: bits_per_byte(logits_of, text, window=n) for n in windows_}


def worst_change(scores: dict[int, float], reference: dict[int, float]) -> float:
    """The largest relative rise of bits per byte over `reference`'s across the windows
    both were scored at (+0.01 = 1% more)."""
    return max(scores[n] / reference[n] - 1 for n in reference)


@dataclass(frozen=True)
class TextScore:
    """An artifact's bits per byte on held-out text against the eager model's."""

    bits_per_byte: float
    reference: float  # eager fp32 on the same text
    budget: float  # the largest relative increase that still passes

    @property
    def change(self) -> float:
        """Relative change against eager (+0.01 = 1% more bits per byte)."""
        return (self.bits_per_byte - self.reference) / self.reference

    @property
    def passed(self) -> bool:
        return self.change <= self.budget

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "change": self.change, "passed": self.passed}


def scores_text(spec) -> bool:
    """Whether held-out text can score a model of `spec`: byte tokens in, logits out,
    and no input but the tokens and their padding mask."""
    return (
        spec.tokenizer == "bytes"
        and any(o.logits for o in spec.outputs)
        and all(i.values in ("token_ids", "padding_mask") for i in spec.inputs)
    )


def text_feeds(spec, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for token ids [B, L] of real text: the tokens, and an all-ones mask if taken."""
    feeds = {spec.tokens.name: ids}
    if spec.mask is not None:
        feeds[spec.mask.name] = np.ones_like(ids)
    return feeds


def logits_of(runner, spec) -> Callable[[np.ndarray], np.ndarray]:
    """ids [B, L] -> logits, through any runner's `infer` (feeds named by the spec)."""
    name = next(o.name for o in spec.outputs if o.logits)
    return lambda ids: runner.infer(text_feeds(spec, ids))[name]


def check_budget(budget: float) -> float:
    """UserError unless the accuracy budget is a positive fraction."""
    if not budget > 0:
        raise UserError(f"the accuracy budget must be > 0 (a relative increase of bits per byte), got {budget!r}")
    return budget
