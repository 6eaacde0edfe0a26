"""TorchScript (traced) for torch.jit.load / torch::jit::load, and the lite interpreter
(`.ptl`) for PyTorch Mobile; every trace is checked against eager before it is written."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from bsbr_export.export.checks import check_generalizes, check_kind
from bsbr_export.export.examples import example_args
from bsbr_export.export.staging import quiet, staging
from bsbr_export.formats import kind_of
from bsbr_export.model.graphs import DefaultMask, export_graph
from bsbr_export.model.probe import spec_for
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.torchscript import TorchScriptRunner


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    spec: ModelSpec | None = None,
    streaming: bool = False,
    decode: bool = False,
    attention_mask: bool = True,
    mobile: bool = False,
) -> Path:
    """Trace `model` to TorchScript at `path`; refuses to write a trace that disagrees
    with eager at lengths and batch sizes it was not traced with.

    streaming / decode: trace one streaming step, as in `export_onnx`.
    mobile: save for PyTorch Mobile's lite interpreter (`.ptl`) instead.
    """
    path = Path(path)
    model = model.eval()
    spec = spec_for(model, spec)
    if not attention_mask:
        spec = spec.without_mask()
    kind = kind_of(streaming or decode, decode)
    check_kind(model, spec, kind)
    graph = export_graph(model, spec, kind)
    args = example_args(model, spec, kind)
    with staging(path) as tmp, quiet(), torch.no_grad():
        traced = torch.jit.trace(graph, args, check_trace=False)
        if kind == "full" and len(spec.inputs) == 2 and spec.inputs[1].optional and len(spec.outputs) == 1:
            traced = torch.jit.script(DefaultMask(traced))  # callable with input_ids alone
        if not mobile:
            traced = torch.jit.freeze(traced.eval())
        elif torch._C._is_xnnpack_enabled():
            from torch.utils.mobile_optimizer import optimize_for_mobile  # only where XNNPACK is built in

            traced = optimize_for_mobile(traced)  # freezes and folds; raises without XNNPACK
        check_trace(model, traced, kind, spec)
        staged = tmp / path.name
        if mobile:
            traced._save_for_lite_interpreter(str(staged))
        else:
            torch.jit.save(traced, str(staged))
        os.replace(staged, path)
    return path


def check_trace(model: nn.Module, traced, kind: str, spec: ModelSpec) -> None:
    """Compare the trace with eager at shapes it never saw (a frozen chunk count fails),
    on every output."""
    check_generalizes(
        model,
        lambda inputs, outputs: TorchScriptRunner.from_module(traced, inputs, outputs),
        kind,
        spec,
        "TorchScript trace",
    )
