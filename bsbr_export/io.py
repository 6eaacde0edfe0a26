"""Atomic writers: a file or directory appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bsbr_export.errors import UserError


def check_parent_dir(path: Path) -> None:
    """Create `path`'s directory if needed; UserError if it is a file or not writable."""
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create directory {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent}: permission denied")


def read_json(path: Path):
    """The JSON document in `path`; a UserError naming the file if it does not parse."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(path: Path) -> None:
    """Temp files/dirs are created private (0600/0700); give the result normal modes."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`.

    On any error (Ctrl-C included) the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    check_parent_dir(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publishable(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path`.

    An existing non-empty `path` is a UserError unless `overwrite` is set.
    """
    path = Path(path)
    check_parent_dir(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot write directory {path}: a file with that name exists")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} already exists and is not empty: choose another path or remove it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publishable(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
