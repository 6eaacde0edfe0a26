"""Versions of everything that shapes an artifact, for metadata and reports."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("bsbr-export", "torch", "onnx", "onnxscript", "onnxruntime", "numpy")


def versions() -> dict[str, str]:
    """Installed versions of the packages that make and run artifacts, plus Python."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
