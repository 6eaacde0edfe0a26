"""`--format web`: a static page that generates in the browser with onnxruntime-web.

The export's `web/` holds the graphs at the opset onnxruntime-web runs (`model.onnx`, the
full forward; `model.decode.onnx`, the step that takes the prompt and every token that
closes a chunk; `model.rows.onnx`, the row step every other token goes through, where the
module has one), the page (`index.html`, `app.js`), onnxruntime-web's own files for its
wasm and WebGPU backends (`ort/`, copied from the npm package: nothing is fetched from a
CDN) and `web.json` (the tensor names, state shapes and every graph's sha256, which the
page checks). Plain files: any static host serves them; `bsbr-export serve-web` adds the
cross-origin isolation headers that give wasm its threads.

WebGPU runs the row step only: its shapes are fixed (`c - 1` cache slots), while a decode
step always holds zero-sized tensors (the chunks it finished, usually none; the tokens it
leaves open, none after a chunk closes), which onnxruntime-web's WebGPU kernels cannot
dispatch. So the page runs the decode step on wasm, one token in `c`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from bsbr_export.errors import UserError
from bsbr_export.export.onnx import export_onnx
from bsbr_export.formats import FORMATS, artifact_name
from bsbr_export.manifest import sha256
from bsbr_export.model.spec import ROW_POSITIONS, ModelSpec
from bsbr_export.runtime.ortweb import VERSION as ORT_WEB_VERSION
from bsbr_export.runtime.ortweb import ort_web_dist

# The opset whose ops onnxruntime-web's wasm and WebGPU backends run (23's fused
# Attention is not in its WebGPU kernels); the graphs spell attention out below it.
WEB_OPSET = 18
# The page's two backends: each a bundle and the wasm build it loads.
RUNTIME_FILES = (
    "ort.wasm.min.mjs",
    "ort-wasm-simd-threaded.mjs",
    "ort-wasm-simd-threaded.wasm",
    "ort.webgpu.min.mjs",
    "ort-wasm-simd-threaded.asyncify.mjs",
    "ort-wasm-simd-threaded.asyncify.wasm",
)
PAGE = Path(__file__).with_name("webpage")
PAGE_FILES = ("index.html", "app.js")


def check_web(spec: ModelSpec) -> None:
    """UserError, before any work, when the page could not run this model."""
    if not any(o.logits for o in spec.outputs):
        raise UserError(
            f"--format web generates text: the model must output logits, it outputs {', '.join(spec.output_names)}"
        )
    ort_web_dist(RUNTIME_FILES + ("ort.node.min.mjs",))


def write_web(model: nn.Module, path: Path, kind: str, spec: ModelSpec) -> list[Path]:
    """One web graph at `path` (`web/model.onnx`, `.decode.onnx` or `.rows.onnx`); with the
    full graph the page and onnxruntime-web's files, with a step its entry in `web.json`."""
    path.parent.mkdir(exist_ok=True)
    files = export_onnx(model, path, spec=spec, kind=kind, opset=WEB_OPSET)
    if kind == "full":
        runtime = path.parent / "ort"
        runtime.mkdir(exist_ok=True)
        dist = ort_web_dist(RUNTIME_FILES)
        for name in RUNTIME_FILES:
            files.append(Path(shutil.copyfile(dist / name, runtime / name)))
        for name in PAGE_FILES:
            files.append(Path(shutil.copyfile(PAGE / name, path.parent / name)))
    elif kind == "decode":  # written last (formats.KINDS): every graph is there to hash
        files.append(write_page_facts(path.parent, spec, type(model).__name__))
    return files


def write_page_facts(web: Path, spec: ModelSpec, model_name: str) -> Path:
    """web.json: what the page needs to know (names, vocabulary, state, the row step's
    caches) and the sha256 of its graphs (the row step's where the module has one)."""
    state = spec.state
    names = {kind: Path(artifact_name(FORMATS["web"], kind)).name for kind in FORMATS["web"].kinds}
    graphs = {kind: name for kind, name in names.items() if (web / name).is_file()}
    facts = {
        "model": model_name,
        "tokens": spec.tokens.name,
        "vocab_size": spec.tokens.high,
        "tokenizer": spec.tokenizer,
        "logits": next(o.name for o in spec.outputs if o.logits),
        "chunk_size": spec.chunk_size,
        "state": state.inputs,
        "state_outputs": state.update_names(),
        "append_axis": state.append_axis,
        # The row step: each `cache.*` is a `past.*` entry, its current chunk's rows in
        # `c - 1` slots; `row.*` is the token's own row of it, appended by the page.
        "positions": ROW_POSITIONS,
        "cache": state.cache_inputs(spec.chunk_size),
        "row_outputs": list(state.row_outputs()),
        "graphs": graphs,
        "files": {name: sha256(web / name) for name in graphs.values()},
        "runtime": f"onnxruntime-web {ORT_WEB_VERSION}",
    }
    path = web / "web.json"
    path.write_text(json.dumps(facts, indent=2) + "\n")
    return path
