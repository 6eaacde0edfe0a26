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


class ModuleRunner:
    """A loaded torch callable run with the feeds as tensors, in `input_names` order."""

    module = None
    input_names: list[str]
    output_names: list[str]

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)

    def call(self, *tensors: torch.Tensor):
        return self.module(*tensors)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = self.call(*(self.tensor(feeds[n]) for n in self.input_names))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        # numpy has no bfloat16: reduced-precision outputs come back as fp32.
        return {n: (o.float() if o.dtype in (torch.bfloat16, torch.float16) else o).numpy()
                for n, o in zip(self.output_names, outputs)}
