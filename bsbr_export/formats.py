"""The one table of export formats, as data: it feeds the CLI's choices, export,
validate and bench.

A row names a format, what it takes, and its writer and runner as "module:name"
references, imported when first used (`resolve`): this table sits below export and the
runtime, and most rows' packages are heavy. Adding a format adds a row here, its writer
in export/ and its runner in runtime/; nothing else keys on format names.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass

from bsbr_export.errors import UserError

# What an artifact computes: the full forward, one streaming step returning the whole
# state (Triton's implicit state needs that), one token for each of many sequences at
# their own positions (in-flight batching), or one step returning only what changed.
# Export writes them in this order: a web page's facts go out with its decode step, last.
KINDS = ("full", "streaming", "rows", "decode")
TRACED_KINDS = ("full", "streaming", "decode")  # what a format holds unless its row says otherwise
# Manifests and ONNX metadata name the full forward "logits", as they always have: the
# files users' tools read keep their values; only the code calls it "full".
RECORDED_KINDS = {"full": "logits"}


def recorded_kind(kind: str) -> str:
    """A kind as manifests and metadata write it."""
    return RECORDED_KINDS.get(kind, kind)


def kind_of_record(recorded: str) -> str:
    """A kind read from a manifest or metadata, as the code names it."""
    return next((kind for kind, name in RECORDED_KINDS.items() if name == recorded), recorded)


@dataclass(frozen=True)
class Format:
    """An artifact kind: suffix, the export options it takes, the graph kinds it holds,
    the optional package it needs."""

    name: str
    suffix: str
    description: str
    writer: str  # "module:name" of its `export.writers.Writer`
    runner: str  # "module:name" of its `runtime.base.Runner` class
    options: frozenset[str] = frozenset()
    kinds: tuple[str, ...] = TRACED_KINDS
    per_provider: bool = False  # validated once per ONNX Runtime execution provider
    engine: bool = False  # bench times the artifact as an engine of its own, named like the format
    on_cuda: bool = False  # its runner also computes on a CUDA GPU (`device="cuda"`)
    requires: str | None = None  # the module of an optional package it needs
    install: str = ""  # how to install that package
    directory: str = ""  # the export's subdirectory its files go in (none: beside the manifest)
    benched: bool = True  # bench exports it by default (its runners time it, or ONNX Runtime's engines do)
    needs_streaming: bool = False  # it is of no use without its streaming graphs: they go with it, flag or not
    optional_kinds: tuple[str, ...] = ()  # kinds it holds when the module gives them, and does without

    @property
    def installed(self) -> bool:
        """Whether the optional package this format needs (if any) is importable here."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def check_installed(self) -> None:
        """UserError saying how to install the package this format needs, when it is missing."""
        if not self.installed:
            raise UserError(f"--format {self.name} needs the {self.requires} package: {self.install}")

    @property
    def streaming(self) -> bool:
        return len(self.kinds) > 1

    @property
    def needed_kinds(self) -> tuple[str, ...]:
        """The streaming kinds it cannot do without (when it `needs_streaming`)."""
        return tuple(k for k in self.kinds[1:] if k not in self.optional_kinds)

    def own(self, options: dict) -> dict:
        """The entries of `options` this format takes (the others are not its business)."""
        return {k: v for k, v in options.items() if k in self.options}


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "onnx",
            ".onnx",
            "ONNX graph for ONNX Runtime (torch.export-based exporter)",
            "bsbr_export.export.writers:ONNX",
            "bsbr_export.runtime.onnx:OnnxRunner",
            frozenset({"static_shape", "opset", "metadata"}),
            kinds=KINDS,
            per_provider=True,
        ),
        Format(
            "torchscript",
            ".pt",
            "traced TorchScript for torch.jit.load / torch::jit::load",
            "bsbr_export.export.writers:TORCHSCRIPT",
            "bsbr_export.runtime.torchscript:TorchScriptRunner",
            engine=True,
            on_cuda=True,
        ),
        Format(
            "torchscript-mobile",
            ".ptl",
            "TorchScript for PyTorch Mobile's lite interpreter",
            "bsbr_export.export.writers:TORCHSCRIPT_MOBILE",
            "bsbr_export.runtime.torchscript:TorchScriptRunner",
        ),
        # The decode step for C++ generation loops; no full-state step (Triton's implicit
        # state is its only user, and Triton serves ONNX).
        Format(
            "aoti",
            ".pt2",
            "AOTInductor package for aoti_load_package / torch::inductor::AOTIModelPackageLoader",
            "bsbr_export.export.writers:AOTI",
            "bsbr_export.runtime.aoti:AotiRunner",
            options=frozenset({"device"}),
            kinds=("full", "decode"),
            engine=True,
        ),
        # Full graph only: see docs/formats.md "Deploy" for what the streaming step needs.
        Format(
            "executorch",
            ".pte",
            "ExecuTorch program lowered to XNNPACK, for executorch.runtime / the C++ Module API",
            "bsbr_export.export.writers:EXECUTORCH",
            "bsbr_export.runtime.executorch:ExecuTorchRunner",
            frozenset({"max_length", "max_batch"}),
            kinds=("full",),
            engine=True,
            requires="executorch",
            install='pip install -c constraints.txt "bsbr-export[executorch]" (in a checkout: ".[executorch]")',
        ),
        # The page generates with the decode step (exported with it) and, where the
        # module has one, the row step (the one WebGPU runs); opset 18 graphs. Timed in a
        # browser (tools/web_load.py), not by bench.
        Format(
            "web",
            ".onnx",
            "static web page generating with onnxruntime-web (wasm, WebGPU) in the browser",
            "bsbr_export.export.writers:WEB",
            "bsbr_export.runtime.ortweb:OrtWebRunner",  # the page's graphs, in the runtime the page runs
            kinds=("full", "rows", "decode"),
            directory="web",
            benched=False,
            needs_streaming=True,
            optional_kinds=("rows",),
        ),
    )
}
ONNX = FORMATS["onnx"]  # the format ONNX Runtime's engines, optimize and Triton's models read


def resolve(reference: str):
    """What a "package.module:name" reference (a row's writer or runner) names, imported now."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def parse_formats(text: str) -> list[Format]:
    """'onnx,torchscript' -> Formats, or a UserError naming near misses."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"no format given: choose from {', '.join(FORMATS)}")
    chosen = []
    for name in names:
        if name not in FORMATS:
            close = difflib.get_close_matches(name, FORMATS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"choose from {', '.join(FORMATS)}"
            raise UserError(f"unknown format {name!r}: {hint}")
        FORMATS[name].check_installed()
        if FORMATS[name] not in chosen:
            chosen.append(FORMATS[name])
    return chosen


def kind_of(streaming: bool, decode: bool, rows: bool = False) -> str:
    """The artifact kind for export flags: decode and rows imply streaming."""
    return "rows" if rows else "decode" if decode else "streaming" if streaming else "full"


def artifact_name(fmt: Format, kind: str = "full", variant: str | None = None) -> str:
    """Path of an artifact inside an export directory: [directory/]model[.kind][.variant].suffix,
    `kind` one of KINDS (the full forward has none), `variant` what `optimize` makes of a
    graph (optimized, int8, int8-static, fp16). Every file name of an export comes from here."""
    name = ".".join(["model", *([kind] if kind != "full" else []), *([variant] if variant else [])]) + fmt.suffix
    return f"{fmt.directory}/{name}" if fmt.directory else name


def export_jobs(formats: list[Format], streaming: bool) -> list[tuple[Format, str]]:
    """(format, kind) pairs to export: full graphs, then with `streaming` the full-state
    streaming steps, the decode steps (whose caller appends finished chunks itself) and
    the row steps (a server's batched step over sequences at different positions). A
    format of no use without its streaming graphs (the web page) always gets them."""
    jobs = [(fmt, "full") for fmt in formats]
    jobs += [
        (fmt, kind) for kind in KINDS[1:] for fmt in formats if kind in fmt.kinds and (streaming or fmt.needs_streaming)
    ]
    return jobs
