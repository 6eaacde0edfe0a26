"""Where an export's eager model comes from, and how validate and bench rebuild it.

Four adapters, one shape: a preset or checkpoint directory (a `BSBRConfig` model, either
flavor), a Hugging Face model directory (loaded by transformers, custom code only with
`trust_code`), a user's module by reference (`file.py:factory`, imported only with
`trust_code`), or a module object in memory (`export_module`). Each becomes a `Source`:
the module, its `ModelSpec` (computed once, here) and the record the manifest keeps.
Upstream bsbr 0.1.1 layers inside a user's module are swapped for their chunk-wise twins.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model
from torch import nn

from bsbr_export.errors import UserError
from bsbr_export.model.checkpoint import WEIGHTS_FILE, load_model, write_checkpoint
from bsbr_export.model.pretrained import directory_kind, load_pretrained, pretrained_record, tokenizer_files
from bsbr_export.model.probe import spec_for
from bsbr_export.model.spec import ModelSpec
from bsbr_export.model.upstream import NOT_CAUSAL, from_upstream, swap_upstream_layers
from bsbr_export.model.usercode import build_module, is_module_ref
from bsbr_export.model.weights import apply_state_dict, few_names, load_state_dict, nonfinite_tensors
from bsbr_export.model.zoo import get_preset


@dataclass(frozen=True)
class Source:
    """An eager module, its spec, and how to rebuild it (`record`, kept in the manifest)."""

    module: nn.Module
    spec: ModelSpec
    record: dict  # {"kind": "preset" | "checkpoint" | "pretrained" | "module" | "object", "ref": ...}
    swapped: tuple[dict, ...] = ()
    tokenizer: dict[str, bytes] = field(default_factory=dict)  # its files, written beside the weights

    @property
    def config(self):
        """The module's BSBRConfig, for the two config flavors (None for a user's module)."""
        return getattr(self.module, "config", None) if self.record["kind"] in ("preset", "checkpoint") else None


def from_module(
    module: nn.Module, spec: ModelSpec | None = None, *, ref: str | None = None, chunk_size: int | None = None
) -> Source:
    """A user's module (in memory, or built from `ref`): upstream layers swapped, spec computed."""
    if not isinstance(module, nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if type(module).__module__.startswith("bsbr.") and type(module).__name__ == "BSBRModel":
        module = from_upstream(module)  # heads and chunk size read from the object
    module = module.eval()
    check_weights_finite(module)
    swapped = tuple(swap_upstream_layers(module))
    spec = spec_for(module, spec, chunk_size)
    if swapped and spec.causal:
        # The package's layers are not causal: say so, and never stream them.
        spec = dataclasses.replace(spec, causal=False, state=None, note=NOT_CAUSAL)
    if spec.block_path is None:
        spec = dataclasses.replace(spec, **_blocks(module))
    record = {"kind": "module" if ref else "object", "ref": ref, "class": type(module).__qualname__}
    return Source(module, spec, record, swapped)


def _blocks(module: nn.Module) -> dict:
    """The first `nn.ModuleList` of blocks holding attention: where a failure is localized."""
    for name, sub in module.named_modules():
        if (
            isinstance(sub, nn.ModuleList)
            and len(sub)
            and any("Attention" in type(m).__name__ for m in sub[0].modules())
        ):
            return {"block_path": name, "num_blocks": len(sub)}
    return {}


def check_weights_finite(module: nn.Module) -> None:
    """UserError naming the parameters with NaN or infinite values: every parity check
    would otherwise just report `nan`."""
    broken = nonfinite_tensors(dict(module.named_parameters()))
    if broken:
        raise UserError(
            f"weights {few_names(broken)} hold NaN or infinite values: the model cannot be checked or exported"
        )


def load_source(
    model_ref,
    *,
    trust_code: bool = False,
    weights: str | os.PathLike | None = None,
    spec: ModelSpec | None = None,
    chunk_size: int | None = None,
) -> Source:
    """A preset name, a checkpoint directory, a module reference or a module -> Source."""
    if isinstance(model_ref, nn.Module):
        return from_module(model_ref, spec, chunk_size=chunk_size)
    if is_module_ref(str(model_ref)):
        module = build_module(str(model_ref), trust_code)
        if weights is not None:
            load_weights(module, weights)
        target, _, factory = str(model_ref).rpartition(":")
        # Recorded with an absolute file path: validate and bench may run from another directory.
        ref = f"{Path(target).resolve()}:{factory}" if target.endswith(".py") else str(model_ref)
        return from_module(module, spec, ref=ref, chunk_size=chunk_size)
    if Path(model_ref).is_dir() and directory_kind(model_ref) == "pretrained":
        if weights is not None:
            raise UserError(
                "--weights applies to a module reference (file.py:factory): a Hugging Face model "
                "directory holds its own weights"
            )
        return from_pretrained(model_ref, trust_code, spec, chunk_size)
    if weights is not None or spec is not None:
        raise UserError(
            "--weights and --spec apply to a module reference (file.py:factory) or a Hugging Face "
            "model directory, not to a preset or checkpoint directory"
        )
    model = load_model(model_ref)
    if Path(model_ref).is_dir():
        return Source(model, spec_for(model), {"kind": "checkpoint", "ref": str(model_ref)})
    spec = dataclasses.replace(spec_for(model), tokenizer=get_preset(str(model_ref)).tokenizer)
    return Source(model, spec, {"kind": "preset", "ref": str(model_ref)})


def from_pretrained(
    directory: str | os.PathLike, trust_code: bool, spec: ModelSpec | None = None, chunk_size: int | None = None
) -> Source:
    """A transformers model directory: the module transformers loads, its spec (text in
    and out through the directory's tokenizer.json when it has one), its tokenizer files."""
    directory = Path(directory).resolve()  # validate and bench may run from another directory
    source = from_module(load_pretrained(directory, trust_code), spec, ref=str(directory), chunk_size=chunk_size)
    tokenizer = tokenizer_files(directory, trust_code)
    spec = dataclasses.replace(source.spec, tokenizer="tokenizer.json") if tokenizer else source.spec
    record = {**source.record, "kind": "pretrained", **pretrained_record(directory)}
    return Source(source.module, spec, record, source.swapped, tokenizer)


def load_module(model_ref: str, *, trust_code: bool = False) -> nn.Module:
    """The bare eager module `model_ref` names (a module reference's factory called, a
    model directory or preset loaded), before any spec is computed: what `doctor` checks."""
    if is_module_ref(str(model_ref)):
        return build_module(str(model_ref), trust_code)
    if Path(model_ref).is_dir() and directory_kind(model_ref) == "pretrained":
        return load_pretrained(model_ref, trust_code)
    return load_model(model_ref)


def load_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict file (safetensors, or a pickle with weights_only) into `module`;
    one UserError listing every key or shape that does not fit, or every NaN weight."""
    apply_state_dict(
        module, load_state_dict(path), f"weights {Path(path).name}", mismatch=f"do not fit {type(module).__name__}"
    )


def write_source(source: Source, directory: Path) -> list[Path]:
    """The eager model's files in an export directory: a config model's checkpoint
    (config.json + model.safetensors), or a user's module's weights."""
    tokenizer = []
    for name, content in source.tokenizer.items():
        (directory / name).write_bytes(content)
        tokenizer.append(directory / name)
    if source.config is not None:
        return write_checkpoint(source.module, directory) + tokenizer
    save_model(source.module, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})  # shared weights deduped
    return [directory / WEIGHTS_FILE, *tokenizer]


def rebuild(directory: Path, manifest: dict, *, trust_code: bool = False, module: nn.Module | None = None) -> Source:
    """The eager model an export directory came from, with the spec it was exported with."""
    record = manifest.get("source") or {"kind": "checkpoint"}
    stored = manifest.get("spec")
    spec = ModelSpec.from_dict(stored) if isinstance(stored, dict) else None
    if record["kind"] in ("preset", "checkpoint"):
        model = load_model(directory)
        return Source(model, spec or spec_for(model), record)
    if module is None:
        if record["kind"] == "object" or not record.get("ref"):
            raise UserError(
                f"{directory} was exported from a module object in memory: validate it from Python with "
                "validate_export(dir, module=your_module), or export with a MODULE_REF (file.py:factory)"
            )
        rebuilders = {"pretrained": load_pretrained, "module": build_module}
        module = rebuilders[record["kind"]](record["ref"], trust_code)
    source = from_module(module, spec, ref=record.get("ref"))
    try:
        load_safetensors(source.module, str(directory / WEIGHTS_FILE))
    except (RuntimeError, OSError) as exc:
        raise UserError(
            f"the weights in {directory} do not fit the rebuilt module: {str(exc).splitlines()[0]}"
        ) from None
    return Source(source.module.eval(), spec or source.spec, record, source.swapped)
