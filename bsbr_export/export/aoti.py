"""AOTInductor packages (`.pt2`): `torch.export` + `aoti_compile_and_package`.

The package holds one shared library compiled for the exporting CPU's vector ISA
(weights inside); `torch._inductor.aoti_load_package` in Python and
`torch::inductor::AOTIModelPackageLoader` in C++ load it (`runtime/aoti.py` checks the
ISA first).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch._dynamo.exc import UserError as ExportUserError
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils._pytree import tree_map

from bsbr_export.errors import UserError
from bsbr_export.export.checks import FREEZE_HINT, DoesNotGeneralize, check_generalizes, check_kind
from bsbr_export.export.examples import dynamic_shapes, example_args, graph_axes
from bsbr_export.export.staging import quiet, staging
from bsbr_export.model.graphs import export_graph
from bsbr_export.model.probe import spec_for
from bsbr_export.runtime.aoti import AotiRunner, package_device, package_isa
from bsbr_export.runtime.base import cuda_missing


def dynamic_program(model, spec=None, kind: str = "full", device: str = "cpu") -> torch.export.ExportedProgram:
    """`torch.export` of one artifact kind of `model` (described by `spec`) with plain
    `Dim`s on every named axis (batch, sequence or new_tokens, the state's growing axes):
    DoesNotGeneralize when export needs a constraint on them or leaves a runtime assert in
    the graph, which the compiled package would keep and fail at other shapes. The model
    and the example inputs are moved to `device` (what AOTInductor compiles for)."""
    model = model.eval().to(device)
    spec = spec_for(model, spec)
    check_kind(model, spec, kind)
    graph = export_graph(model, spec, kind)
    args = tree_map(lambda x: x.to(device) if torch.is_tensor(x) else x, example_args(model, spec, kind))
    shapes = dynamic_shapes(graph, graph_axes(spec, kind))
    # A streaming step exports size-obliviously, as torch.onnx does: a size that can be 0
    # or 1 (the chunks it finishes, the past chunks) takes the general path instead of a
    # guard pinning it to the example's value, which AOTInductor would compile in
    # unchecked. The full graph has no such size and needs it not (with it, a module's
    # padded length gets guarded instead).
    oblivious = torch.fx.experimental._config.patch(backed_size_oblivious=kind != "full")
    with quiet(), torch.no_grad(), oblivious:
        try:
            program = torch.export.export(graph, args, dynamic_shapes=shapes)
        except (ExportUserError, GuardOnDataDependentSymNode) as exc:  # constraint violations among them
            lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
            detail = next((line for line in lines if line.startswith("Not all values")), lines[0] if lines else "")
            raise DoesNotGeneralize(
                f"torch.export of {type(model).__name__} ({kind}) cannot keep its dims dynamic: {detail}; {FREEZE_HINT}"
            ) from None
    asserts = [n.args[1] for n in program.graph.nodes if n.target is torch.ops.aten._assert_scalar.default]
    if asserts:
        raise DoesNotGeneralize(
            f"torch.export of {type(model).__name__} ({kind}) keeps {len(asserts)} runtime "
            f"assert(s) on its dims, e.g. {asserts[0]!r}; {FREEZE_HINT}"
        )
    return program


def export_aoti(model, path: str | os.PathLike, spec=None, kind: str = "full", device: str | None = None) -> Path:
    """Compile one artifact kind of `model` (the full forward, or a streaming / decode
    step) to an AOTInductor package at `path` for `device` (default the CPU), from
    `dynamic_program`'s graph; refuses to write a package that disagrees with eager (on
    the CPU) at lengths, batches and states it was not exported with."""
    path = Path(path)
    spec = spec_for(model, spec)
    program = dynamic_program(model, spec, kind, device or "cpu")
    with staging(path) as tmp:
        staged = tmp / path.name
        with quiet():
            torch._inductor.aoti_compile_and_package(program, package_path=str(staged))
        model.to("cpu")  # the eager reference below runs where every other check does
        check_generalizes(
            model, lambda inputs, outputs: AotiRunner(staged, inputs, outputs), kind, spec, "AOTInductor package"
        )
        os.replace(staged, path)
    return path


def package_settings(path: str | os.PathLike) -> dict:
    """What the manifest records about a `.pt2`: the device and CPU ISA it was compiled for."""
    return {"cpu_isa": package_isa(path), "device": package_device(path)}


def check_device_option(spec, device: str | None = None) -> None:
    """UserError, before any work, when --device cuda is asked for and torch has no GPU."""
    if device not in (None, "cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and (missing := cuda_missing()):
        raise UserError(f"--format aoti --device cuda: {missing}; compile on a machine with the GPU it will run on")
