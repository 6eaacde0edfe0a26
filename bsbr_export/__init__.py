"""bsbr-export: export BSBR attention models to ONNX and TorchScript, and prove them.

The names below are imported when first used (PEP 562), so `import bsbr_export.runtime.batching`
in a serving process loads numpy and onnxruntime, not torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BSBRConfig": "bsbr_export.model.config",
    "BSBRModel": "bsbr_export.model.native",
    "InputSpec": "bsbr_export.model.spec",
    "LayerState": "bsbr_export.model.native",
    "ModelSpec": "bsbr_export.model.spec",
    "OutputSpec": "bsbr_export.model.spec",
    "StateSpec": "bsbr_export.model.spec",
    "UserError": "bsbr_export.errors",
    "bsbr_attention": "bsbr_export.model.attention",
    "build_model": "bsbr_export.model.checkpoint",
    "export_module": "bsbr_export.export.pipeline",
    "from_upstream": "bsbr_export.model.upstream",
    "load_model": "bsbr_export.model.checkpoint",
    "save_model": "bsbr_export.model.checkpoint",
    "spec_for": "bsbr_export.model.probe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bsbr_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
