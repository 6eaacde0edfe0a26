"""TorchScript files (`.pt`, and `.ptl` for the lite interpreter) run from Python."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bsbr_export.errors import UserError
from bsbr_export.runtime.base import ModuleRunner


class TorchScriptRunner(ModuleRunner):
    """A TorchScript file loaded with `torch.jit.load` onto `device` (or the lite
    interpreter, CPU only)."""

    name = "torchscript"

    def __init__(
        self, path: str | os.PathLike, input_names: list[str], output_names: list[str], device: str = "cpu"
    ) -> None:
        path = Path(path)
        self.device = torch.device(device)
        if not path.is_file():
            raise UserError(f"TorchScript file {path} does not exist")
        try:
            if path.suffix == ".ptl":
                from torch.jit.mobile import _load_for_lite_interpreter  # only .ptl files need the lite loader

                self.module = _load_for_lite_interpreter(str(path))
            else:
                self.module = torch.jit.load(str(path), map_location=self.device)
        except RuntimeError as exc:
            raise UserError(f"{path} is not a loadable TorchScript file: {str(exc).splitlines()[0]}") from None
        self.input_names, self.output_names = input_names, output_names

    @classmethod
    def from_module(cls, module, input_names: list[str], output_names: list[str]) -> TorchScriptRunner:
        """Wrap an in-memory scripted/traced module (e.g. to check it before saving)."""
        runner = cls.__new__(cls)
        runner.module, runner.input_names, runner.output_names = module, input_names, output_names
        return runner
