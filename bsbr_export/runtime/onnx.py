"""ONNX Runtime sessions, one execution provider and optimization level each."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bsbr_export.defaults import OPTIMIZATION_LEVELS
from bsbr_export.errors import UserError


def available_providers() -> list[str]:
    """ONNX Runtime execution providers usable on this machine."""
    return ort.get_available_providers()


def provider_engine(provider: str) -> str:
    """Short engine label of a provider: CPUExecutionProvider -> ort-cpu."""
    return "ort-" + provider.removesuffix("ExecutionProvider").lower()


def optimization_level(name: str) -> ort.GraphOptimizationLevel:
    """The ORT GraphOptimizationLevel called `name` (one of OPTIMIZATION_LEVELS)."""
    if name not in OPTIMIZATION_LEVELS:
        raise UserError(f"unknown optimization level {name!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
    level = ort.GraphOptimizationLevel
    return dict(
        zip(
            OPTIMIZATION_LEVELS,
            (level.ORT_DISABLE_ALL, level.ORT_ENABLE_BASIC, level.ORT_ENABLE_EXTENDED, level.ORT_ENABLE_ALL),
        )
    )[name]


class OnnxRunner:
    """An ONNX Runtime session on one execution provider. Its names are the graph's own
    (`input_names` / `output_names` given by a caller are checked against them).

    Inputs are checked against the graph's declared shapes first, so a static-shape
    graph fed another shape fails with a clear UserError, not an ORT stack dump.
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        input_names: list[str] | None = None,
        output_names: list[str] | None = None,
        *,
        provider: str = "CPUExecutionProvider",
        optimization: str = "all",
        threads: int | None = None,
        optimized_path: str | os.PathLike | None = None,
        spinning: bool = False,
        profile_prefix: str | os.PathLike | None = None,
        io_binding: bool = False,
    ) -> None:
        """optimized_path: also save the graph as ORT optimized it (optimized_model_filepath).
        io_binding: feed and fetch through an IOBinding on the provider's device (`prepare`
        binds feeds once, so a GPU's timed call copies nothing to or from the host).
        spinning: let idle intra-op threads spin for the next op (ORT's default), which
        saves their wake-up on every node but steals cores from anything else running in
        the process, so only a session alone in its process (a bench worker) asks for it.
        profile_prefix: record ORT's profile (`session.end_profiling()` writes it there)."""
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
        self.provider, self.io_binding = provider, io_binding
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(self.inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        for given, own in ((input_names, self.input_names), (output_names, self.output_names)):
            if given is not None and set(given) != set(own):
                raise UserError(f"{path.name} has {', '.join(own)}, expected {', '.join(given)}: re-export it")

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """UserError if a feed's rank or a fixed dim differs from the graph's."""
        for name, arg in self.inputs.items():
            if name not in feeds:
                raise UserError(f"missing input {name!r} (the graph takes {', '.join(self.input_names)})")
            shape = feeds[name].shape
            declared = arg.shape
            if len(shape) != len(declared) or any(isinstance(d, int) and d != s for d, s in zip(declared, shape)):
                raise UserError(
                    f"input {name!r} has shape {list(shape)} but this graph takes {list(declared)}: "
                    "it was exported with a static shape; re-export with dynamic axes or feed that shape"
                )

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.io_binding:
            run = self.prepare(feeds)
            return dict(zip(self.output_names, run().copy_outputs_to_cpu()))
        self.check_feeds(feeds)
        outputs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outputs))

    def prepare(self, feeds: dict[str, np.ndarray]):
        """The feeds copied once to the provider's device and the outputs bound there:
        returns a call that runs the graph on them and returns the binding (its outputs
        stay on the device until `copy_outputs_to_cpu`)."""
        self.check_feeds(feeds)
        binding = self.session.io_binding()
        for name in self.input_names:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(feeds[name], self.device, 0))
        for name in self.output_names:
            binding.bind_output(name, self.device)

        def run():
            self.session.run_with_iobinding(binding)
            return binding

        return run
