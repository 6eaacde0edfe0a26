"""Loading and saving models: presets by name, checkpoint directories by path.

A checkpoint directory holds `config.json` (a `BSBRConfig` dict) and
`model.safetensors`. Pickled state dicts (`.pt`, `.bin`) load only with
`torch.load(weights_only=True)`; a pickle that needs code to unpickle is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from bsbr_export.errors import UserError
from bsbr_export.io import atomic_dir, read_json
from bsbr_export.model.config import BSBRConfig
from bsbr_export.model.native import BSBRModel
from bsbr_export.model.zoo import get_preset

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def parameter_count(config: BSBRConfig) -> int:
    """How many parameters a model of `config` has (counted on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config)(config).parameters())


def check_fits_in_memory(config: BSBRConfig) -> None:
    """UserError before allocating a model whose float32 weights exceed this machine's RAM."""
    need = 4 * parameter_count(config)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total:
        raise UserError(f"a model with this config needs {need / 2**30:.1f} GiB for its weights, more than this "
                        f"machine's {total / 2**30:.1f} GiB: check vocab_size, hidden_size, num_layers, ff_size")


def build_model(config: BSBRConfig, seed: int = 0) -> BSBRModel:
    """A model with random weights drawn from `seed` (the global RNG is left alone)."""
    check_fits_in_memory(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)(config).eval()


def model_class(config: BSBRConfig) -> type[torch.nn.Module]:
    """The class that implements `config.flavor`: BSBRModel, or bsbr 0.1.1's numerics."""
    if config.flavor == "native":
        return BSBRModel
    from bsbr_export.model.upstream import UpstreamBSBRModel

    return UpstreamBSBRModel


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
        ("wrong shapes", [f"{k} {list(state[k].shape)} != {list(expected[k])}" for k in shared
                          if tuple(state[k].shape) != tuple(expected[k])]),
        ("not floating point", [k for k in shared if not state[k].is_floating_point()]),
    ]
    return [f"{label} {few_names(items)}" for label, items in listed if items]


def nonfinite_tensors(state: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf, in natural order: such
    weights make every output NaN, and every later check say "different"."""
    return sorted((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
                  key=_natural)


def apply_state_dict(model: torch.nn.Module, state: dict[str, Tensor], source: str,
                     mismatch: str = "does not match its config") -> None:
    """Copy `state` into `model`, or raise one UserError listing every mismatch
    (`{source} {mismatch}: ...`) or every non-finite weight."""
    problems = state_dict_problems(state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if problems:
        raise UserError(f"{source} {mismatch}: " + "; ".join(problems))
    broken = nonfinite_tensors(state)
    if broken:
        raise UserError(f"{source} holds NaN or infinite weights in {few_names(broken)}: the checkpoint is broken; "
                        "re-save it from a healthy model")
    model.load_state_dict(state)


def _natural(key: str) -> list:
    """Sort key: layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def few_names(items: list[str], limit: int = 6) -> str:
    """The first `limit` names, joined, with how many more there are."""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def read_config(directory: str | os.PathLike) -> BSBRConfig:
    """The `BSBRConfig` stored in a checkpoint directory's config.json."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{directory} is not a checkpoint directory: {CONFIG_FILE} is missing")
    return BSBRConfig.from_dict(read_json(path))


def _weights_file(directory: Path) -> Path:
    for name in (WEIGHTS_FILE, *(f"model{s}" for s in PICKLE_SUFFIXES), "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise UserError(f"{directory} has no weights: expected {WEIGHTS_FILE}")


def load_model(name_or_path: str | os.PathLike) -> BSBRModel:
    """A preset name (its trained weights, or random ones from its seed) or a checkpoint
    directory -> eval model."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise UserError(f"load_model takes a preset name or a checkpoint directory, got {name_or_path!r}")
    path = Path(name_or_path)
    if path.is_dir():
        config = read_config(path)
        weights = _weights_file(path)
        check_fits_in_memory(config)
        model = model_class(config)(config)
        apply_state_dict(model, load_state_dict(weights), str(weights))
        return model.eval()
    if path.exists():
        raise UserError(f"{path} is a file; pass a checkpoint directory ({CONFIG_FILE} + {WEIGHTS_FILE})")
    if os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        raise UserError(f"checkpoint directory {path} does not exist")
    preset = get_preset(str(name_or_path))
    model = build_model(preset.config, preset.seed)
    if preset.weights is not None:
        # Shipped in half precision to stay small; every engine runs them as fp32.
        state = {k: v.float() for k, v in load_state_dict(preset.weights).items()}
        apply_state_dict(model, state, f"preset {preset.name}'s weights {preset.weights.name}")
    return model.eval()


def save_model(model: BSBRModel, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `config.json` + `model.safetensors` to `directory`, atomically."""
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        write_checkpoint(model, tmp)
    return Path(directory)


def write_checkpoint(model: BSBRModel, directory: Path) -> list[Path]:
    """Write the checkpoint files into an existing (staging) directory."""
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    return [directory / CONFIG_FILE, directory / WEIGHTS_FILE]
