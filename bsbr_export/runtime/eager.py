"""The eager PyTorch model itself, through the same graph wrapper an export uses: as
is, through `torch.compile`, or under bf16 autocast with chosen parts kept in fp32."""

from __future__ import annotations

import contextlib
import copy
import functools

import numpy as np
import torch

from bsbr_export.model.graphs import export_graph
from bsbr_export.model.probe import spec_for
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.base import ModuleRunner


class EagerRunner(ModuleRunner):
    """The model's graph of one kind (`formats.KINDS`), run eagerly on `device` (the
    model is moved there)."""

    name = "eager"

    def __init__(
        self, model: torch.nn.Module, spec: ModelSpec | None = None, kind: str = "full", device: str = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.model, self.spec, self.kind = model, spec_for(model, spec), kind
        self.module = export_graph(model.to(self.device), self.spec, kind)
        self.input_names, self.output_names = self.module.input_names, self.module.output_names

    def in_float64(self) -> Float64Runner | None:
        """The same graph of a copy of the model in float64 on the CPU, the reference's
        own reference; None for a model that cannot be copied or cast."""
        try:
            return Float64Runner(self.model, self.spec, self.kind)
        except (RuntimeError, TypeError):
            return None


class Float64Runner(EagerRunner):
    """The graph of a copy of `model` in float64 on the CPU, fed float inputs cast up:
    what fp32 rounding is measured against."""

    name = "eager-fp64"

    def __init__(self, model: torch.nn.Module, spec: ModelSpec | None = None, kind: str = "full") -> None:
        super().__init__(copy.deepcopy(model).to("cpu", torch.float64), spec, kind)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor.double() if tensor.is_floating_point() else tensor


class CompiledRunner(EagerRunner):
    """The full graph through `torch.compile` with dynamic shapes."""

    name = "compile"

    def __init__(self, model: torch.nn.Module, spec: ModelSpec | None = None, device: str = "cpu") -> None:
        super().__init__(model, spec, device=device)
        self.module = torch.compile(self.module, dynamic=True)


@contextlib.contextmanager
def autocast_bf16(model: torch.nn.Module, keep_fp32: tuple[str, ...] = (), device_type: str = "cpu"):
    """Run `model` under bf16 autocast on `device_type` with the submodules `keep_fp32`
    in fp32 (their inputs cast back to float, autocast off inside)."""
    with fp32_groups(model, keep_fp32, device_type), torch.autocast(device_type, dtype=torch.bfloat16):
        yield


@contextlib.contextmanager
def fp32_groups(model: torch.nn.Module, keep_fp32: tuple[str, ...], device_type: str = "cpu"):
    """Make the submodules `keep_fp32` of `model` run in fp32 under any autocast on
    `device_type`: their inputs cast back to float and autocast off inside, until the
    context exits."""
    patched = []

    def fp32_forward(forward):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            with torch.autocast(device_type, enabled=False):
                return forward(*args, **kwargs)

        return run

    try:
        for name in keep_fp32:
            module = model.get_submodule(name)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = fp32_forward(module.forward)
        yield
    finally:
        for module, own in patched:  # back to the class's forward, or the module's own
            if own is None:
                del module.forward
            else:
                module.forward = own


class AutocastRunner(EagerRunner):
    """The eager model under bf16 autocast (`keep_fp32` groups in fp32); fp32 outputs.

    With `compile`, the same graph through `torch.compile` (dynamic shapes): the fp32
    groups are then patched once, for the runner's life (and the model's: a bench worker
    owns it), since new forwards on every call would make dynamo recompile every call.
    """

    name = "eager-bf16"

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ModelSpec | None = None,
        keep_fp32: tuple[str, ...] = (),
        compile: bool = False,
        device: str = "cpu",
    ) -> None:
        super().__init__(model, spec, device=device)
        self.keep_fp32 = tuple(keep_fp32)
        kind = self.device.type
        self.autocast = functools.partial(autocast_bf16, model, self.keep_fp32, kind)
        if compile:
            self.patched = contextlib.ExitStack()
            self.patched.enter_context(fp32_groups(model, self.keep_fp32, kind))
            self.module = torch.compile(self.module, dynamic=True)
            self.autocast = functools.partial(torch.autocast, kind, dtype=torch.bfloat16)

    def call(self, *tensors: torch.Tensor):
        with self.autocast():
            return self.module(*tensors)
