from __future__ import annotations

import json

import pytest

from bsbr_export import BSBRConfig, UserError


def test_round_trip_through_json():
    cfg = BSBRConfig(hidden_size=64, num_heads=8, compression=12, lm_head=False)
    assert BSBRConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.head_dim == 8 and cfg.state_size == 12
    assert BSBRConfig(hidden_size=64, num_heads=8).state_size == 64


def test_frozen():
    with pytest.raises(AttributeError):
        BSBRConfig().hidden_size = 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=30, num_heads=4), "not divisible by num_heads"),
        (dict(chunk_size=0), "chunk_size must be a positive integer"),
        (dict(num_layers=-1), "num_layers must be a positive integer"),
        (dict(compression=0), "compression must be a positive integer"),
        (dict(dropout=1.5), "dropout must be in"),
        (dict(layer_norm_eps=0), "layer_norm_eps must be > 0"),
        (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
        (dict(retrieval="linear"), "retrieval must be one of 'sum', 'gated'"),
        (dict(flavor="bsbr-0.1.1", lm_head=False, retrieval="gated"), "flavor 'bsbr-0.1.1' has retrieval 'sum' only"),
    ],
)
def test_impossible_values_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        BSBRConfig(**kwargs)


def test_unknown_keys_named():
    with pytest.raises(UserError, match="unknown config keys \\['hiden_size'\\]"):
        BSBRConfig.from_dict({"hiden_size": 3})
