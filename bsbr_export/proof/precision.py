"""bf16 on CPUs that have it, with the parts that move the loss kept in fp32.

Two routes: torch under `torch.autocast("cpu", torch.bfloat16)` (eager, or compiled),
and OpenVINO reading `model.onnx` with bf16 inference precision (all bf16: see
`OpenVinoRunner`). Which parts autocast keeps in fp32 is measured, not listed: the model
is cut into groups (each block's children, what runs before the first block: embedding
and positions, and after the last: the head); `sensitivity` runs everything in bf16 but
one group and scores held-out text, and `choose_fp32` returns groups to fp32, most
helpful first, until bits per byte are within budget in every window scored.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bsbr_export.errors import UserError
from bsbr_export.proof.evaltext import worst_change

BF16_PLAN = "bf16.json"  # in an export dir: the fp32 groups `optimize --bf16` measured, per engine


def bf16_missing() -> str | None:
    """Why this CPU cannot run bf16 matrix products natively (None when it can)."""
    from bsbr_export.proof.bench import cpu_features

    if not {"avx512_bf16", "amx_bf16"} & set(cpu_features()):
        return "this CPU has neither AVX512_BF16 nor AMX-BF16: bf16 would be emulated, slower than fp32"
    return None


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here (None when it can)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return 'OpenVINO is not installed: pip install ".[openvino]"'
    return None


# ---------------------------------------------------------------------------
# torch autocast


def module_groups(model: torch.nn.Module, block_path: str | None) -> list[str]:
    """The groups of a module that autocast can keep in fp32: each block's children
    (`blocks.0.attn`, `blocks.0.ff`, ...) and the top-level modules outside the blocks."""
    if not block_path:
        return [name for name, _ in model.named_children()]
    blocks = model.get_submodule(block_path)
    inside = [f"{block_path}.{i}.{child}" for i, block in enumerate(blocks.children())
              for child, _ in block.named_children()]
    outside = [name for name, _ in model.named_children() if name != block_path.split(".")[0]]
    return inside + outside


@contextlib.contextmanager
def autocast_bf16(model: torch.nn.Module, keep_fp32: tuple[str, ...] = ()):
    """Run `model` under bf16 autocast with the submodules `keep_fp32` in fp32 (their
    inputs cast back to float, autocast off inside)."""
    with fp32_groups(model, keep_fp32), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


@contextlib.contextmanager
def fp32_groups(model: torch.nn.Module, keep_fp32: tuple[str, ...]):
    """Make the submodules `keep_fp32` of `model` run in fp32 under any autocast: their
    inputs cast back to float and autocast off inside, until the context exits."""
    patched = []

    def fp32_forward(forward):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            with torch.autocast("cpu", enabled=False):
                return forward(*args, **kwargs)

        return run

    try:
        for name in keep_fp32:
            module = model.get_submodule(name)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = fp32_forward(module.forward)
        yield
    finally:
        for module, own in patched:  # back to the class's forward, or the module's own
            if own is None:
                del module.forward
            else:
                module.forward = own


class AutocastRunner:
    """The eager model under bf16 autocast (`keep_fp32` groups in fp32); fp32 outputs.

    With `compile`, the same graph through `torch.compile` (dynamic shapes): the fp32
    groups are then patched once, for the runner's life (and the model's: a bench worker
    owns it), since new forwards on every call would make dynamo recompile every call.
    """

    name = "eager-bf16"

    def __init__(self, model, spec, keep_fp32: tuple[str, ...] = (), compile: bool = False) -> None:
        from bsbr_export.export.graphs import export_graph

        self.model, self.keep_fp32 = model, tuple(keep_fp32)
        self.graph = export_graph(model, spec, "logits")
        self.input_names, self.output_names = self.graph.input_names, self.graph.output_names
        self.run, self.autocast = self.graph, functools.partial(autocast_bf16, model, self.keep_fp32)
        if compile:
            self.patched = contextlib.ExitStack()
            self.patched.enter_context(fp32_groups(model, self.keep_fp32))
            self.run = torch.compile(self.graph, dynamic=True)
            self.autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode(), self.autocast():
            outputs = self.run(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return {n: o.float().numpy() for n, o in zip(self.output_names, outputs)}


# ---------------------------------------------------------------------------
# OpenVINO


class OpenVinoRunner:
    """`model.onnx` compiled by OpenVINO for the CPU at `precision` ("f32" or "bf16").

    bf16 is all or nothing here: OpenVINO 2026.4's CPU plugin ignores a
    `disable_fp16_compression_0` runtime-info entry set from Python (every op of
    bsbr-stdlib marked gave outputs identical to unmarked bf16), and Python has no other
    per-node precision control, so no part can be kept fp32 the way autocast does.
    """

    name = "openvino"

    def __init__(self, path: str | os.PathLike, precision: str = "f32", threads: int | None = None) -> None:
        missing = openvino_missing()
        if missing:
            raise UserError(missing)
        import openvino as ov

        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX file {path} does not exist")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except RuntimeError as exc:
            raise UserError(f"OpenVINO cannot read {path}: {str(exc).splitlines()[0]}") from None
        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer({n: feeds[n] for n in self.input_names})
        return {n: np.asarray(results[o]) for n, o in zip(self.output_names, self.compiled.outputs)}


# ---------------------------------------------------------------------------
# Measured sensitivity


@dataclass(frozen=True)
class Bf16Plan:
    """What `choose_fp32` measured for one engine: bf16 everywhere, each group alone back
    in fp32, and the groups kept fp32 to meet the budget; bits per byte by window length."""

    engine: str
    windows: tuple[int, ...]  # the window lengths the text was scored at (the bf16 trap is at long positions)
    fp32_bpb: dict[int, float]
    all_bf16_bpb: dict[int, float]
    sensitivity: dict[str, dict[int, float]]  # group -> bits per byte with only that group back in fp32
    keep_fp32: tuple[str, ...]
    bpb: dict[int, float]  # with keep_fp32 in fp32
    budget: float

    @property
    def change(self) -> float:
        """The worst relative rise of bits per byte over fp32's across the windows."""
        return worst_change(self.bpb, self.fp32_bpb)

    @property
    def passed(self) -> bool:
        return self.change <= self.budget


def choose_fp32(score: Callable[[tuple[str, ...]], dict[int, float]], groups: list[str], fp32_bpb: dict[int, float],
                budget: float, engine: str) -> Bf16Plan:
    """Greedy by measured sensitivity: score(keep_fp32) -> bits per byte by window. Groups
    whose return to fp32 alone lowers the loss most (relative, summed over the windows:
    one group may matter at long windows only, another at short ones) go back first,
    until every window is within `budget` of fp32."""
    all_bf16 = score(())
    sensitivity = {g: score((g,)) for g in groups} if worst_change(all_bf16, fp32_bpb) > budget else {}

    def benefit(group: str) -> float:
        return sum((all_bf16[n] - sensitivity[group][n]) / fp32_bpb[n] for n in fp32_bpb)

    keep, bpb = (), all_bf16
    for group in sorted(sensitivity, key=benefit, reverse=True):
        if worst_change(bpb, fp32_bpb) <= budget or benefit(group) <= 0:
            break
        keep += (group,)
        bpb = score(keep)
    return Bf16Plan(engine, tuple(fp32_bpb), fp32_bpb, all_bf16, sensitivity, keep, bpb, budget)


def read_plans(export_dir: Path) -> dict[str, dict]:
    """The bf16 plans `optimize --bf16` wrote, by engine ({} when none)."""
    path = Path(export_dir) / BF16_PLAN
    return json.loads(path.read_text()) if path.is_file() else {}


def plan_record(plan: Bf16Plan) -> dict:
    return {**asdict(plan), "change": plan.change, "passed": plan.passed}


def measure_bf16(export_dir: str | os.PathLike, *, text: bytes, windows: tuple[int, ...], budget: float,
                 threads: int | None = None, trust_code: bool = False, progress=lambda step: None) -> list[Bf16Plan]:
    """For each bf16 engine that runs here (eager autocast, OpenVINO), measure which
    groups must stay fp32 for held-out bits per byte (`text` in windows of each length
    in `windows`) to stay within `budget` of eager fp32's at every one (OpenVINO: whether
    all-bf16 is); writes the plans to `export_dir`/bf16.json."""
    from bsbr_export.export.manifest import read_manifest
    from bsbr_export.io import atomic_write
    from bsbr_export.model.sources import rebuild
    from bsbr_export.proof.bench import reduced_precision_engines
    from bsbr_export.proof.evaltext import bits_per_byte_by_window, logits_of, scores_text
    from bsbr_export.proof.runners import EagerRunner

    directory = Path(export_dir)
    source = rebuild(directory, read_manifest(directory), trust_code=trust_code)
    spec = source.spec
    if not scores_text(spec):
        raise UserError("bf16 is judged by held-out bits per byte: it needs a byte-level language model "
                        "(a spec with tokenizer \"bytes\" and logits)")
    if threads:
        torch.set_num_threads(threads)
    fp32 = bits_per_byte_by_window(logits_of(EagerRunner(source.module, spec), spec), text, windows)
    routes = {
        "eager-bf16": (module_groups(source.module, spec.block_path),
                       lambda keep: AutocastRunner(source.module, spec, keep)),
    }
    onnx_path = directory / "model.onnx"
    if onnx_path.is_file() and openvino_missing() is None:
        # Nothing to keep fp32 (see OpenVinoRunner): the plan is whether all-bf16 is within budget.
        routes["openvino-bf16"] = ([], lambda keep: OpenVinoRunner(onnx_path, "bf16", threads))
    plans = []
    for engine, (candidates, make) in routes.items():
        why_not = reduced_precision_engines(directory)[engine]
        if why_not:
            progress(f"{engine} skipped: {why_not}")
            continue
        progress(f"{engine}: measuring each group's effect on held-out bits per byte")
        plans.append(choose_fp32(lambda keep: bits_per_byte_by_window(logits_of(make(keep), spec), text, windows),
                                 candidates, fp32, budget, engine))
    with atomic_write(directory / BF16_PLAN) as tmp:
        tmp.write_text(json.dumps({p.engine: plan_record(p) for p in plans}, indent=2) + "\n")
    return plans
