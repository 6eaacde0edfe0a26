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

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bsbr_export.errors import UserError
from bsbr_export.formats import ONNX, artifact_name
from bsbr_export.io import atomic_write
from bsbr_export.manifest import read_manifest
from bsbr_export.model.sources import rebuild
from bsbr_export.precisions import BF16_PLAN
from bsbr_export.proof.evaltext import bits_per_byte_by_window, logits_of, scores_text, worst_change
from bsbr_export.runtime.eager import AutocastRunner, EagerRunner
from bsbr_export.runtime.engines import ENGINES, why_not
from bsbr_export.runtime.openvino import OpenVinoRunner, openvino_missing

# ---------------------------------------------------------------------------
# torch autocast


def module_groups(model: torch.nn.Module, block_path: str | None) -> list[str]:
    """The groups of a module that autocast can keep in fp32: each block's children
    (`blocks.0.attn`, `blocks.0.ff`, ...) and the top-level modules outside the blocks."""
    if not block_path:
        return [name for name, _ in model.named_children()]
    blocks = model.get_submodule(block_path)
    inside = [
        f"{block_path}.{i}.{child}" for i, block in enumerate(blocks.children()) for child, _ in block.named_children()
    ]
    outside = [name for name, _ in model.named_children() if name != block_path.split(".")[0]]
    return inside + outside


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


def choose_fp32(
    score: Callable[[tuple[str, ...]], dict[int, float]],
    groups: list[str],
    fp32_bpb: dict[int, float],
    budget: float,
    engine: str,
) -> Bf16Plan:
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


def plan_record(plan: Bf16Plan) -> dict:
    return {**asdict(plan), "change": plan.change, "passed": plan.passed}


def measure_bf16(
    export_dir: str | os.PathLike,
    *,
    text: bytes,
    windows: tuple[int, ...],
    budget: float,
    threads: int | None = None,
    trust_code: bool = False,
    progress=lambda step: None,
) -> list[Bf16Plan]:
    """For each bf16 engine that runs here (eager autocast, OpenVINO), measure which
    groups must stay fp32 for held-out bits per byte (`text` in windows of each length
    in `windows`) to stay within `budget` of eager fp32's at every one (OpenVINO: whether
    all-bf16 is); writes the plans to `export_dir`/bf16.json."""
    directory = Path(export_dir)
    source = rebuild(directory, read_manifest(directory), trust_code=trust_code)
    spec = source.spec
    if not scores_text(spec):
        raise UserError(
            "bf16 is judged by held-out bits per byte: it needs a byte-level language model "
            '(a spec with tokenizer "bytes" and logits)'
        )
    if threads:
        torch.set_num_threads(threads)
    fp32 = bits_per_byte_by_window(logits_of(EagerRunner(source.module, spec), spec), text, windows)
    routes = {
        "eager-bf16": (
            module_groups(source.module, spec.block_path),
            lambda keep: AutocastRunner(source.module, spec, keep),
        ),
    }
    onnx_path = directory / artifact_name(ONNX)
    if onnx_path.is_file() and openvino_missing() is None:
        # Nothing to keep fp32 (see OpenVinoRunner): the plan is whether all-bf16 is within budget.
        routes["openvino-bf16"] = ([], lambda keep: OpenVinoRunner(onnx_path, precision="bf16", threads=threads))
    plans = []
    for engine, (candidates, make) in routes.items():
        reason = why_not(ENGINES[engine], directory)
        if reason:
            progress(f"{engine} skipped: {reason}")
            continue
        progress(f"{engine}: measuring each group's effect on held-out bits per byte")
        plans.append(
            choose_fp32(
                lambda keep, make=make: bits_per_byte_by_window(logits_of(make(keep), spec), text, windows),
                candidates,
                fp32,
                budget,
                engine,
            )
        )
    with atomic_write(directory / BF16_PLAN) as tmp:
        tmp.write_text(json.dumps({p.engine: plan_record(p) for p in plans}, indent=2) + "\n")
    return plans
