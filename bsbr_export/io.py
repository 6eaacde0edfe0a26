"""Atomic writers: a file or directory appears whole or not at all.

Staging directories of `atomic_dir` carry a marker file with the writer's pid, so a
later run can tell a killed run's leftovers (ours, writer gone) from anything else.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bsbr_export.errors import UserError

STAGING_MARKER = ".bsbr-export-staging"  # inside every atomic_dir temp dir: the writer's pid
# errnos that mean "this place cannot take the output" (a read can raise neither).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


def check_writable(directory: Path) -> None:
    """UserError naming `directory` unless a file can be created in it right now.

    A real probe, not `os.access`: root passes every permission check, and neither
    sees a read-only mount or a pseudo filesystem such as /proc.
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=".bsbr-export-probe.", dir=directory)
    except OSError as exc:
        raise UserError(f"cannot write to {directory}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def check_can_create(path: Path, overwrite: bool = False) -> None:
    """UserError, before any work, unless `path` can be created as a new directory (or,
    with `overwrite`, replace one): its nearest existing ancestor is a writable directory
    and `path` is not a file or a non-empty directory. Creates nothing."""
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot write directory {path}: a file with that name exists")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} already exists and is not empty: choose another path or remove it")
    ancestor = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not ancestor.is_dir():
        raise UserError(f"cannot write {path}: {ancestor} is a file, not a directory")
    check_writable(ancestor)


def check_parent_dir(path: Path) -> None:
    """Create `path`'s directory if needed; UserError if it is a file or not writable."""
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create directory {parent}: {exc.strerror}") from None
    check_writable(parent)


def write_error(path: Path, exc: BaseException) -> UserError | None:
    """The one-line UserError for a write into `path` that failed with `exc` because of
    where it was writing (disk full, read-only, gone), or None for any other failure.

    Libraries that write through C++ (torch, onnx) wrap ENOSPC in their own errors, so
    a failure that leaves the disk (nearly) full counts as disk full whatever its type.
    """
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return UserError(f"cannot write {path}: {exc.strerror}")
    if isinstance(exc, Exception) and not isinstance(exc, UserError):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(path.parent).free < FULL_BYTES:
                return UserError(f"cannot write {path}: no space left on device ({type(exc).__name__})")
    return None


def read_json(path: Path):
    """The JSON document in `path`; a UserError naming the file if it does not parse."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}): is it the right file?") from None
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

    On any error (Ctrl-C included) the temp file is removed and `path` is untouched;
    a disk-full or read-only failure becomes one UserError naming `path`.
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
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        error = write_error(path, exc)
        if error is not None:
            raise error from None
        raise


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove `atomic_dir` staging dirs in `parent` left by killed runs: only hidden
    `.*.tmp` dirs that hold our marker naming a process that no longer exists."""
    removed = []
    for candidate in parent.glob(".*.tmp"):
        marker = candidate / STAGING_MARKER
        if candidate.is_symlink() or not marker.is_file():
            continue
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue
        if not _writer_alive(pid):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path`.

    An existing non-empty `path` is a UserError unless `overwrite` is set. Staging
    dirs that killed runs left beside `path` are removed first (`remove_stale_staging`).
    """
    path = Path(path)
    check_can_create(path, overwrite)
    check_parent_dir(path)
    remove_stale_staging(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / STAGING_MARKER).write_text(f"{os.getpid()}\n")
        yield tmp
        (tmp / STAGING_MARKER).unlink()
        _publishable(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_error(path, exc)
        if error is not None:
            raise error from None
        raise
