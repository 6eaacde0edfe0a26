"""AOTInductor packages (`.pt2`): `torch.export` + `aoti_compile_and_package`.

The package holds one shared library compiled for the exporting CPU's vector ISA
(weights inside); `torch._inductor.aoti_load_package` in Python and
`torch::inductor::AOTIModelPackageLoader` in C++ load it. Loading it on a CPU without
that ISA would crash at the first call (illegal instruction), so the ISA is read from
the package's own metadata and checked before loading.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch

from bsbr_export.errors import UserError


def export_aoti(model, path: str | os.PathLike, spec=None) -> Path:
    """Compile the full forward of `model` (described by `spec`) to an AOTInductor
    package at `path`, with dynamic batch and sequence: plain `Dim`s, no runtime asserts
    (the model must be torch.export-clean, see `bsbr-export doctor`), so it runs at every
    length from 1."""
    from bsbr_export.export import (
        _dynamic_shapes,
        _quiet,
        _staging,
        example_args,
        graph_axes,
    )
    from bsbr_export.graphs import export_graph
    from bsbr_export.spec import EXAMPLE_BATCH, example_length, spec_for

    path = Path(path)
    model = model.eval()
    spec = spec_for(model, spec)
    graph = export_graph(model, spec, "logits")
    args = example_args(model, spec, "logits", EXAMPLE_BATCH, example_length(spec.chunk_size))
    with _staging(path) as tmp, _quiet(), torch.no_grad():
        program = torch.export.export(graph, args, dynamic_shapes=_dynamic_shapes(graph, graph_axes(spec, "logits"), False))
        staged = tmp / path.name
        torch._inductor.aoti_compile_and_package(program, package_path=str(staged))
        os.replace(staged, path)
    return path


def package_isa(path: str | os.PathLike) -> str:
    """The CPU vector ISA a `.pt2` was compiled for ('AVX512 AVX512_VNNI', '' for none),
    read from the package without loading its library; UserError if it is no package."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("wrapper_metadata.json"))
            return json.loads(archive.read(name)).get("AOTI_CPU_ISA", "")
    except (zipfile.BadZipFile, StopIteration, KeyError, json.JSONDecodeError, OSError):
        raise UserError(f"{path} is not an AOTInductor package (.pt2): re-export it with --format aoti") from None


def host_isas() -> list[str]:
    """Vector ISAs this CPU runs, as AOTInductor names them ('AVX512 AVX512_VNNI', ...)."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return [str(isa).upper() for isa in valid_vec_isa_list()]


def check_isa(path: str | os.PathLike) -> str:
    """UserError unless this CPU runs the ISA the package at `path` was built for."""
    isa = package_isa(path)
    if isa and isa.upper() not in host_isas():
        raise UserError(f"{path} was compiled for {isa}, which this CPU lacks (it has {', '.join(host_isas()) or 'none'}): "
                        "re-export with --format aoti on a machine of the target kind")
    return isa
