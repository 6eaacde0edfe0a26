"""State dicts: read from safetensors or (weights only) pickles, checked key by key.

Pickled state dicts (`.pt`, `.bin`) load only with `torch.load(weights_only=True)`; a
pickle that needs code to unpickle is refused.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from bsbr_export.errors import UserError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read tensors from a `.safetensors` file, or a `.pt`/`.pth`/`.bin` with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path} is not a readable safetensors file: {exc}") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            with warnings.catch_warnings():
                # A raw pickle (not torch.save's zip) warns about its protocol before the
                # refusal below; the refusal is the one line the user needs.
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(
                f"refusing to load {path}: it needs code execution to unpickle "
                "(only weights_only=True loading is allowed); re-save it as a plain state_dict "
                "or as safetensors"
            ) from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise UserError(f"{path} is not a readable PyTorch checkpoint: {exc}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise UserError(f"{path} does not hold a state_dict (a dict of name -> tensor)")
        return state
    raise UserError(
        f"unsupported checkpoint file {path.name}: expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}"
    )


def state_dict_problems(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps `state` from matching `expected` (name -> shape): missing keys,
    unexpected keys, wrong shapes, tensors that are not floating point. Empty if it fits."""
    shared = sorted(set(state) & set(expected), key=_natural)
    listed = [
        ("missing", sorted(set(expected) - set(state), key=_natural)),
        ("unexpected", sorted(set(state) - set(expected), key=_natural)),
        (
            "wrong shapes",
            [
                f"{k} {list(state[k].shape)} != {list(expected[k])}"
                for k in shared
                if tuple(state[k].shape) != tuple(expected[k])
            ],
        ),
        ("not floating point", [k for k in shared if not state[k].is_floating_point()]),
    ]
    return [f"{label} {few_names(items)}" for label, items in listed if items]


def nonfinite_tensors(state: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf, in natural order: such
    weights make every output NaN, and every later check say "different"."""
    return sorted(
        (k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), key=_natural
    )


def apply_state_dict(
    model: torch.nn.Module, state: dict[str, Tensor], source: str, mismatch: str = "does not match its config"
) -> None:
    """Copy `state` into `model`, or raise one UserError listing every mismatch
    (`{source} {mismatch}: ...`) or every non-finite weight."""
    problems = state_dict_problems(state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if problems:
        raise UserError(f"{source} {mismatch}: " + "; ".join(problems))
    broken = nonfinite_tensors(state)
    if broken:
        raise UserError(
            f"{source} holds NaN or infinite weights in {few_names(broken)}: the checkpoint is broken; "
            "re-save it from a healthy model"
        )
    model.load_state_dict(state)


def _natural(key: str) -> list:
    """Sort key: layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def few_names(items: list[str], limit: int = 6) -> str:
    """The first `limit` names, joined, with how many more there are."""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
