"""A user's module, from a reference: `path/to/file.py:factory` or `package.module:factory`.

Importing a reference runs the user's code, so it needs an explicit `trust_code=True`
(`--trust-code`, like `trust_remote_code`). Every way a reference can be wrong is one
UserError line.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from bsbr_export.errors import UserError


def is_module_ref(text: str) -> bool:
    """Whether `text` looks like `file.py:factory` / `package.module:factory` (not a preset or dir)."""
    target, sep, attr = str(text).rpartition(":")
    return bool(sep and target and attr) and not Path(text).exists()


def load_factory(ref: str, trust_code: bool) -> Callable:
    """The callable a reference names (its module imported)."""
    target, sep, attr = str(ref).rpartition(":")
    if not (sep and target and attr):
        raise UserError(f"module reference {ref!r} must look like path/to/file.py:factory or package.module:factory")
    if not trust_code:
        raise UserError(f"importing {ref} runs its code: pass --trust-code (trust_code=True) if you trust it")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"cannot import {ref}: {path} does not exist")
        name = f"bsbr_user_{path.stem}_{abs(hash(path.resolve()))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise UserError(f"cannot import {ref}: no module named {exc.name!r}") from None
        except Exception as exc:
            raise UserError(f"importing {target} failed: {type(exc).__name__}: {exc}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UserError(f"cannot import {ref}: {target} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UserError(f"{ref} is a {type(factory).__name__}, not a callable that returns an nn.Module")
    return factory


def build_module(ref: str, trust_code: bool) -> nn.Module:
    """Call the reference's factory; UserError unless it returns an `nn.Module`."""
    factory = load_factory(ref, trust_code)
    try:
        module = factory()
    except Exception as exc:
        raise UserError(f"{ref}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"{ref}() returned a {type(module).__name__}, not a torch.nn.Module")
    return module
