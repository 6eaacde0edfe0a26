"""`doctor`: will this module's exported graph run at every batch size and length?

A module is clean when plain `torch.export.export` with `Dim("batch")` and
`Dim("sequence")` on its inputs raises nothing. When it is not, `diagnose` exports it
again with `Dim.AUTO` (which specializes instead of failing) while recording every
guard the shape environment adds, with the innermost frame of the user's code that
caused it, and keeps the guards that are false at some batch or length: each is a line
that ties the graph to the example's shape.

`torch.export.draft_export` reports guards too, but it keeps one guard per call stack
and stops seeing a dimension once it is specialized: on bsbr 0.1.1's `BSBRAttention` it
names only `_create_masks` and misses `if padding > 0:` (measured with torch 2.13). So
the guards are read where the ShapeEnv logs them (`ShapeEnv._log_guard`, a private
method of the pinned torch, patched only for the duration of one export).
"""

from __future__ import annotations

import itertools
import linecache
import math
import os
import re
import sysconfig
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sympy
import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from bsbr_export.errors import UserError
from bsbr_export.model.probe import default_inputs

DIM_NAMES = ("batch", "sequence")  # what dims 0 and 1 of every input are exported as
BATCHES = (1, 2, 3, 8)  # sizes a guard is checked at
# Ordered: the first pattern that matches the line's code picks the advice.
ADVICE = (
    (
        r"math\.ceil|\bceil\(",
        "math.ceil(L / c) is float math frozen at export: use integer ceil-division "
        "on the tensor size, (L + c - 1) // c",
    ),
    (
        r"\brange\(|^\s*for\b",
        "no Python loop over chunks (it is unrolled for the example's chunk count): "
        "compute every chunk at once on a [.., n, c, e] view (bsbr_export.model.attention.to_chunks)",
    ),
    (
        r"\.item\(\)|\.tolist\(\)|\bint\(|\bbool\(",
        "no .item() or int()/bool() of a tensor: it reads a value into Python at export; keep it a tensor",
    ),
    (
        r"^\s*(el)?if\b|^\s*while\b|\bif\b.*\belse\b",
        "a Python branch on a size is taken once, at export: make "
        "the code the same at every length (pad unconditionally: F.pad by 0 costs nothing)",
    ),
    (
        r"\.(view|reshape|unflatten)\(",
        "pad to whole chunks before reshaping into chunks "
        "(bsbr_export.model.attention.pad_to_chunks), with the chunk count from integer division on the size",
    ),
)
DEFAULT_ADVICE = (
    "this line's size arithmetic holds only near the example's shape: derive sizes from tensor shapes with integer ops"
)
FALLBACK = "or use bsbr_export.nn.BSBRAttention, which exports cleanly with a dynamic batch and sequence"


@dataclass(frozen=True)
class Finding:
    """One line of the user's code that ties the exported graph to the example's shape."""

    file: str
    line: int
    code: str
    guard: str  # the condition export assumed, in terms of `batch` and `sequence`
    fails_at: str  # sizes where it is false, e.g. "sequence=1, 4, 5, 8, ..."
    advice: str

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}: {self.code}\n    guard: {self.guard}  (false at {self.fails_at})\n"
            f"    fix: {self.advice}"
        )


@dataclass(frozen=True)
class DoctorReport:
    """What `diagnose` found: `passed` (and truth) when the module exports cleanly."""

    module: str
    inputs: tuple[str, ...]  # the example inputs, e.g. "input_ids int64 [2, 13]"
    findings: tuple[Finding, ...]

    @property
    def passed(self) -> bool:
        return not self.findings

    def __bool__(self) -> bool:
        return self.passed

    def to_text(self) -> str:
        """The report as the CLI prints it."""
        head = f"{self.module} with dynamic batch and sequence, example {', '.join(self.inputs)}:"
        if self.passed:
            return f"{head} clean (torch.export raised no constraint violation)"
        lines = [f"{head} {len(self.findings)} line(s) tie the graph to the example's shape"]
        lines += [str(f) for f in self.findings]
        lines.append(f"Fix them, {FALLBACK}.")
        return "\n".join(lines)


def diagnose(module: nn.Module, inputs: tuple[Tensor, ...] | None = None) -> DoctorReport:
    """Export `module` with a dynamic batch and sequence (dims 0 and 1 of every input)
    and report each line that specializes or guards them.

    inputs: positional example inputs; by default `example_inputs(module)`.
    """
    module = module.eval()
    inputs = example_inputs(module) if inputs is None else inputs
    dims = tuple(dict(enumerate(Dim(name) for name in DIM_NAMES)) for _ in inputs)
    described = tuple(
        f"{_input_name(i, t)} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}" for i, t in enumerate(inputs)
    )
    try:
        torch.export.export(module, inputs, dynamic_shapes=dims)
        return DoctorReport(type(module).__name__, described, ())
    except Exception as exc:  # noqa: BLE001 - any failure means "not clean"; _locate says where
        failure = exc
    findings = _locate(module, inputs, chunk_size_of(module)) or [_finding_from_exception(failure)]
    return DoctorReport(type(module).__name__, described, tuple(findings))


def chunk_size_of(module: nn.Module) -> int | None:
    """The least common multiple of the `chunk_size` of every submodule that has one."""
    sizes = {m.chunk_size for m in module.modules() if isinstance(getattr(m, "chunk_size", None), int)}
    return math.lcm(*sizes) if sizes else None


def example_inputs(module: nn.Module) -> tuple[Tensor, ...]:
    """One input of batch 2 and length 3c + 1 (37 when no chunk size is found), shapes
    that specialize nothing by accident: `input_ids` below the vocab of the first
    `nn.Embedding` when there is one (and an all-ones mask when the forward requires
    one, as `export` finds it: `default_inputs`), else float hidden states as wide as the
    first `nn.Linear`'s input."""
    c = chunk_size_of(module)
    length = 3 * c + 1 if c else 37
    generator = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            ids = torch.randint(0, m.num_embeddings, (2, length), generator=generator)
            return (ids, *(torch.ones_like(ids) for i in default_inputs(module)[1:] if not i.optional))
        if isinstance(m, nn.Linear):
            return (torch.randn(2, length, m.in_features, generator=generator, dtype=m.weight.dtype),)
    raise UserError(
        f"{type(module).__name__} has no nn.Embedding or nn.Linear to size an example input from: "
        "doctor needs a module that takes input_ids or [batch, length, hidden] states"
    )


def _input_name(index: int, tensor: Tensor) -> str:
    return "input_ids" if not tensor.is_floating_point() and index == 0 else f"input{index}"


def _locate(module: nn.Module, inputs: tuple[Tensor, ...], chunk: int | None) -> list[Finding]:
    """Export with Dim.AUTO, recording guards; one finding per line with a failing guard."""
    auto = tuple({0: Dim.AUTO, 1: Dim.AUTO} for _ in inputs)
    with _recording_guards() as records:
        try:
            torch.export.export(module, inputs, dynamic_shapes=auto)
        except Exception as exc:  # noqa: BLE001 - e.g. a data-dependent branch: report where it stopped
            records.append((None, _user_frame(traceback.extract_tb(exc.__traceback__)), {}, exc))
    lengths = _lengths_to_check(chunk, inputs[0].shape[1])
    findings: dict[tuple[str, int], Finding] = {}
    for expr, frame, names, exc in records:
        if frame is None or (frame.filename, frame.lineno) in findings:
            continue
        if exc is not None:
            guard, fails_at = f"export failed: {_first_line(exc)}", "every size"
        else:
            fails = _failing_sizes(expr, names, lengths)
            if not fails:
                continue  # true at every size checked: harmless
            guard, fails_at = _rename(str(expr), names), fails
        code = (linecache.getline(frame.filename, frame.lineno) or frame.line or "").strip()
        findings[frame.filename, frame.lineno] = Finding(
            frame.filename, frame.lineno, code, guard, fails_at, _advice(code)
        )
    return list(findings.values())


@contextmanager
def _recording_guards() -> Iterator[list]:
    """Record (guard, user frame, {symbol: dim name}, None) for every guard any ShapeEnv adds."""
    records: list = []
    original = ShapeEnv._log_guard

    def record(shape_env: ShapeEnv, prefix: str, expr: sympy.Basic, forcing_spec: bool) -> None:
        names = {}
        for symbol in expr.free_symbols:
            sources = shape_env.var_to_sources.get(symbol, [])
            match = re.search(r"\.size\(\)\[(\d+)\]$", sources[0].name) if sources else None
            if match and int(match.group(1)) < len(DIM_NAMES):
                names[symbol] = DIM_NAMES[int(match.group(1))]
        records.append((expr, _user_frame(traceback.extract_stack()), names, None))
        return original(shape_env, prefix, expr, forcing_spec)

    ShapeEnv._log_guard = record
    try:
        yield records
    finally:
        ShapeEnv._log_guard = original


_NOT_USER = (os.path.dirname(torch.__file__) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep, __file__)


def _user_frame(frames: traceback.StackSummary) -> traceback.FrameSummary | None:
    """The innermost frame outside torch, the standard library and this file."""
    for frame in reversed(frames):
        if not frame.filename.startswith(_NOT_USER) and not frame.filename.startswith("<"):
            return frame
    return None


def _lengths_to_check(chunk: int | None, example: int) -> list[int]:
    if chunk is None:
        return sorted({*range(1, 17), 31, 32, 33, 64, 100, 1000, example})
    c = chunk
    return sorted(
        {n for n in (1, 2, c - 1, c, c + 1, 2 * c, 2 * c + 1, 3 * c + 1, 5 * c + 3, 8 * c, example) if n >= 1}
    )


def _failing_sizes(expr: sympy.Basic, names: dict, lengths: list[int]) -> str:
    """Where the guard is false, as "sequence=1, 4, ..."; "" when true everywhere checked.
    A guard on anything but batch and sequence (a value read with .item()) always fails."""
    if set(expr.free_symbols) - set(names):
        return "values read from tensors"
    symbols = sorted(names, key=lambda s: DIM_NAMES.index(names[s]))
    choices = [BATCHES if names[s] == "batch" else lengths for s in symbols]
    failing = []
    for values in itertools.product(*choices):
        if expr.xreplace({s: sympy.Integer(v) for s, v in zip(symbols, values)}) == sympy.false:
            failing.append(", ".join(f"{names[s]}={v}" for s, v in zip(symbols, values)))
    if len(failing) > 4:
        return "; ".join(failing[:4]) + f"; ... ({len(failing)} of {math.prod(map(len, choices))} checked)"
    return "; ".join(failing)


def _rename(text: str, names: dict) -> str:
    for symbol, name in names.items():
        text = re.sub(rf"\b{re.escape(str(symbol))}\b", name, text)
    return text


def _advice(code: str) -> str:
    return next((advice for pattern, advice in ADVICE if re.search(pattern, code)), DEFAULT_ADVICE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _finding_from_exception(exc: BaseException) -> Finding:
    """The export error itself, when no guard could be placed in the user's code."""
    frame = _user_frame(traceback.extract_tb(exc.__traceback__))
    file, line = (frame.filename, frame.lineno) if frame else ("<unknown>", 0)
    code = (linecache.getline(file, line) if frame else "").strip()
    return Finding(file, line, code, f"export failed: {_first_line(exc)}", "every size", _advice(code))
