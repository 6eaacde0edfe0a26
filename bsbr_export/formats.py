"""The one table of export formats, as data: it feeds the CLI's choices, export,
validate and bench.

A row names a format and what it takes; it knows no exporter and no runner. Export
finds a format's writer in `export/writers.py` (`WRITERS`), the runtime its runner in
`runtime/__init__.py` (`RUNNERS`), both keyed by the format's name: adding a format adds
a row here and a module to each.
"""

from __future__ import annotations

import difflib
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
    options: frozenset[str] = frozenset()
    kinds: tuple[str, ...] = TRACED_KINDS
    per_provider: bool = False  # validated once per ONNX Runtime execution provider
    needs_gpu: bool = False
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
            frozenset({"static_shape", "opset", "metadata"}),
            kinds=KINDS,
            per_provider=True,
        ),
        Format(
            "torchscript", ".pt", "traced TorchScript for torch.jit.load / torch::jit::load", engine=True, on_cuda=True
        ),
        Format("torchscript-mobile", ".ptl", "TorchScript for PyTorch Mobile's lite interpreter"),
        # The decode step for C++ generation loops; no full-state step (Triton's implicit
        # state is its only user, and Triton serves ONNX).
        Format(
            "aoti",
            ".pt2",
            "AOTInductor package for aoti_load_package / torch::inductor::AOTIModelPackageLoader",
            options=frozenset({"device"}),
            kinds=("full", "decode"),
            engine=True,
        ),
        # Full graph only: see README "Deploy" for what the streaming step needs.
        Format(
            "executorch",
            ".pte",
            "ExecuTorch program lowered to XNNPACK, for executorch.runtime / the C++ Module API",
            frozenset({"max_length", "max_batch"}),
            kinds=("full",),
            engine=True,
            requires="executorch",
            install='pip install -c constraints.txt "bsbr-export[executorch]" (in a checkout: ".[executorch]")',
        ),
        # The page generates with the decode step (export with --streaming) and, where the
        # module has one, the row step (the one WebGPU runs); opset 18 graphs. Timed in a
        # browser (tools/web_load.py), not by bench.
        Format(
            "web",
            ".onnx",
            "static web page generating with onnxruntime-web (wasm, WebGPU) in the browser",
            kinds=("full", "rows", "decode"),
            directory="web",
            benched=False,
            needs_streaming=True,
            optional_kinds=("rows",),
        ),
    )
}


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


def artifact_name(fmt: Format, kind: str) -> str:
    """Path of an artifact inside an export directory: [directory/]model[.streaming|.decode].suffix."""
    name = f"model{'' if kind == 'full' else '.' + kind}{fmt.suffix}"
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
