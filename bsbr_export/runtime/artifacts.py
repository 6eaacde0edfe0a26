"""Each format of `formats.FORMATS` and its runner, by name: `RUNNERS`, `open_artifact`."""

from bsbr_export.runtime.aoti import AotiRunner
from bsbr_export.runtime.base import Runner
from bsbr_export.runtime.executorch import ExecuTorchRunner
from bsbr_export.runtime.onnx import OnnxRunner
from bsbr_export.runtime.ortweb import OrtWebRunner
from bsbr_export.runtime.torchscript import TorchScriptRunner

# format name -> runner class, each built as cls(path, input_names, output_names, **options).
RUNNERS: dict[str, type] = {
    "onnx": OnnxRunner,
    "torchscript": TorchScriptRunner,
    "torchscript-mobile": TorchScriptRunner,
    "aoti": AotiRunner,
    "executorch": ExecuTorchRunner,
    "web": OrtWebRunner,  # the page's graphs, in the runtime the page runs
}


def open_artifact(fmt: str, path, input_names: list[str], output_names: list[str], **options) -> Runner:
    """A runner over an artifact file of format `fmt`, named as the graph it mirrors."""
    return RUNNERS[fmt](path, input_names, output_names, **options)
