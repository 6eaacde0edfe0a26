"""The zoo: the trained byte-level preset ships in the package, small, loads as fp32,
and still scores what its training run recorded on the held-out text."""

from __future__ import annotations

import hashlib

import pytest
import torch

from bsbr_export import load_model
from bsbr_export.model.sources import load_source
from bsbr_export.model.zoo import get_preset, list_presets
from bsbr_export.proof.evaltext import bits_per_byte, heldout_text, logits_of
from bsbr_export.runtime.eager import EagerRunner

TRAINED = "bsbr-stdlib"


def test_trained_preset_ships_small_fp16_weights():
    preset = get_preset(TRAINED)
    assert preset.weights is not None and preset.weights.is_file()
    assert preset.weights.stat().st_size <= 8 * 2**20
    assert preset.tokenizer == "bytes" and preset.config.vocab_size == 256
    assert TRAINED in list_presets()
    model = load_model(TRAINED)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training


def test_trained_preset_matches_its_recorded_heldout_bits_per_byte():
    preset = get_preset(TRAINED)
    text = heldout_text()
    if hashlib.sha256(text).hexdigest() != preset.heldout_sha256:
        pytest.skip("this Python's stdlib differs from the one the preset was scored on: other held-out text")
    source = load_source(TRAINED)
    assert source.spec.tokenizer == "bytes"
    bpb = bits_per_byte(logits_of(EagerRunner(source.module, source.spec), source.spec), text)
    # Same text and weights as the training run scored: only summation order differs.
    assert bpb == pytest.approx(preset.heldout_bpb, rel=1e-4)
    assert bpb < 4.0  # trained: far below the 8 bits of a uniform guess


def test_random_presets_have_no_weights_file():
    for name, preset in list_presets().items():
        if name != TRAINED:
            assert preset.weights is None and preset.tokenizer is None
