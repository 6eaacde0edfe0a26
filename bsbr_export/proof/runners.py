"""Runners own the backends: one object per engine, fed and answered with numpy.

`infer(feeds) -> outputs` (dicts of name -> array) is all a caller uses, so validation
and benchmarks treat eager PyTorch, TorchScript, AOTInductor and ONNX Runtime alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bsbr_export.errors import UserError
from bsbr_export.export.graphs import export_graph


class EagerRunner:
    """The PyTorch model itself, through the same graph wrapper an export uses."""

    name = "eager"

    def __init__(self, model, spec=None, kind: str = "logits") -> None:
        from bsbr_export.model.spec import spec_for

        self.graph = export_graph(model, spec_for(model, spec), kind)
        self.input_names = self.graph.input_names
        self.output_names = self.graph.output_names

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = self.graph(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return {n: o.numpy() for n, o in zip(self.output_names, outputs)}


class ModuleRunner:
    """A loaded torch module called with the feeds as tensors, in `input_names` order."""

    module = None
    input_names: list[str]
    output_names: list[str]

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = self.module(*(self.tensor(feeds[n]) for n in self.input_names))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return {n: o.numpy() for n, o in zip(self.output_names, outputs)}


class TorchScriptRunner(ModuleRunner):
    """A TorchScript file loaded with `torch.jit.load` (or the lite interpreter)."""

    name = "torchscript"

    def __init__(self, path: str | os.PathLike, input_names: list[str], output_names: list[str]) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"TorchScript file {path} does not exist")
        try:
            if path.suffix == ".ptl":
                from torch.jit.mobile import _load_for_lite_interpreter

                self.module = _load_for_lite_interpreter(str(path))
            else:
                self.module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise UserError(f"{path} is not a loadable TorchScript file: {str(exc).splitlines()[0]}") from None
        self.input_names, self.output_names = input_names, output_names

    @classmethod
    def from_module(cls, module, input_names: list[str], output_names: list[str]) -> TorchScriptRunner:
        """Wrap an in-memory scripted/traced module (e.g. to check it before saving)."""
        runner = cls.__new__(cls)
        runner.module, runner.input_names, runner.output_names = module, input_names, output_names
        return runner


class AotiRunner(ModuleRunner):
    """An AOTInductor package (`.pt2`) loaded with `torch._inductor.aoti_load_package`,
    after checking that this CPU has the vector ISA it was compiled for."""

    name = "aoti"

    def __init__(self, path: str | os.PathLike, input_names: list[str], output_names: list[str]) -> None:
        from bsbr_export.export.aoti import check_isa

        path = Path(path)
        if not path.is_file():
            raise UserError(f"AOTInductor package {path} does not exist")
        check_isa(path)
        try:
            self.module = torch._inductor.aoti_load_package(str(path))
        except (RuntimeError, ValueError, OSError) as exc:
            raise UserError(f"{path} is not a loadable AOTInductor package: {str(exc).splitlines()[0]}") from None
        self.input_names, self.output_names = input_names, output_names

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        # The compiled code indexes every input as contiguous and checks no strides: a
        # sliced feed (a streamed piece of the ids) would be read as the wrong tokens.
        return torch.from_numpy(np.ascontiguousarray(array))


class ExecuTorchRunner:
    """An ExecuTorch program (`.pte`) run by `executorch.runtime`, XNNPACK's thread pool
    sized like torch's (`torch.set_num_threads`). Inputs past the batch or length the
    program was exported for are refused before the call: its memory is planned for them."""

    name = "executorch"

    def __init__(self, path: str | os.PathLike, input_names: list[str], output_names: list[str]) -> None:
        from bsbr_export.export.executorch import load_program, program_limits, quiet_runtime

        self.path = Path(path)
        # Kept: a method runs on its program's memory.
        self.program = load_program(self.path)
        self.limits = program_limits(self.program)
        with quiet_runtime():
            from executorch.extension.pybindings.portable_lib import (
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
                f"got batch {batch} x length {length}: re-export with --format executorch --max-length/--max-batch")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        outputs = self.method.execute([torch.from_numpy(feeds[n]) for n in self.input_names])
        return {n: o.numpy() for n, o in zip(self.output_names, outputs)}


def available_providers() -> list[str]:
    """ONNX Runtime execution providers usable on this machine."""
    import onnxruntime as ort

    return ort.get_available_providers()


class OnnxRunner:
    """An ONNX Runtime session on one execution provider.

    Inputs are checked against the graph's declared shapes first, so a static-shape
    graph fed another shape fails with a clear UserError, not an ORT stack dump.
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        provider: str = "CPUExecutionProvider",
        optimization: str = "all",
        threads: int | None = None,
        optimized_path: str | os.PathLike | None = None,
        spinning: bool = False,
        profile_prefix: str | os.PathLike | None = None,
    ) -> None:
        """optimized_path: also save the graph as ORT optimized it (optimized_model_filepath).
        spinning: let idle intra-op threads spin for the next op (ORT's default), which
        saves their wake-up on every node but steals cores from anything else running in
        the process, so only a session alone in its process (a bench worker) asks for it.
        profile_prefix: record ORT's profile (`session.end_profiling()` writes it there)."""
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX file {path} does not exist")
        if provider not in ort.get_available_providers():
            raise UserError(
                f"execution provider {provider} is not available here "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = optimization_level(optimization)
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile_prefix)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[provider])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(f"{path} is not a loadable ONNX model: {str(exc).splitlines()[0]}") from None
        self.provider = provider
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(self.inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """UserError if a feed's rank or a fixed dim differs from the graph's."""
        for name, arg in self.inputs.items():
            if name not in feeds:
                raise UserError(f"missing input {name!r} (the graph takes {', '.join(self.input_names)})")
            shape = feeds[name].shape
            declared = arg.shape
            if len(shape) != len(declared) or any(
                isinstance(d, int) and d != s for d, s in zip(declared, shape)
            ):
                raise UserError(
                    f"input {name!r} has shape {list(shape)} but this graph takes {list(declared)}: "
                    "it was exported with a static shape; re-export with dynamic axes or feed that shape"
                )

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        outputs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outputs))


OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")


def optimization_level(name: str):
    """The ORT GraphOptimizationLevel called `name` (one of OPTIMIZATION_LEVELS)."""
    import onnxruntime as ort

    if name not in OPTIMIZATION_LEVELS:
        raise UserError(f"unknown optimization level {name!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
    level = ort.GraphOptimizationLevel
    return dict(zip(OPTIMIZATION_LEVELS, (level.ORT_DISABLE_ALL, level.ORT_ENABLE_BASIC,
                                          level.ORT_ENABLE_EXTENDED, level.ORT_ENABLE_ALL)))[name]
