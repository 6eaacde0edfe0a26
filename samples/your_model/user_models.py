"""Models of the kinds users write on `bsbr_export.nn`, each from a factory: a value head,
a pooled classifier, a rotary grouped-query decoder, upstream `bsbr`'s classifier, and a
layer that loops over chunks in Python (what `bsbr-export doctor` flags).

Each factory returns a small module with fixed random weights. The tests and
`tools/byo_parity.py` load them as a user's file is, by reference:

    bsbr-export export samples/your_model/user_models.py:value_head_model --trust-code
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsbr_export import BSBRConfig, build_model

TINY = dict(vocab_size=53, hidden_size=16, num_layers=2, num_heads=2, chunk_size=4, ff_size=32)


class ValueHead(nn.Module):
    """The native model with a second head: logits and a per-position value."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.body = build_model(BSBRConfig(**TINY, lm_head=False), seed=seed)
        torch.manual_seed(seed + 1)
        self.lm = nn.Linear(16, TINY["vocab_size"])
        self.value = nn.Linear(16, 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        hidden = self.body(input_ids, attention_mask)
        return {"logits": self.lm(hidden), "value": self.value(hidden)}

    # The streaming protocol, through the native model's own state.
    def init_state(self, batch_size: int):
        return self.body.init_state(batch_size)

    def stream(self, input_ids: Tensor, state):
        hidden, state = self.body.stream(input_ids, state)
        return {"logits": self.lm(hidden), "value": self.value(hidden)}, state


def value_head_model() -> ValueHead:
    return ValueHead(seed=3).eval()


class MeanPooled(nn.Module):
    """A sequence classifier on the native model: mean over valid positions -> classes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = build_model(BSBRConfig(**TINY, lm_head=False), seed=5)
        torch.manual_seed(6)
        self.classify = nn.Linear(16, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        hidden = self.body(input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        weights = attention_mask[..., None].to(hidden.dtype)
        return self.classify((hidden * weights).sum(1) / weights.sum(1))  # [batch, classes]


def pooled_model() -> MeanPooled:
    return MeanPooled().eval()


class UpstreamClassifier(nn.Module):
    """A text classifier on the upstream `bsbr.BSBRLayer`s: own embedding, mean pooling,
    a classification head."""

    def __init__(self) -> None:
        import bsbr

        super().__init__()
        torch.manual_seed(7)
        self.embed = nn.Embedding(41, 16)
        self.layers = nn.ModuleList(bsbr.BSBRLayer(16, 2, 4, 32, dropout=0.0) for _ in range(2))
        self.head = nn.Linear(16, 5)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


def upstream_classifier() -> UpstreamClassifier:
    return UpstreamClassifier().eval()


class ChunkLoop(nn.Module):
    """Deliberately broken: a Python loop over chunks with math.ceil, so a trace or an
    export freezes the chunk count of its example."""

    chunk_size = 4

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.embed = nn.Embedding(29, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 29)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        chunks = []
        for i in range(math.ceil(x.shape[1] / self.chunk_size)):
            part = x[:, i * self.chunk_size : (i + 1) * self.chunk_size]
            chunks.append(part + F.pad(part.cumsum(1), (0, 0, 0, 0))[:, -1:] * 0.1)
        return self.head(self.mix(torch.cat(chunks, 1)))


def chunk_loop() -> ChunkLoop:
    return ChunkLoop().eval()


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(hidden, inner), nn.Linear(hidden, inner), nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nn.Module):
    def __init__(self, hidden: int, retrieval: str = "sum") -> None:
        from bsbr_export.nn import BSBRAttention

        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.attn = BSBRAttention(
            hidden_size=hidden, num_heads=4, chunk_size=4, num_kv_heads=2, rope_theta=10000.0, retrieval=retrieval
        )
        self.mlp = SwiGLU(hidden, 2 * hidden)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), attention_mask)
        return x + self.mlp(self.norm2(x))

    def stream(self, x: Tensor, state):
        y, state = self.attn.stream(self.norm1(x), state)
        x = x + y
        return x + self.mlp(self.norm2(x)), state

    def step(self, x: Tensor, state):
        y, update = self.attn.step(self.norm1(x), state)
        x = x + y
        return x + self.mlp(self.norm2(x)), update


class RotaryDecoder(nn.Module):
    """A decoder on `bsbr_export.nn.BSBRAttention`: rotary positions, RMSNorm, SwiGLU,
    grouped-query heads (4 query heads, 2 key/value heads), tied LM head, streaming."""

    def __init__(self, vocab: int = 67, hidden: int = 32, layers: int = 2, retrieval: str = "sum") -> None:
        super().__init__()
        torch.manual_seed(11)
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(DecoderBlock(hidden, retrieval) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return self.norm(x) @ self.embed.weight.T

    def init_state(self, batch_size: int):
        return [layer.attn.init_state(batch_size) for layer in self.layers]

    def stream(self, input_ids: Tensor, state):
        x, new = self.embed(input_ids), []
        for layer, layer_state in zip(self.layers, state):
            x, layer_state = layer.stream(x, layer_state)
            new.append(layer_state)
        return self.norm(x) @ self.embed.weight.T, new

    def stream_update(self, input_ids: Tensor, state):
        """`stream`, returning per layer only what changed (the decode graph's protocol)."""
        x, updates = self.embed(input_ids), []
        for layer, layer_state in zip(self.layers, state):
            x, update = layer.step(x, layer_state)
            updates.append(update)
        return self.norm(x) @ self.embed.weight.T, updates


def rotary_decoder() -> RotaryDecoder:
    return RotaryDecoder().eval()


def gated_decoder() -> RotaryDecoder:
    """`rotary_decoder` with retrieval form `gated`, its gates and norm scales moved off
    their initial values (seeded) so each head's count."""
    model = RotaryDecoder(retrieval="gated")
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.retrieval_gate.copy_(torch.randn(layer.attn.retrieval_gate.shape, generator=generator) * 2)
            layer.attn.retrieval_norm.copy_(1 + torch.randn(layer.attn.retrieval_norm.shape, generator=generator) / 2)
    return model.eval()


class TokensOnly(nn.Module):
    """A decoder whose forward takes its token ids alone (no padding mask), under a name
    of its own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.decoder = RotaryDecoder(vocab=41)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(tokens)

    def init_state(self, batch_size: int):
        return self.decoder.init_state(batch_size)

    def stream(self, tokens: Tensor, state):
        return self.decoder.stream(tokens, state)


def tokens_only() -> TokensOnly:
    return TokensOnly().eval()


class TextOut(nn.Module):
    """Returns something that is not a tensor (export needs tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = MeanPooled()

    def forward(self, input_ids: Tensor) -> dict:
        return {"score": self.inner(input_ids), "label": "positive"}


def text_out() -> TextOut:
    return TextOut().eval()


def not_a_module():
    return 42


NOT_CALLABLE = 3
