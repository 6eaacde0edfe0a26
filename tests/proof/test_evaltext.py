"""Held-out text: a fixed split no training run reads, and bits per byte computed right
(checked on models whose answer is known exactly), with --eval-text refused in one line
when missing, empty or not UTF-8."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import run_cli

from bsbr_export.errors import UserError
from bsbr_export.proof.evaltext import (
    BYTE_VOCAB,
    bits_per_byte,
    check_budget,
    is_heldout,
    read_eval_text,
    stdlib_root,
    stdlib_split,
    windows,
)


def test_split_is_disjoint_fixed_and_follows_the_rule():
    train, heldout = stdlib_split()
    assert train and heldout and not set(train) & set(heldout)
    root = stdlib_root()
    assert all(is_heldout(p.relative_to(root).as_posix()) for p in heldout)
    assert not any(is_heldout(p.relative_to(root).as_posix()) for p in train)
    assert 0.02 < len(heldout) / (len(train) + len(heldout)) < 0.1  # about one file in 20
    assert stdlib_split() == (train, heldout)


def uniform(ids: np.ndarray) -> np.ndarray:
    return np.zeros((*ids.shape, BYTE_VOCAB))


def oracle(text: bytes, window: int):
    """A model that puts almost all mass on the true next byte of `text`."""
    rows = windows(text, window)

    def logits_of(ids: np.ndarray) -> np.ndarray:
        out = np.zeros((*ids.shape, BYTE_VOCAB))
        for b, row in enumerate(ids):
            start = next(i for i, r in enumerate(rows) if len(r) == len(row) and (r == row).all())
            nxt = np.append(rows[start][1:], 0)
            out[b, np.arange(len(row)), nxt] = 50.0
        return out

    return logits_of


def test_bits_per_byte_of_known_models():
    text = b"def f(x):\n    return x + 1\n" * 37  # 999 bytes: a ragged last window
    assert bits_per_byte(uniform, text, window=64) == pytest.approx(8.0)
    assert bits_per_byte(oracle(text, 64), text, window=64) < 1e-15 / math.log(2) + 1e-12

    # Logit log(255) on the right byte, 0 on the 255 others: p = 1/2, one bit per byte.
    def half(ids):
        return np.where(oracle(text, 64)(ids) > 0, math.log(255), 0.0)

    assert bits_per_byte(half, text, window=64) == pytest.approx(1.0, rel=1e-12)


def test_windows_score_every_byte_but_the_first_of_each():
    rows = windows(bytes(range(200)), 64)
    assert [len(r) for r in rows] == [64, 64, 64, 8]
    assert sum(len(r) - 1 for r in rows) == 200 - 4


def test_read_eval_text_file_and_directory(tmp_path):
    (tmp_path / "a.py").write_text("print('a')\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("héllo\n")
    assert read_eval_text(tmp_path / "a.py") == b"print('a')\n"
    assert read_eval_text(tmp_path) == b"print('a')\n\n" + "héllo\n".encode()
    assert len(read_eval_text(None, limit=1000)) == 1000  # the held-out default


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("latin1", "is not UTF-8"),
    ],
)
def test_bad_eval_text_is_one_line_exit_2(tiny_onnx_export, tmp_path, capsys, case, message):
    path = tmp_path / "text.txt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "latin1":
        path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=message):
        read_eval_text(path)
    out = tiny_onnx_export
    code, _, err = run_cli(capsys, "validate", out, "--eval-text", path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("budget", ["0", "-0.01"])
def test_accuracy_budget_must_be_positive(tiny_onnx_export, capsys, budget):
    with pytest.raises(UserError, match="must be > 0"):
        check_budget(float(budget))
    out = tiny_onnx_export
    code, _, err = run_cli(capsys, "validate", out, "--accuracy-budget", budget)
    assert code == 2 and "accuracy budget must be > 0" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "windows, message",
    [("1", "--eval-windows must be lengths >= 2"), ("512,x", "--eval-windows must be comma-separated integers")],
)
def test_bad_eval_windows_are_one_line_exit_2_before_any_work(tiny_onnx_export, capsys, windows, message):
    before = sorted(p.name for p in tiny_onnx_export.iterdir())
    code, _, err = run_cli(capsys, "optimize", tiny_onnx_export, "--eval-windows", windows)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tiny_onnx_export.iterdir()) == before


def test_worst_change_is_the_worst_window():
    from bsbr_export.proof.evaltext import bits_per_byte_by_window, worst_change

    assert worst_change({256: 2.04, 4096: 1.5}, {256: 2.0, 4096: 1.6}) == pytest.approx(0.02)
    text = bytes(range(32, 127)) * 3
    uniform = bits_per_byte_by_window(lambda ids: np.zeros((*ids.shape, 256)), text, (16, 100))
    assert uniform == pytest.approx({16: 8.0, 100: 8.0})
