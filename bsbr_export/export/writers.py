"""The writers the rows of `formats.FORMATS` name: how export writes an artifact,
refuses options it cannot honor, and describes what it wrote.

Each writer writes one artifact atomically after checking it (`export/checks.py`);
callers reach a format's through `write_artifact` & co. with the options it takes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bsbr_export.export import onnx, torchscript
from bsbr_export.export.aoti import check_device_option, export_aoti, package_settings
from bsbr_export.export.executorch import check_limits, export_executorch
from bsbr_export.export.web import check_web, write_web
from bsbr_export.formats import Format, resolve
from bsbr_export.runtime.executorch import program_settings


@dataclass(frozen=True)
class Writer:
    """write(model, path, kind, spec, **options) -> files written (the artifact first);
    check(spec, **options) -> UserError for options it cannot honor; describe(path) ->
    settings the manifest records for the artifact."""

    write: Callable[..., list[Path]]
    check: Callable[..., None] = lambda spec, **options: None
    describe: Callable[[Path], dict] = lambda path: {}


def _onnx(model, path, kind, spec, **options):
    return onnx.export_onnx(model, path, spec=spec, kind=kind, **options)


def _torchscript(mobile: bool):
    def write(model, path, kind, spec):
        return [
            torchscript.export_torchscript(
                model, path, spec=spec, streaming=kind == "streaming", decode=kind == "decode", mobile=mobile
            )
        ]

    return write


ONNX = Writer(_onnx)
TORCHSCRIPT = Writer(_torchscript(mobile=False))
TORCHSCRIPT_MOBILE = Writer(_torchscript(mobile=True))
AOTI = Writer(
    lambda model, path, kind, spec, device=None: [export_aoti(model, path, spec, kind, device)],
    check=check_device_option,
    describe=package_settings,
)
EXECUTORCH = Writer(
    lambda model, path, kind, spec, **limits: [export_executorch(model, path, spec, **limits)],
    check=check_limits,
    describe=program_settings,
)
WEB = Writer(write_web, check=lambda spec, **options: check_web(spec))


def write_artifact(fmt: Format, model, path: Path, kind: str, spec, **options) -> list[Path]:
    """Write one artifact of `fmt` with the options it takes (others are dropped)."""
    return resolve(fmt.writer).write(model, path, kind, spec, **fmt.own(options))


def check_options(fmt: Format, spec, **options) -> None:
    """UserError, before any work, if `fmt` cannot honor its options for `spec`."""
    resolve(fmt.writer).check(spec, **fmt.own(options))


def describe_artifact(fmt: Format, path: Path) -> dict:
    """The settings the manifest records for an artifact of `fmt` at `path`."""
    return resolve(fmt.writer).describe(path)


# Where the README named them before the stages were layered: kept one release.
MOVED = {"export_onnx": onnx, "export_torchscript": torchscript}


def __getattr__(name: str):
    if name in MOVED:
        module = MOVED[name]
        warnings.warn(
            f"bsbr_export.export.writers.{name} moved to {module.__name__}.{name}; the old path goes in "
            "the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
