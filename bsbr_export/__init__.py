"""bsbr-export: export BSBR attention models to ONNX and TorchScript, and prove them."""

from bsbr_export.errors import UserError
from bsbr_export.export.pipeline import export_module
from bsbr_export.model.attention import bsbr_attention
from bsbr_export.model.checkpoint import build_model, load_model, save_model
from bsbr_export.model.config import BSBRConfig
from bsbr_export.model.native import BSBRModel, LayerState
from bsbr_export.model.spec import InputSpec, ModelSpec, OutputSpec, StateSpec, spec_for
from bsbr_export.model.upstream import from_upstream

__version__ = "0.1.0"

__all__ = [
    "BSBRConfig",
    "BSBRModel",
    "InputSpec",
    "LayerState",
    "ModelSpec",
    "OutputSpec",
    "StateSpec",
    "UserError",
    "bsbr_attention",
    "build_model",
    "export_module",
    "from_upstream",
    "load_model",
    "save_model",
    "spec_for",
]
