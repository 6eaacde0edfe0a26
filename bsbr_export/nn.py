"""BSBR attention as a layer for any architecture (the public name of `model/layers.py`).

from bsbr_export.nn import BSBRAttention
attn = BSBRAttention(hidden_size=256, num_heads=8, chunk_size=64, num_kv_heads=2, rope_theta=1e4)
"""

from bsbr_export.model.layers import BSBRAttention, LayerState, LayerUpdate

__all__ = ["BSBRAttention", "LayerState", "LayerUpdate"]
