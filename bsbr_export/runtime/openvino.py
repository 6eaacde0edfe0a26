"""OpenVINO reading `model.onnx` for the CPU (`pip install ".[openvino]"`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bsbr_export.errors import UserError


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here (None when it can)."""
    try:
        import openvino  # noqa: F401  (optional extra: only its presence is asked)
    except ImportError:
        return 'OpenVINO is not installed: pip install ".[openvino]"'
    return None


class OpenVinoRunner:
    """`model.onnx` compiled by OpenVINO for the CPU at `precision` ("f32" or "bf16").

    bf16 is all or nothing here: OpenVINO 2026.4's CPU plugin ignores a
    `disable_fp16_compression_0` runtime-info entry set from Python (every op of
    bsbr-stdlib marked gave outputs identical to unmarked bf16), and Python has no other
    per-node precision control, so no part can be kept fp32 the way autocast does.
    """

    name = "openvino"

    def __init__(
        self,
        path: str | os.PathLike,
        input_names: list[str] | None = None,
        output_names: list[str] | None = None,
        *,
        precision: str = "f32",
        threads: int | None = None,
    ) -> None:
        missing = openvino_missing()
        if missing:
            raise UserError(missing)
        import openvino as ov  # optional extra, 59 MB: only when an OpenVINO engine runs

        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX file {path} does not exist")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except RuntimeError as exc:
            raise UserError(f"OpenVINO cannot read {path}: {str(exc).splitlines()[0]}") from None
        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer({n: feeds[n] for n in self.input_names})
        return {n: np.asarray(results[o]) for n, o in zip(self.output_names, self.compiled.outputs)}
