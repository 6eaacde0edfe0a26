"""Loading and saving models: presets by name, checkpoint directories by path.

A checkpoint directory holds `config.json` (a `BSBRConfig` dict) and
`model.safetensors` (read by `weights.load_state_dict`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from bsbr_export.errors import UserError
from bsbr_export.io import atomic_dir, read_json
from bsbr_export.model.config import BSBRConfig
from bsbr_export.model.native import BSBRModel
from bsbr_export.model.upstream import UpstreamBSBRModel
from bsbr_export.model.weights import PICKLE_SUFFIXES, apply_state_dict, load_state_dict
from bsbr_export.model.zoo import get_preset

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def parameter_count(config: BSBRConfig) -> int:
    """How many parameters a model of `config` has (counted on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config)(config).parameters())


def check_fits_in_memory(config: BSBRConfig) -> None:
    """UserError before allocating a model whose float32 weights exceed this machine's RAM."""
    need = 4 * parameter_count(config)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total:
        raise UserError(
            f"a model with this config needs {need / 2**30:.1f} GiB for its weights, more than this "
            f"machine's {total / 2**30:.1f} GiB: check vocab_size, hidden_size, num_layers, ff_size"
        )


def build_model(config: BSBRConfig, seed: int = 0) -> BSBRModel:
    """A model with random weights drawn from `seed` (the global RNG is left alone)."""
    check_fits_in_memory(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)(config).eval()


def model_class(config: BSBRConfig) -> type[torch.nn.Module]:
    """The class that implements `config.flavor`: BSBRModel, or bsbr 0.1.1's numerics."""
    return BSBRModel if config.flavor == "native" else UpstreamBSBRModel


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
