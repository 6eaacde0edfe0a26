"""Where an ONNX graph starts to diverge: per-block outputs against eager.

The torch exporter tags every node with the module scope it came from
(`pkg.torch.onnx.name_scopes`). A block's output is the value made inside the
`model.blocks.{i}` scope (`model.layers.{i}` for the upstream flavor: the model's
`block_path`) and read outside it (the residual stream), so each block's
hidden state can be exposed as an extra graph output and compared with the eager
block's output (captured with forward hooks), like Polygraphy's per-layer comparison.
"""

from __future__ import annotations

import ast
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bsbr_export.compare.parity import compare
from bsbr_export.model.probe import output_leaves
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.eager import EagerRunner
from bsbr_export.runtime.onnx import OnnxRunner


@dataclass(frozen=True)
class LayerDiff:
    layer: str  # "blocks.0", ..., "output"
    max_abs: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.tolerance


def block_scope(node, block_path: str = "blocks") -> str | None:
    """'model.blocks.3' for a node exported from inside block 3, else None."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    prefix = f"model.{block_path}."
    return next((s for s in scopes if s.startswith(prefix) and s[len(prefix) :].isdigit()), None)


def block_outputs(model_proto, num_layers: int, block_path: str = "blocks") -> dict[int, str]:
    """ONNX value name of each block's output, found from the exporter's name scopes."""
    scope_of: dict[str, str | None] = {}
    consumers: dict[str, set] = {}
    for node in model_proto.graph.node:
        block = block_scope(node, block_path)
        for out in node.output:
            scope_of[out] = block
        for name in node.input:
            consumers.setdefault(name, set()).add(block)
    found = {}
    for value, block in scope_of.items():
        if block is None:
            continue
        if any(c != block for c in consumers.get(value, ())):
            found[int(block.rsplit(".", 1)[1])] = value
    return {i: found[i] for i in range(num_layers) if i in found}


def localize(
    onnx_path: Path, model, spec: ModelSpec, feeds: dict[str, np.ndarray], tolerance: float
) -> list[LayerDiff]:
    """Per-block max abs error of the ONNX graph vs eager on `feeds`, then the first
    output; blocks are named as in the user's module (`spec.block_path`, e.g. `layers.2`)."""
    proto = onnx.load(str(onnx_path))
    names = block_outputs(proto, spec.num_blocks, spec.block_path)
    first_output = proto.graph.output[0].name
    for name in names.values():
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(proto, str(probe), save_as_external_data=proto.ByteSize() > 1 << 30)
        results = OnnxRunner(probe).infer(feeds)
    captured, expected = _eager_blocks(model, spec, feeds)
    tokens = feeds[spec.tokens.name]
    mask = spec.mask
    valid = feeds[mask.name].astype(bool) if mask is not None else np.ones(tokens.shape[:2], dtype=bool)
    length = valid.shape[1]  # blocks may run on a length padded to whole chunks
    diffs = []
    for i, name in names.items():
        diff = compare(name, captured[i][:, :length][valid], results[name][:, :length][valid], tolerance)
        diffs.append(LayerDiff(f"{spec.block_path}.{i}", diff.max_abs, diff.tolerance))
    got = results[first_output]
    if spec.outputs[0].per_position:
        expected, got = expected[valid], got[valid]
    diff = compare("output", expected, got, tolerance)
    return [*diffs, LayerDiff("output", diff.max_abs, diff.tolerance)]


def _eager_blocks(model, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Each block's output (captured by forward hooks) and the first output, eagerly."""
    captured: dict[int, np.ndarray] = {}

    def keep(i):
        return lambda mod, args, out: captured.__setitem__(i, output_leaves(out)[1][0].detach().numpy())

    blocks = model.get_submodule(spec.block_path)
    hooks = [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    try:
        reference = EagerRunner(model, spec)
        expected = reference.infer(feeds)[reference.output_names[0]]
    finally:
        for hook in hooks:
            hook.remove()
    return captured, expected


def first_divergence(diffs: list[LayerDiff]) -> str | None:
    """The first layer past its tolerance (None when all pass)."""
    return next((d.layer for d in diffs if not d.passed), None)
