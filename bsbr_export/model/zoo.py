"""The model zoo: one TOML preset per model in the top-level `models/` folder."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bsbr_export.errors import UserError
from bsbr_export.model.config import BSBRConfig


@dataclass(frozen=True)
class Preset:
    """A named model: its config, and its trained weights or the seed of random ones."""

    name: str
    description: str
    seed: int
    config: BSBRConfig
    weights: Path | None = None  # trained weights (safetensors beside the TOML), else random from `seed`
    tokenizer: str | None = None  # "bytes": token ids are UTF-8 bytes (bits per byte are defined)
    heldout_bpb: float | None = None  # what the trained weights score on the default held-out text
    heldout_sha256: str | None = None  # of that text as the training machine read it


def presets_dir() -> Path:
    """Where the preset files are: inside the installed wheel, or the source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "presets"
    return installed if installed.is_dir() else here.parents[1] / "models"


def list_presets() -> dict[str, Preset]:
    """Every preset, by name, sorted."""
    return {path.stem: _read(path) for path in sorted(presets_dir().glob("*.toml"))}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or a UserError naming the closest ones."""
    path = presets_dir() / f"{name}.toml"
    if not path.is_file():
        names = sorted(p.stem for p in presets_dir().glob("*.toml"))
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known presets: {', '.join(names)}"
        raise UserError(f"unknown model {name!r}: not a preset or a checkpoint directory; {hint}")
    return _read(path)


def _read(path: Path) -> Preset:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"preset {path} is not valid TOML: {exc}") from None
    weights = data.get("weights")
    return Preset(
        name=path.stem,
        description=data.get("description", ""),
        seed=int(data.get("seed", 0)),
        config=BSBRConfig.from_dict(data.get("config", {})),
        weights=path.parent / weights if weights else None,
        tokenizer=data.get("tokenizer"),
        heldout_bpb=data.get("heldout_bpb"),
        heldout_sha256=data.get("heldout_sha256"),
    )
