"""Hugging Face model directories (written by `save_pretrained`), loaded by transformers itself.

A directory whose `config.json` names an architecture, a `model_type` or an `auto_map` is
a transformers model: `AutoModelForCausalLM` (or `AutoModel` when the config names no
causal-LM class) loads it with `from_pretrained`, which reads sharded safetensors and
any saved dtype; it is loaded as float32, the precision every check compares in. Custom
code (`auto_map`) is imported only with `trust_code`, like `trust_remote_code`; without
it transformers is never asked (it would prompt on a terminal). Tokenizer files beside
the weights travel with the export (`tokenizer_files`), converted to a tokenizer.json by
transformers when they are another tokenizer's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from bsbr_export.errors import UserError
from bsbr_export.io import read_json
from bsbr_export.model.config import BSBRConfig

CONFIG_FILE = "config.json"
# Keys only a transformers config has (a BSBRConfig has none of them).
TRANSFORMERS_KEYS = ("architectures", "auto_map", "model_type")
# What the `tokenizers` library reads, and the transformers files that say which ids are special.
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
# Other tokenizers' files, which transformers converts to a tokenizer.json.
CONVERTIBLE_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt")
INSTALL = 'pip install -c constraints.txt "bsbr-export[hf]" (in a checkout: ".[hf]")'


def directory_kind(directory: str | Path) -> str:
    """ "checkpoint" (a BSBRConfig config.json) or "pretrained" (a transformers model
    directory), decided from the directory's config.json; a UserError when it is neither."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    neither = (
        f"{directory} is neither a bsbr-export checkpoint ({CONFIG_FILE} of a BSBRConfig + model.safetensors) "
        f"nor a Hugging Face model directory ({CONFIG_FILE} with architectures or auto_map, as save_pretrained "
        "writes)"
    )
    if not path.is_file():
        raise UserError(f"{neither}: it has no {CONFIG_FILE}")
    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError(f"{neither}: {CONFIG_FILE} is not a JSON object")
    if any(key in config for key in TRANSFORMERS_KEYS):
        return "pretrained"
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(BSBRConfig)})
    if unknown:
        raise UserError(f"{neither}: {CONFIG_FILE} has keys {unknown[:4]} of neither")
    return "checkpoint"


def _transformers():
    try:
        import transformers  # optional (the `hf` extra): only model directories need it
    except ImportError:
        raise UserError(f"loading a Hugging Face model directory needs transformers: {INSTALL}") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # the CLI renders its own output
    return transformers


def auto_class(config: dict) -> str:
    """The transformers auto class that loads a model of `config`: the causal-LM one when
    the config maps or names a causal-LM class, else the bare `AutoModel`."""
    names = [*config.get("auto_map", {}), *(config.get("architectures") or ())]
    causal = any(n == "AutoModelForCausalLM" or n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)
    return "AutoModelForCausalLM" if causal else "AutoModel"


def load_pretrained(directory: str | Path, trust_code: bool) -> nn.Module:
    """The float32 eval module a transformers model directory holds."""
    directory = Path(directory)
    config = read_json(directory / CONFIG_FILE)
    if "auto_map" in config and not trust_code:
        raise UserError(
            f"{directory} ships its own model code ({', '.join(config['auto_map'].values())}): loading "
            "it imports and runs that code; pass --trust-code if you trust it (like trust_remote_code)"
        )
    transformers = _transformers()
    import torch  # float32 by name only; torch is loaded by now

    loader = getattr(transformers, auto_class(config))
    try:
        model = loader.from_pretrained(
            directory, trust_remote_code=trust_code, local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as exc:  # transformers' own errors for a directory it cannot read
        raise UserError(f"transformers cannot load {directory}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def pretrained_record(directory: str | Path) -> dict:
    """What the manifest keeps of a model directory beside its path: the dtype its weights
    were saved in, its end-of-text id (where generation stops), the transformers version."""
    config = read_json(Path(directory) / CONFIG_FILE)
    return {
        "saved_dtype": config.get("dtype") or config.get("torch_dtype"),
        "eos_token_id": config.get("eos_token_id"),
        "transformers": _transformers().__version__,
    }


def tokenizer_files(directory: str | Path, trust_code: bool) -> dict[str, bytes]:
    """The tokenizer an export of `directory` carries, file name -> content: its
    `tokenizer.json` (the `tokenizers` library's file) with the transformers files that
    name its special tokens, as they are; else, when it holds another tokenizer's files
    (vocab.json + merges.txt, a SentencePiece model, vocab.txt), the tokenizer.json that
    transformers' AutoTokenizer converts them to; else nothing (ids in, ids out)."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).is_file():
        return {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}
    if not any((directory / name).is_file() for name in CONVERTIBLE_FILES):
        return {}
    settings = directory / "tokenizer_config.json"
    if settings.is_file() and "auto_map" in read_json(settings) and not trust_code:
        raise UserError(f"{directory}'s tokenizer ships its own code: pass --trust-code if you trust it")
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            directory, trust_remote_code=trust_code, local_files_only=True
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:  # transformers' errors for files it cannot read
        raise UserError(f"transformers cannot load the tokenizer in {directory}: {str(exc).splitlines()[0]}") from None
    if not tokenizer.is_fast:
        raise UserError(
            f"the tokenizer in {directory} ({type(tokenizer).__name__}) has no tokenizer.json form; "
            "save it with a fast tokenizer (tokenizer.save_pretrained) to carry it into the export"
        )
    return {TOKENIZER_FILE: tokenizer.backend_tokenizer.to_str().encode()}
