"""ExecuTorch programs (`.pte`) run by `executorch.runtime`.

A program's memory is planned for the largest input its dims allow, so it carries its
`max_length` and `max_batch` as constant methods; inputs past them are refused in one
line before the call instead of failing inside the runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bsbr_export.errors import UserError
from bsbr_export.formats import FORMATS

LIMITS = ("max_length", "max_batch")  # constant methods of every .pte we write


def require_executorch() -> None:
    """UserError saying how to install the extra unless `executorch` is importable."""
    FORMATS["executorch"].check_installed()


@contextlib.contextmanager
def quiet_runtime() -> Iterator[None]:
    """ExecuTorch's runtime logs to stderr (CPU probing, thread pool size, a loader's
    error) and its imports log warnings (torchao's missing CUDA kernels, a pytree
    deprecation): none of it is for our user, whose one line on failure is ours."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            # The Python bindings print the runtime's log through sys.stderr, not fd 2.
            with contextlib.redirect_stderr(null):
                yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def load_program(path: str | os.PathLike):
    """The ExecuTorch program at `path`, or a UserError naming what is wrong with it."""
    require_executorch()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ExecuTorch program {path} does not exist")
    try:
        with quiet_runtime():
            from executorch.runtime import Runtime  # optional extra

            return Runtime.get().load_program(path)
    except (RuntimeError, ValueError) as exc:
        raise UserError(
            f"{path} is not a loadable ExecuTorch program (.pte): {str(exc).splitlines()[0]}; "
            "re-export it with --format executorch"
        ) from None


def program_limits(program) -> dict[str, int]:
    """The `max_length` and `max_batch` a program was exported with (its constant methods)."""
    with quiet_runtime():
        return {name: int(program.load_method(name).execute([])[0]) for name in LIMITS}


def program_settings(path: str | os.PathLike) -> dict:
    """What the manifest records about a `.pte`: the limits it was exported with."""
    return program_limits(load_program(path))


class ExecuTorchRunner:
    """An ExecuTorch program, XNNPACK's thread pool sized like torch's
    (`torch.set_num_threads`). Inputs past the batch or length the program was exported
    for are refused before the call: its memory is planned for them."""

    name = "executorch"

    def __init__(self, path: str | os.PathLike, input_names: list[str], output_names: list[str]) -> None:
        self.path = Path(path)
        # Kept: a method runs on its program's memory.
        self.program = load_program(self.path)
        self.limits = program_limits(self.program)
        with quiet_runtime():
            from executorch.extension.pybindings.portable_lib import (  # optional extra
                _threadpool_get_thread_count,
                _unsafe_reset_threadpool,
            )

            # Before the method loads: XNNPACK keeps the pool it was loaded with, and a
            # reset under a loaded method crashes its next call (seen in executorch 1.5.1).
            if _threadpool_get_thread_count() != torch.get_num_threads():
                _unsafe_reset_threadpool(torch.get_num_threads())
            self.method = self.program.load_method("forward")
        self.input_names, self.output_names = input_names, output_names

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """UserError if a feed is longer or has more rows than the program allows."""
        batch, length = feeds[self.input_names[0]].shape[:2]
        if length > self.limits["max_length"] or batch > self.limits["max_batch"]:
            raise UserError(
                f"{self.path.name} runs up to batch {self.limits['max_batch']} x length {self.limits['max_length']}, "
                f"got batch {batch} x length {length}: re-export with --format executorch --max-length/--max-batch"
            )

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        outputs = self.method.execute([torch.from_numpy(feeds[n]) for n in self.input_names])
        return {n: o.numpy() for n, o in zip(self.output_names, outputs)}
