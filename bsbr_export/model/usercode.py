"""Load a user's module from a reference: `path/to/file.py:factory` or `package.module:factory`.

The factory is any callable that takes no arguments and returns a `torch.nn.Module`.
Importing it runs the user's code, so every entry point asks for `trust_code=True`
(`--trust-code` on the command line), like `trust_remote_code` in transformers.
Every way a reference can be wrong is a one-line `UserError`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from torch import nn

from bsbr_export.errors import UserError

FORM = "path/to/file.py:factory or package.module:factory"


def is_module_ref(text: str) -> bool:
    """Whether `text` is a module reference (`file.py:factory`), not a preset or directory."""
    target, sep, name = str(text).rpartition(":")
    return bool(sep and target and name.isidentifier()) and not Path(text).exists()


def export_name(ref: str) -> str:
    """A short name for what `ref` points at: a reference's factory (`file.py:build` ->
    `build`), a preset's or directory's own name. Default export dirs and Triton models use it."""
    return str(ref).rpartition(":")[2] if is_module_ref(ref) else Path(str(ref)).name


def load_factory(ref: str, trust_code: bool) -> Callable[[], object]:
    """Import the module `ref` names and return its factory (not called yet).

    Raises UserError without `trust_code`, when the file, module or attribute does not
    exist, or when the attribute is not callable.
    """
    if not trust_code:
        raise UserError(
            f"loading {ref!r} imports and runs its code: pass --trust-code if you trust it (like trust_remote_code)"
        )
    target, _, name = ref.rpartition(":")  # rpartition: a Windows path keeps its drive colon
    if not target or not name.isidentifier():
        raise UserError(f"module reference {ref!r} is not {FORM}")
    module = _import_file(target) if target.endswith(".py") else _import_module(target)
    if not hasattr(module, name):
        public = [n for n in vars(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, public, n=1)
        hint = f": did you mean {close[0]!r}?" if close else ""
        raise UserError(f"{target} has no attribute {name!r}{hint}")
    factory = getattr(module, name)
    if not callable(factory):
        raise UserError(f"{ref} is a {type(factory).__name__}, not a callable that returns an nn.Module")
    return factory


def build_module(ref: str, trust_code: bool) -> nn.Module:
    """Call the factory `ref` names and return its module (see `load_factory`).

    Raises UserError when the factory returns something that is not an `nn.Module`.
    """
    module = load_factory(ref, trust_code)()
    if not isinstance(module, nn.Module):
        raise UserError(f"{ref} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _import_file(target: str) -> ModuleType:
    path = Path(target)
    if not path.is_file():
        raise UserError(f"{target}: no such file (module reference is {FORM})")
    name = f"bsbr_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, so dataclasses and pickling inside the file can find it;
    # its folder goes first on the path while it runs, so it can import its sibling files.
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.pop(0)
    return module


def _import_module(target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
            raise UserError(f"no module named {exc.name!r} (module reference is {FORM})") from None
        raise  # a missing import inside the user's own code: its traceback says where
