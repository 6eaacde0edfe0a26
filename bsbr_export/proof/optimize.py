"""ONNX Runtime graph optimization levels, int8 dynamic quantization and fp16, measured.

`choose_level` times every ORT optimization level on this machine, keeps the fastest
one whose output still matches eager, and saves that optimized graph
(`optimized_model_filepath`). `quantize_int8` quantizes MatMul weights to int8 but
keeps in fp32 the nodes that hurt accuracy most, found per node: on BSBR the input of
the attention output projection is ~100x larger than in standard attention (the
retrieval term `q S` is unnormalized), so quantizing every MatMul costs top-1 agreement.
`convert_fp16` writes an fp16 graph for the CUDA provider (fp32 inputs and outputs).
"""

from __future__ import annotations

import ast
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from bsbr_export.compare.parity import compare
from bsbr_export.defaults import (
    DEFAULT_ACCURACY_BUDGET,
    DEFAULT_EVAL_WINDOWS,
    DEFAULT_THREADS,
    DEFAULT_TOLERANCE,
    OPTIMIZATION_LEVELS,
)
from bsbr_export.errors import UserError
from bsbr_export.formats import ONNX, artifact_name
from bsbr_export.io import atomic_write, check_writable
from bsbr_export.manifest import add_artifacts, manifest_spec, read_manifest
from bsbr_export.model.spec import ModelSpec
from bsbr_export.precisions import PRECISION, PRECISIONS, wanted
from bsbr_export.proof.bench import first_output, median_ms, spec_feeds
from bsbr_export.proof.evaltext import (
    DEFAULT_EVAL_BYTES,
    bits_per_byte_by_window,
    check_budget,
    heldout_text,
    scores_text,
    text_feeds,
    windows,
    worst_change,
)
from bsbr_export.proof.precision import measure_bf16
from bsbr_export.runtime.base import Runner
from bsbr_export.runtime.engines import open_engine
from bsbr_export.runtime.onnx import OnnxRunner, available_providers

# Levels whose optimized graph may contain fused ops specific to this CPU / ORT build.
HARDWARE_SPECIFIC_LEVELS = ("extended", "all")


@dataclass(frozen=True)
class LevelTiming:
    level: str
    p50_ms: float
    max_abs: float
    passed: bool


@dataclass(frozen=True)
class LevelChoice:
    """Every level's latency and parity on this machine, and the one chosen."""

    length: int
    timings: tuple[LevelTiming, ...]
    chosen: str
    path: Path
    hardware_specific: bool


# The int8 graph each quantization method writes.
QUANT_FILES = {"dynamic": PRECISION["int8"].artifact, "static": PRECISION["int8-static"].artifact}


@dataclass(frozen=True)
class QuantStep:
    """int8 with the `kept_fp32` most sensitive MatMuls left in fp32."""

    kept_fp32: int
    top1: float
    max_abs: float
    p50_ms: float
    bits_per_byte: dict[int, float] | None = None  # held-out text by window length, for byte-level LMs
    change: float | None = None  # the worst window's relative rise over fp32's bits per byte


@dataclass(frozen=True)
class QuantResult:
    path: Path
    fp32_nodes: tuple[str, ...]  # MatMuls kept in fp32, most sensitive first
    modules: dict[str, str]  # node -> module it came from
    sensitivity: dict[str, float]  # node -> mean abs logit error when only it is int8
    steps: tuple[QuantStep, ...]  # the speed/accuracy trade, from all-int8 upward
    fp32_p50_ms: float
    target_top1: float
    reached: bool
    shape: tuple[int, int] = (1, 1024)  # (batch, length) everything above was measured at
    method: str = "dynamic"
    fp32_bits_per_byte: dict[int, float] | None = None  # the fp32 graph's by window, when judged by held-out text
    budget: float = 0.01


def _runner(
    path: Path, level: str = "all", optimized_path: Path | None = None, threads: int = DEFAULT_THREADS
) -> OnnxRunner:
    return OnnxRunner(path, optimization=level, threads=threads, optimized_path=optimized_path)


def eager_output(export_dir: Path, feeds: dict, trust_code: bool = False) -> np.ndarray:
    """The eager model's first output (rebuilt from the export dir) on `feeds`."""
    return first_output(open_engine("eager", export_dir, trust_code=trust_code), feeds)


def choose_level(
    export_dir,
    *,
    length: int = 1024,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int = DEFAULT_THREADS,
    trust_code: bool = False,
) -> LevelChoice:
    """Time model.onnx at every ORT optimization level; save the fastest passing graph
    as model.optimized.onnx (tied to this machine when the level is extended/all). The
    eager reference of a user's module is rebuilt only with `trust_code`."""
    directory = Path(export_dir)
    source = directory / artifact_name(ONNX)
    if not source.is_file():
        raise UserError(f"{directory} has no model.onnx: export with --format onnx first")
    feeds = spec_feeds(manifest_spec(directory), 1, length, seed=0)
    want = eager_output(directory, feeds, trust_code)
    timings = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for level in OPTIMIZATION_LEVELS:
            runner = _runner(source, level, Path(tmp) / f"{level}.onnx", threads)
            diff = compare("output", want, first_output(runner, feeds), tolerance)
            timings.append(LevelTiming(level, median_ms(runner.infer, feeds, repeats=5), diff.max_abs, diff.passed))
        passing = [t for t in timings if t.passed]
        if not passing:
            raise UserError("no ORT optimization level matches eager within tolerance: run `bsbr-export validate`")
        best = min(passing, key=lambda t: t.p50_ms)
        target = directory / artifact_name(ONNX, variant="optimized")
        shutil.copyfile(Path(tmp) / f"{best.level}.onnx", target)
    return LevelChoice(length, tuple(timings), best.level, target, best.level in HARDWARE_SPECIFIC_LEVELS)


def weight_matmuls(path: Path) -> dict[str, str]:
    """MatMul nodes that multiply by a stored weight (what int8 can quantize), each with
    the module it came from (e.g. `blocks.0.attn.out_proj`, from the exporter's scopes)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type == "MatMul" and any(i in weights for i in node.input):
            meta = {p.key: p.value for p in node.metadata_props}
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
            modules = [s for s in scopes[:-1] if s and s != "model"]  # the last entry is the op itself
            # The one weight MatMul outside every submodule is the tied LM head.
            found[node.name] = modules[-1].removeprefix("model.") if modules else "lm_head"
    return found


def _quantize(
    source: Path,
    target: Path,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    calibration: list[dict] | None = None,
) -> None:
    """int8 MatMul weights: dynamic (activations quantized per call) or, with
    `calibration` feeds, static QDQ (activation ranges fixed from those feeds)."""
    # onnxruntime.quantization pulls in onnx's reference ops and sympy: only when quantizing.
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" on every call
    # MatMul only: by default ORT would also quantize the embedding Gather, whose table
    # is the tied LM head, and no node list could keep that in fp32.
    nodes = {"op_types_to_quantize": ["MatMul"], "nodes_to_quantize": include or [], "nodes_to_exclude": exclude or []}
    if calibration is None:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, **nodes)
        return

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    # Weights per output channel (symmetric), activations per tensor: the QDQ layout
    # ORT's CPU provider fuses into its int8 MatMul kernels.
    quantize_static(
        str(source),
        str(target),
        Feeds(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        **nodes,
    )


def calibration_feeds(spec, length: int, count: int = 8) -> list[dict]:
    """What static quantization calibrates on: held-out text the scores never read (the
    bytes after the default evaluation slice) for a byte-level LM, else seeded random ids."""
    if scores_text(spec):
        rows = [
            r
            for r in windows(heldout_text(DEFAULT_EVAL_BYTES + count * length)[DEFAULT_EVAL_BYTES:], length)
            if len(r) == length
        ]
        return [text_feeds(spec, r[None]) for r in rows[:count]]
    return [spec_feeds(spec, 1, length, seed=100 + i) for i in range(count)]


def quantize_int8(
    export_dir,
    *,
    target_top1: float = 0.97,
    length: int = 1024,
    batch: int = 1,
    threads: int = DEFAULT_THREADS,
    method: str = "dynamic",
    text: bytes | None = None,
    budget: float = DEFAULT_ACCURACY_BUDGET,
    windows: tuple[int, ...] = DEFAULT_EVAL_WINDOWS,
    trust_code: bool = False,
) -> QuantResult:
    """Write model.int8.onnx (dynamic) or model.int8-static.onnx (static QDQ, calibrated
    by `calibration_feeds`): every weight MatMul int8 except the fewest most-sensitive
    ones needed to stay accurate: held-out bits per byte (`text`, in windows of each
    length in `windows`) within `budget` of fp32's at every window for a byte-level LM,
    else top-1 agreement with eager >= `target_top1`.

    Sensitivity of a node = the accuracy lost when only that node is int8, measured only
    when the all-int8 graph misses (one run per MatMul); none is kept fp32 otherwise.
    """
    directory = Path(export_dir)
    source = directory / artifact_name(ONNX)
    if not source.is_file():
        raise UserError(f"{directory} has no model.onnx: export with --format onnx first")
    if not 0 < target_top1 <= 1:
        raise UserError(f"target top-1 agreement must be in (0, 1], got {target_top1}")
    if method not in QUANT_FILES:
        raise UserError(f"unknown quantization {method!r}: use one of {', '.join(QUANT_FILES)}")
    spec = manifest_spec(directory)
    feeds = spec_feeds(spec, batch, length, seed=7)
    judge = Int8Judge(
        spec,
        text if scores_text(spec) else None,
        windows,
        budget,
        target_top1,
        feeds,
        eager_output(directory, feeds, trust_code),
    )
    fp32 = _runner(source, threads=threads)
    fp32_ms, fp32_bpb = median_ms(fp32.infer, feeds, repeats=5), judge.set_fp32(fp32)
    calibration = calibration_feeds(spec, min(length, 512)) if method == "static" else None
    nodes = weight_matmuls(source)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        probe = Path(tmp) / "probe.onnx"
        _quantize(source, probe, calibration=calibration)
        steps, sensitivity, ranked, kept = [judge.step(0, _runner(probe, threads=threads))], {}, list(nodes), 0
        # Sensitivities only when all-int8 is not accurate already: one run per MatMul.
        if not judge.accurate(steps[0]):
            for node in nodes:  # dict: node name -> module
                _quantize(source, probe, include=[node], calibration=calibration)
                sensitivity[node] = judge.loss(_runner(probe, threads=threads))
            ranked = sorted(nodes, key=sensitivity.get, reverse=True)
            kept = len(ranked)
            for count in range(1, len(ranked) + 1):
                _quantize(source, probe, exclude=ranked[:count], calibration=calibration)
                steps.append(judge.step(count, _runner(probe, threads=threads)))
                if judge.accurate(steps[-1]):
                    kept = count
                    break
        target = directory / QUANT_FILES[method]
        shutil.move(str(probe), target)
    return QuantResult(
        path=target,
        fp32_nodes=tuple(ranked[:kept]),
        modules=nodes,
        sensitivity=sensitivity,
        steps=tuple(steps),
        fp32_p50_ms=fp32_ms,
        target_top1=target_top1,
        reached=judge.accurate(steps[-1]),
        shape=(batch, length),
        method=method,
        fp32_bits_per_byte=fp32_bpb,
        budget=budget,
    )


@dataclass
class Int8Judge:
    """How an int8 graph is judged: held-out bits per byte by window against the fp32
    graph's (byte-level LMs: `text`), else its outputs on `feeds` against eager's `want`."""

    spec: ModelSpec
    text: bytes | None
    windows: tuple[int, ...]
    budget: float
    target_top1: float
    feeds: dict
    want: np.ndarray
    fp32_bpb: dict[int, float] | None = None

    def score(self, runner: Runner) -> dict[int, float] | None:
        if self.text is None:
            return None
        return bits_per_byte_by_window(
            lambda ids: first_output(runner, text_feeds(self.spec, ids)), self.text, self.windows
        )

    def set_fp32(self, runner: Runner) -> dict[int, float] | None:
        self.fp32_bpb = self.score(runner)
        return self.fp32_bpb

    def change(self, bpb: dict[int, float] | None) -> float | None:
        return None if bpb is None else worst_change(bpb, self.fp32_bpb)

    def loss(self, runner: Runner) -> float:
        """What sensitivity ranks by: lower is better."""
        moved = self.change(self.score(runner))
        return moved if moved is not None else float(np.abs(first_output(runner, self.feeds) - self.want).mean())

    def step(self, kept_fp32: int, runner: Runner) -> QuantStep:
        diff = compare("output", self.want, first_output(runner, self.feeds), 0.0, top1=True)
        bpb = self.score(runner)
        return QuantStep(
            kept_fp32, diff.top1, diff.max_abs, median_ms(runner.infer, self.feeds, repeats=5), bpb, self.change(bpb)
        )

    def accurate(self, step: QuantStep) -> bool:
        return step.change <= self.budget if step.change is not None else step.top1 >= self.target_top1


def position_nodes(model_proto) -> list[str]:
    """The nodes that compute the sinusoid's angles, and the Sin/Cos themselves.

    They stay fp32 in an fp16 graph: an angle is `position * frequency`, and fp16's
    11-bit mantissa would move position 2048 by a whole radian.
    """
    producers = {out: node for node in model_proto.graph.node for out in node.output}
    kept, todo = {}, [n for n in model_proto.graph.node if n.op_type in ("Sin", "Cos")]
    while todo:
        node = todo.pop()
        if node.name not in kept:
            kept[node.name] = node
            todo += [producers[i] for i in node.input if i in producers]
    return sorted(kept)


def convert_fp16(export_dir) -> tuple[Path, list[str]]:
    """Write model.fp16.onnx: weights and math in fp16 for the CUDA provider, inputs and
    outputs still fp32 (a drop-in for model.onnx), the position angles kept fp32.
    Returns the path and the nodes kept in fp32."""
    # onnxruntime.transformers is a large tree of optimizer scripts: only when converting.
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    directory = Path(export_dir)
    source = directory / artifact_name(ONNX)
    if not source.is_file():
        raise UserError(f"{directory} has no model.onnx: export with --format onnx first")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(source)))
    kept = position_nodes(model)
    # The converter casts every float tensor it has a type for to fp16, even between two
    # fp32 nodes (angles rounded to fp16 moved logits by 5e-2 at L=2048): drop the types
    # of tensors that only kept nodes read, so those stay fp32.
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
    fp32 = set(kept)
    internal = {
        out
        for node in model.graph.node
        if node.name in fp32
        for out in node.output
        if readers.get(out) and readers[out] <= fp32
    }
    types = [v for v in model.graph.value_info if v.name not in internal]
    del model.graph.value_info[:]
    model.graph.value_info.extend(types)
    logging.getLogger().setLevel(logging.ERROR)  # per-initializer "values truncated" warnings
    converted = OnnxModel(
        convert_float_to_float16(model, keep_io_types=True, node_block_list=kept, disable_shape_infer=True)
    )
    converted.topological_sort()  # the converter appends the Casts it inserts at the end
    # It also leaves some intermediate types stale; they are inferred again on load.
    del converted.model.graph.value_info[:]
    target = directory / PRECISION["fp16"].artifact
    with atomic_write(target) as staged:
        onnx.save(converted.model, str(staged))
        onnx.checker.check_model(str(staged), full_check=True)
    return target, kept


@dataclass(frozen=True)
class Optimized:
    """What `optimize_export` made: the ORT level, int8 graphs (dynamic, static QDQ),
    the fp16 graph, and the bf16 plans (`precision.measure_bf16`)."""

    level: LevelChoice
    int8: tuple[QuantResult, ...] = ()
    fp16_path: Path | None = None
    bf16: tuple = ()  # precision.Bf16Plan per bf16 engine


def optimize_export(
    export_dir,
    *,
    length: int = 1024,
    target_top1: float = 0.97,
    threads: int = DEFAULT_THREADS,
    eval_windows: tuple[int, ...] = DEFAULT_EVAL_WINDOWS,
    eval_text: bytes | None = None,
    accuracy_budget: float = DEFAULT_ACCURACY_BUDGET,
    trust_code: bool = False,
    progress=lambda step: None,
    **asked: bool | None,
) -> Optimized:
    """Choose the ORT level and make the reduced precisions `asked` for (by their
    `precisions.PRECISIONS` option: int8=True...; one not named, or None, as its row's
    default); record the artifacts in the manifest.

    int8 / static_int8: dynamic and static-QDQ int8 graphs, the most sensitive MatMuls
    kept fp32 (judged by held-out bits per byte for byte-level LMs, `eval_text` or the
    held-out default, within `accuracy_budget` in windows of each of `eval_windows`). fp16:
    model.fp16.onnx, meant for the CUDA provider. bf16: measure which parts stay fp32 for
    the bf16 engines (judged in the same windows). A user's module is rebuilt for the eager
    reference only with `trust_code`. `validate` checks every graph written, `bench` times them.
    """
    unknown = sorted(set(asked) - {p.option for p in PRECISIONS})
    if unknown:
        raise TypeError(f"optimize_export() got unknown precision options {unknown}")
    providers = available_providers()
    make = {p.name for p in PRECISIONS if wanted(p, asked.get(p.option), providers)}
    # ORT's C++ logger prints warnings about the probe graphs (unused initializers after
    # quantization) raw, ANSI colour codes and all; errors still raise.
    onnxruntime.set_default_logger_severity(3)
    check_optimize_args(export_dir, length, target_top1, accuracy_budget, eval_windows)
    text = eval_text if eval_text is not None else heldout_text()
    progress("timing ONNX Runtime's optimization levels")
    choice = choose_level(export_dir, length=length, threads=threads, trust_code=trust_code)
    entries = [_entry(choice.path, "fp32", ort_level=choice.chosen, hardware_specific=choice.hardware_specific)]
    quants = []
    for method, precision in (("dynamic", "int8"), ("static", "int8-static")):
        if precision in make:
            progress(f"int8 ({method}): measuring each MatMul's sensitivity")
            # At --length too: one sequence of it holds as many tokens as the old fixed 4 x 256.
            quants.append(
                quantize_int8(
                    export_dir,
                    target_top1=target_top1,
                    length=length,
                    threads=threads,
                    method=method,
                    text=text,
                    budget=accuracy_budget,
                    windows=eval_windows,
                    trust_code=trust_code,
                )
            )
            entries.append(
                _entry(
                    quants[-1].path,
                    "int8",
                    quantization=QUANT_METHODS[method],
                    fp32_modules=[quants[-1].modules[n] for n in quants[-1].fp32_nodes],
                )
            )
    fp16_path = None
    if "fp16" in make:
        fp16_path, kept = convert_fp16(export_dir)
        entries.append(_entry(fp16_path, "fp16", target_provider="CUDAExecutionProvider", fp32_nodes=kept))
    plans = ()
    if "bf16" in make:
        plans = tuple(
            measure_bf16(
                export_dir,
                text=text,
                windows=eval_windows,
                budget=accuracy_budget,
                threads=threads,
                trust_code=trust_code,
                progress=progress,
            )
        )
    add_artifacts(export_dir, entries)
    return Optimized(choice, tuple(quants), fp16_path, plans)


QUANT_METHODS = {
    "dynamic": "dynamic, per-tensor, MatMul weights",
    "static": "static QDQ, calibrated, per-channel weights, MatMul",
}


def check_optimize_args(export_dir, length: int, target_top1: float, budget: float, windows: tuple[int, ...]) -> None:
    """Everything checkable, checked before the first file is written."""
    read_manifest(export_dir)  # a real, unchanged export dir
    check_writable(Path(export_dir))
    if length < 1:
        raise UserError(f"--length must be >= 1, got {length}")
    if not 0 < target_top1 <= 1:
        raise UserError(f"--target-top1 must be in (0, 1], got {target_top1}")
    check_budget(budget)
    if not windows or min(windows) < 2:  # a window scores each byte after its first
        raise UserError(f"--eval-windows must be lengths >= 2, got {','.join(map(str, windows)) or 'none'}")


def _entry(path: Path, precision: str, **settings) -> dict:
    """A full ONNX graph's manifest entry."""
    return {
        "name": path.name,
        "format": "onnx",
        "kind": "full",
        "settings": {"precision": precision, **settings, "static_shape": None},
    }
