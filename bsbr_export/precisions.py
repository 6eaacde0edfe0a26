"""The one table of reduced precisions, as data (as formats.py is for formats): the file
that holds each in an export directory, what it is made from, the engines that run it,
the CPU matrix units that make it pay, and how `optimize` and `bench` make it.

`optimize`'s options and `bench`'s plan derive from these rows, and the engines that run
a precision read its file name here. Adding a precision adds a row, the step that makes
it (`proof/optimize.py`) and the engine rows that run it (`runtime/engines.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from bsbr_export.formats import ONNX, artifact_name

BF16_PLAN = "bf16.json"  # in an export dir: the fp32 groups `optimize --bf16` measured, per engine


@dataclass(frozen=True)
class Precision:
    """A reduced precision `optimize` makes."""

    name: str
    option: str  # optimize's keyword (and, dashed, its command-line flag)
    artifact: str  # written into the export dir once made
    engines: tuple[str, ...]  # the engines that run it
    help: str  # what optimize's flag does
    source: str | None = artifact_name(ONNX)  # None: made from the eager model
    units: tuple[str, ...] = ()  # CPU features that make it pay (as /proc/cpuinfo spells them)
    by_bench: bool = True  # False: only `optimize` makes it, on request
    by_default: bool = False  # whether `optimize` makes it unless told not to
    provider: str | None = None  # made by default only where this ONNX Runtime provider is

    @property
    def flag(self) -> str:
        """optimize's command-line flag."""
        return "--" + self.option.replace("_", "-")


INT8_UNITS = ("avx512_vnni", "amx_int8")
PRECISIONS = (
    Precision(
        "int8",
        "int8",
        artifact_name(ONNX, variant="int8"),
        ("ort-cpu-int8",),
        "Also write an int8 dynamic-quantized graph.",
        units=INT8_UNITS,
        by_default=True,
    ),
    # Calibrated QDQ takes a calibration pass on top of the sensitivity search.
    Precision(
        "int8-static",
        "static_int8",
        artifact_name(ONNX, variant="int8-static"),
        ("ort-cpu-int8-static",),
        "Also write a static (QDQ) int8 graph, calibrated on held-out text (model.int8-static.onnx).",
        units=INT8_UNITS,
        by_bench=False,
    ),
    Precision(
        "bf16",
        "bf16",
        BF16_PLAN,
        ("eager-bf16", "compile-bf16", "openvino-bf16"),
        "Measure which parts eager-bf16 and compile-bf16 keep in fp32, and whether all-bf16 "
        "openvino-bf16 fits the budget (bf16.json).",
        source=None,
        units=("avx512_bf16", "amx_bf16"),
    ),
    Precision(
        "fp16",
        "fp16",
        artifact_name(ONNX, variant="fp16"),
        ("ort-cuda-fp16",),
        "Also write an fp16 graph for ONNX Runtime's CUDA provider.",
        provider="CUDAExecutionProvider",
    ),
)
PRECISION = {p.name: p for p in PRECISIONS}


def wanted(precision: Precision, asked: bool | None, providers: list[str]) -> bool:
    """Whether `optimize` makes `precision`: as `asked`, or (None) by its default, which
    for a provider's precision is whether that provider is among `providers`."""
    if asked is not None:
        return asked
    return precision.provider in providers if precision.provider else precision.by_default
