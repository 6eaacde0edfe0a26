"""The one contract every runner keeps: `input_names`, `output_names`, and
`infer(feeds) -> outputs`, dicts of name -> numpy array. Callers never reach around it."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class Runner(Protocol):
    """An engine that answers feeds with outputs, both named (numpy in, numpy out)."""

    input_names: list[str]
    output_names: list[str]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def cuda_missing() -> str | None:
    """Why torch cannot run on a CUDA GPU here (None when it can)."""
    if torch.cuda.is_available():
        return None
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"torch {torch.__version__} ({build}) sees no CUDA GPU here"


class ModuleRunner:
    """A loaded torch callable run with the feeds as tensors on `device`, in
    `input_names` order; outputs come back to the host."""

    module = None
    device = torch.device("cpu")
    input_names: list[str]
    output_names: list[str]

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def call(self, *tensors: torch.Tensor):
        return self.module(*tensors)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = self.call(*(self.tensor(feeds[n]) for n in self.input_names))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        # numpy has no bfloat16: reduced-precision outputs come back as fp32.
        return {
            n: (o.float() if o.dtype in (torch.bfloat16, torch.float16) else o).cpu().numpy()
            for n, o in zip(self.output_names, outputs)
        }
