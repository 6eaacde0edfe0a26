"""`BSBRConfig`: the one object that describes a BSBR model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bsbr_export.errors import UserError

FLAVORS = ("native", "bsbr-0.1.1")
RETRIEVAL_FORMS = ("sum", "gated")  # how a token's output joins the local and retrieved terms
UPSTREAM_POSITIONS = 5000  # rows of bsbr 0.1.1's positional table (`pos_encoding.pe`)


@dataclass(frozen=True)
class BSBRConfig:
    """Every number that fixes a BSBR model's shape and math (see DESIGN.md)."""

    vocab_size: int = 1000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    chunk_size: int = 64  # c: tokens per chunk
    ff_size: int = 1024
    compression: int | None = None  # m: chunk states compressed e^2 -> m when set
    lm_head: bool = True  # causal-LM head tied to the embedding; off -> hidden states
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    # "native" (DESIGN.md's causal model) or "bsbr-0.1.1" (the PyPI package's numerics,
    # not causal; see bsbr_export/model/upstream.py). For bsbr-0.1.1, `compression` is the
    # compressed width hidden // compression_factor, and max_positions extends its
    # 5000-row positional table (None keeps the package's limit).
    flavor: str = "native"
    max_positions: int | None = None
    # How a token's output joins the local and retrieved terms (DESIGN.md): "sum", the
    # brief's and bsbr-0.1.1's `local + q S`, or "gated", `(1 - g) local + g RMSNorm(q S)`.
    retrieval: str = "sum"

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "chunk_size", "ff_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer (got {value!r})")
        if not problems and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.compression is not None and (
            not isinstance(self.compression, int) or isinstance(self.compression, bool) or self.compression < 1
        ):
            problems.append(f"compression must be a positive integer or null (got {self.compression!r})")
        if not isinstance(self.lm_head, bool):
            problems.append(f"lm_head must be true or false (got {self.lm_head!r})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout!r})")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            problems.append(f"layer_norm_eps must be > 0 (got {self.layer_norm_eps!r})")
        if self.retrieval not in RETRIEVAL_FORMS:
            problems.append(
                f"retrieval must be one of {', '.join(map(repr, RETRIEVAL_FORMS))} (got {self.retrieval!r})"
            )
        problems += self._flavor_problems()
        if problems:
            raise UserError("invalid BSBRConfig: " + "; ".join(problems))

    def _flavor_problems(self) -> list[str]:
        if self.flavor not in FLAVORS:
            return [f"flavor must be one of {', '.join(map(repr, FLAVORS))} (got {self.flavor!r})"]
        if self.flavor == "native":
            return [] if self.max_positions is None else ["max_positions applies to flavor 'bsbr-0.1.1' only"]
        problems = []
        if self.retrieval != "sum":
            problems.append("flavor 'bsbr-0.1.1' has retrieval 'sum' only")
        if self.lm_head is not False:
            problems.append("flavor 'bsbr-0.1.1' has no LM head: set lm_head to false")
        if isinstance(self.hidden_size, int) and self.hidden_size % 2:
            problems.append(f"flavor 'bsbr-0.1.1' needs an even hidden_size (got {self.hidden_size})")
        mp = self.max_positions
        if mp is not None and (not isinstance(mp, int) or isinstance(mp, bool) or mp < UPSTREAM_POSITIONS):
            problems.append(f"max_positions must be null or an integer >= {UPSTREAM_POSITIONS} (got {mp!r})")
        return problems

    @property
    def causal(self) -> bool:
        """Whether an output never depends on later tokens (and so the model can stream)."""
        return self.flavor == "native"

    @property
    def head_dim(self) -> int:
        """e = hidden / heads."""
        return self.hidden_size // self.num_heads

    @property
    def state_size(self) -> int:
        """Width of one stored chunk state: m when compressed, else e^2."""
        return self.compression if self.compression is not None else self.head_dim**2

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the form stored in config.json and ONNX metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BSBRConfig:
        """Build from `to_dict()` output; missing keys take defaults, unknown keys are a UserError."""
        if not isinstance(data, dict):
            raise UserError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)
