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


def export_program(model, spec=None, kind: str = "logits") -> torch.export.ExportedProgram:
    """`torch.export` of one artifact kind of `model` (described by `spec`) with plain
    `Dim`s on every named axis (batch, sequence or new_tokens, the state's growing axes):
    DoesNotGeneralize when export needs a constraint on them or leaves a runtime assert in
    the graph, which the compiled package would keep and fail at other shapes."""
    from bsbr_export.export.writers import (
        FREEZE_HINT,
        DoesNotGeneralize,
        _dynamic_shapes,
        _quiet,
        check_kind,
        example_args,
        graph_axes,
    )
    from bsbr_export.export.graphs import export_graph
    from bsbr_export.model.spec import spec_for
    from torch._dynamo.exc import UserError as ExportUserError
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    model = model.eval()
    spec = spec_for(model, spec)
    check_kind(model, spec, kind)
    graph = export_graph(model, spec, kind)
    args = example_args(model, spec, kind)
    dynamic_shapes = _dynamic_shapes(graph, graph_axes(spec, kind), kind != "logits")
    # A streaming step exports size-obliviously, as torch.onnx does: a size that can be 0
    # or 1 (the chunks it finishes, the past chunks) takes the general path instead of a
    # guard pinning it to the example's value, which AOTInductor would compile in
    # unchecked. The full graph has no such size and needs it not (with it, a module's
    # padded length gets guarded instead).
    oblivious = torch.fx.experimental._config.patch(backed_size_oblivious=kind != "logits")
    with _quiet(), torch.no_grad(), oblivious:
        try:
            program = torch.export.export(graph, args, dynamic_shapes=dynamic_shapes)
        except (ExportUserError, GuardOnDataDependentSymNode) as exc:  # constraint violations among them
            lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
            detail = next((line for line in lines if line.startswith("Not all values")), lines[0] if lines else "")
            raise DoesNotGeneralize(f"torch.export of {type(model).__name__} ({kind}) cannot keep its dims dynamic: "
                                    f"{detail}; {FREEZE_HINT}") from None
    asserts = [n.args[1] for n in program.graph.nodes if n.target is torch.ops.aten._assert_scalar.default]
    if asserts:
        raise DoesNotGeneralize(f"torch.export of {type(model).__name__} ({kind}) keeps {len(asserts)} runtime "
                                f"assert(s) on its dims, e.g. {asserts[0]!r}; {FREEZE_HINT}")
    return program


def export_aoti(model, path: str | os.PathLike, spec=None, kind: str = "logits") -> Path:
    """Compile one artifact kind of `model` (the full forward, or a streaming / decode
    step) to an AOTInductor package at `path`, from `export_program`'s graph; refuses to
    write a package that disagrees with eager at lengths, batches and states it was not
    exported with (a streaming step's does today, with fewer than 2 past chunks)."""
    from bsbr_export.export.writers import _quiet, _staging, check_generalizes
    from bsbr_export.model.spec import spec_for
    from bsbr_export.proof.runners import AotiRunner

    path = Path(path)
    spec = spec_for(model, spec)
    program = export_program(model, spec, kind)
    with _staging(path) as tmp:
        staged = tmp / path.name
        with _quiet():
            torch._inductor.aoti_compile_and_package(program, package_path=str(staged))
        check_generalizes(model, lambda inputs, outputs: AotiRunner(staged, inputs, outputs), kind, spec,
                          "AOTInductor package")
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
