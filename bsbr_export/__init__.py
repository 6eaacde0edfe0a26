"""bsbr-export: export BSBR attention models to ONNX and TorchScript, and prove them."""

from bsbr_export.attention import bsbr_attention
from bsbr_export.checkpoint import build_model, load_model, save_model
from bsbr_export.config import BSBRConfig
from bsbr_export.errors import UserError
from bsbr_export.model import BSBRModel, LayerState

__version__ = "0.1.0"

__all__ = [
    "BSBRConfig",
    "BSBRModel",
    "LayerState",
    "UserError",
    "bsbr_attention",
    "build_model",
    "load_model",
    "save_model",
]
