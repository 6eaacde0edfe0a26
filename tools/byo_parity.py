"""Bring-your-own-model parity: max abs error of every output, per model kind, over
lengths that are not multiples of c and batches 1 and 3, for ONNX, TorchScript and
(where the model streams) the streaming graph rolled out in uneven pieces.

    python tools/byo_parity.py            # writes tools/results/byo_parity.{json,md}

The models are the test suite's (`tests/user_models.py`); inputs are fresh (seeded
apart from the export's example and the export-time checks).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import user_models  # noqa: E402

from bsbr_export import export_module  # noqa: E402
from bsbr_export.compare.cases import Case, stream_pieces  # noqa: E402
from bsbr_export.compare.parity import check_parity  # noqa: E402
from bsbr_export.runtime.eager import EagerRunner  # noqa: E402
from bsbr_export.runtime.onnx import OnnxRunner  # noqa: E402
from bsbr_export.runtime.torchscript import TorchScriptRunner  # noqa: E402

KINDS = {
    "upstream-layer classifier (pooled)": user_models.upstream_classifier,
    "rotary GQA decoder on bsbr_export.nn": user_models.rotary_decoder,
    "native model + value head": user_models.value_head_model,
    "native mean-pooled classifier": user_models.pooled_model,
}
BATCHES = (1, 3)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_for(name: str, factory) -> dict:
    module = factory()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        streams = hasattr(module, "stream")
        result = export_module(module, out, streaming=streams)
        spec = json.loads((out / "manifest.json").read_text())["spec"]
        from bsbr_export.model.spec import ModelSpec

        spec = ModelSpec.from_dict(spec)
        c = spec.chunk_size
        lengths = [1, c - 1, c + 1, 3 * c + 2, 37 * c + 3]
        rows = {}
        artifacts = {"onnx": ("model.onnx", "full"), "torchscript": ("model.pt", "full")}
        if streams and spec.state is not None:
            artifacts["streaming onnx"] = ("model.streaming.onnx", "streaming")
        for label, (file, kind) in artifacts.items():
            reference = EagerRunner(module, spec, kind)
            runner = (
                OnnxRunner(out / file)
                if file.endswith(".onnx")
                else TorchScriptRunner(out / file, reference.input_names, reference.output_names)
            )
            cases = [
                Case(b, n, pieces=tuple(stream_pieces(n, c)) if kind != "full" else ())
                for n in lengths
                for b in BATCHES
            ]
            report = check_parity(file, reference, runner, cases, spec, seed=9000)
            for r in report.results:
                for d in r.diffs:
                    if d.name in spec.output_names:
                        rows.setdefault(label, {}).setdefault(d.name, {})[f"{r.case.batch}x{r.case.length}"] = d.max_abs
        return {
            "model": name,
            "chunk_size": c,
            "outputs": spec.output_names,
            "passed": result.passed,
            "swapped": [s["module"] for s in json.loads((out / "manifest.json").read_text()).get("swapped", [])],
            "errors": rows,
        }


def main() -> None:
    results = [table_for(name, factory) for name, factory in KINDS.items()]
    info = {"cpu": cpu_model(), "torch": torch.__version__, "results": results}
    out = ROOT / "tools" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "byo_parity.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = ["# Bring-your-own-model parity (max abs error vs eager)\n", f"CPU: {info['cpu']}; torch {info['torch']}\n"]
    for r in results:
        lines.append(
            f"## {r['model']} (c = {r['chunk_size']}, outputs {', '.join(r['outputs'])}"
            f"{', swapped ' + ', '.join(r['swapped']) if r['swapped'] else ''})\n"
        )
        for artifact, outputs in r["errors"].items():
            shapes = list(next(iter(outputs.values())))
            lines.append(f"| {artifact} | " + " | ".join(shapes) + " |")
            lines.append("|---" * (len(shapes) + 1) + "|")
            for output, cells in outputs.items():
                lines.append(f"| {output} | " + " | ".join(f"{cells[s]:.1e}" for s in shapes) + " |")
            lines.append("")
    (out / "byo_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
