"""`doctor` names the lines that tie an exported graph to the example's shape."""

from __future__ import annotations

import pytest
from conftest import run_cli, tiny_config
from torch import nn

from bsbr_export import build_model
from bsbr_export.nn import BSBRAttention
from bsbr_export.proof.doctor import diagnose

BROKEN = """
import math

import torch
from torch import nn


class ChunkLoop(nn.Module):
    chunk_size = 4

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        n = math.ceil(x.shape[1] / self.chunk_size)
        outs = []
        for i in range(n):  # the loop
            outs.append(self.proj(x[:, i * self.chunk_size : (i + 1) * self.chunk_size]).cumsum(1))
        return torch.cat(outs, dim=1)


def make():
    return ChunkLoop()
"""


def test_broken_module_is_caught_with_file_and_line(capsys, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text(BROKEN)
    line = BROKEN.splitlines().index("        for i in range(n):  # the loop") + 1
    code, out, _ = run_cli(capsys, "doctor", f"{path}:make", "--trust-code")
    assert code == 1
    assert f"{path}:{line}: for i in range(n):" in out
    assert "no Python loop over chunks" in out


def test_upstream_attention_is_caught_naming_its_lines():
    bsbr = pytest.importorskip("bsbr", reason="bsbr 0.1.1 is not installed (pip install --no-deps bsbr==0.1.1)")

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = bsbr.BSBRAttention(hidden_dim=16, num_heads=2, chunk_size=4, dropout=0.0)

        def forward(self, x):
            return self.attn(x)

    report = diagnose(Classifier())
    assert not report and not report.passed
    source = open(bsbr.bsbr.__file__).read().splitlines()
    masks = source.index("    def _create_masks(self, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:")
    loop = source.index("        for i in range(num_chunks):", masks) + 1
    found = {(f.file, f.line): f for f in report.findings}
    assert found[bsbr.bsbr.__file__, loop].code == "for i in range(num_chunks):"
    assert "no Python loop" in found[bsbr.bsbr.__file__, loop].advice
    padding = [f for f in report.findings if f.code == "if padding > 0:"]
    assert padding and all(f.file == bsbr.bsbr.__file__ for f in padding)
    assert "branch on a size" in padding[0].advice
    assert "sequence=" in padding[0].fails_at  # it names the lengths the graph would break at


def test_public_layer_is_clean():
    assert diagnose(BSBRAttention(hidden_size=16, num_heads=4, chunk_size=4, num_kv_heads=2, rope_theta=1e4))


def test_a_module_that_requires_its_mask_is_clean():
    """The mask goes in as export passes it, not missing (a TypeError reported as a line)."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.attn = BSBRAttention(hidden_size=16, num_heads=2, chunk_size=8, retrieval="gated")

        def forward(self, input_ids, attention_mask):
            return self.attn(self.embed(input_ids), attention_mask)

    report = diagnose(Tagger())
    assert report and len(report.inputs) == 2 and report.inputs[1].endswith("int64 [2, 25]")


def test_native_model_is_clean():
    assert diagnose(build_model(tiny_config()))
