"""AOTInductor packages (`.pt2`) loaded with `torch._inductor.aoti_load_package`.

The package holds one shared library compiled for the exporting CPU's vector ISA;
loading it on a CPU without that ISA would crash at the first call (illegal
instruction), so the ISA is read from the package's own metadata and checked first.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from bsbr_export.errors import UserError
from bsbr_export.runtime.base import ModuleRunner, cuda_missing


def package_metadata(path: str | os.PathLike) -> dict:
    """What a `.pt2` records about its compiled code, read without loading its library;
    UserError if it is no package."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("wrapper_metadata.json"))
            return json.loads(archive.read(name))
    except (zipfile.BadZipFile, StopIteration, KeyError, json.JSONDecodeError, OSError):
        raise UserError(f"{path} is not an AOTInductor package (.pt2): re-export it with --format aoti") from None


def package_isa(path: str | os.PathLike) -> str:
    """The CPU vector ISA a `.pt2` was compiled for ('AVX512 AVX512_VNNI', '' for none)."""
    return package_metadata(path).get("AOTI_CPU_ISA", "")


def package_device(path: str | os.PathLike) -> str:
    """The device a `.pt2`'s kernels run on: "cpu" or "cuda"."""
    return package_metadata(path).get("AOTI_DEVICE_KEY", "cpu")


def host_isas() -> list[str]:
    """Vector ISAs this CPU runs, as AOTInductor names them ('AVX512 AVX512_VNNI', ...)."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list  # inductor is heavy: only when asked

    return [str(isa).upper() for isa in valid_vec_isa_list()]


def check_isa(path: str | os.PathLike) -> str:
    """UserError unless this CPU runs the ISA the package at `path` was built for."""
    isa = package_isa(path)
    if isa and isa.upper() not in host_isas():
        raise UserError(
            f"{path} was compiled for {isa}, which this CPU lacks (it has {', '.join(host_isas()) or 'none'}): "
            "re-export with --format aoti on a machine of the target kind"
        )
    return isa


class AotiRunner(ModuleRunner):
    """An AOTInductor package on the device it was compiled for, after checking that
    this machine has it (a CUDA GPU, or the CPU vector ISA)."""

    name = "aoti"

    def __init__(self, path: str | os.PathLike, input_names: list[str], output_names: list[str]) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"AOTInductor package {path} does not exist")
        self.device = torch.device(package_device(path))
        if self.device.type == "cuda" and (missing := cuda_missing()):
            raise UserError(
                f"{path} is compiled for a CUDA GPU, and {missing}: run it on one, or re-export without --device cuda"
            )
        if self.device.type == "cpu":
            check_isa(path)
        try:
            self.module = torch._inductor.aoti_load_package(str(path))
        except (RuntimeError, ValueError, OSError) as exc:
            raise UserError(f"{path} is not a loadable AOTInductor package: {str(exc).splitlines()[0]}") from None
        self.input_names, self.output_names = input_names, output_names

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        # The compiled code indexes every input as contiguous and checks no strides: a
        # sliced feed (a streamed piece of the ids) would be read as the wrong tokens.
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
