"""Writing an artifact: staged in a temp dir beside its path and moved into place only
once it passed its checks; exporters' chatter silenced meanwhile."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from bsbr_export.errors import UserError
from bsbr_export.io import check_parent_dir


@contextlib.contextmanager
def staging(path: Path) -> Iterator[Path]:
    """A temp dir beside `path`: files staged there are moved into place on success."""
    check_parent_dir(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quiet():
    """Exporter chatter (progress prints, deprecation and tracer warnings) off."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "torchvision is not installed" notes on every export
    stack.callback(logger.setLevel, level)
    return stack
