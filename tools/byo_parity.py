"""Bring-your-own-model parity: max abs error of every output, per model kind, over
lengths that are not multiples of c and batches 1 and 3, for ONNX, TorchScript and
(where the model streams) the streaming graph rolled out in uneven pieces.

    python tools/byo_parity.py [--out tools/results] [--smoke]   # writes byo_parity.{json,md}

The models are the sample of users' kinds (`samples/your_model/user_models.py`), loaded as a user's file is: by
module reference (`path/to/file.py:factory`), trusted; inputs are fresh (seeded apart
from the export's example and the export-time checks).
`--smoke`: lengths 1 and c + 1 only, and the export's own checks up to length 19, not 2048.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import lab

from bsbr_export import export_module
from bsbr_export.compare.cases import DEFAULT_LONG_LENGTH, Case, stream_pieces
from bsbr_export.compare.parity import check_parity
from bsbr_export.model.spec import ModelSpec
from bsbr_export.model.usercode import build_module
from bsbr_export.runtime.eager import EagerRunner
from bsbr_export.runtime.onnx import OnnxRunner
from bsbr_export.runtime.torchscript import TorchScriptRunner

MODELS = Path(__file__).resolve().parents[1] / "samples" / "your_model" / "user_models.py"
KINDS = {
    "upstream-layer classifier (pooled)": "upstream_classifier",
    "rotary GQA decoder on bsbr_export.nn": "rotary_decoder",
    "native model + value head": "value_head_model",
    "native mean-pooled classifier": "pooled_model",
}
BATCHES = (1, 3)
SMOKE_LONG_LENGTH = 19  # the export's long check under --smoke: 4c + 3 for these models' c = 4


def table_for(name: str, ref: str, smoke: bool) -> dict:
    """Every output's max abs error against eager, per artifact and batch x length."""
    module = build_module(ref, trust_code=True)  # this checkout's own file
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        streams = hasattr(module, "stream")
        long_length = SMOKE_LONG_LENGTH if smoke else DEFAULT_LONG_LENGTH
        result = export_module(module, out, streaming=streams, long_length=long_length)
        spec = ModelSpec.from_dict(json.loads((out / "manifest.json").read_text())["spec"])
        c = spec.chunk_size
        lengths = [1, c + 1] if smoke else [1, c - 1, c + 1, 3 * c + 2, 37 * c + 3]
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


def report(info: dict) -> str:
    """One table per model kind and artifact: outputs x (batch x length)."""
    machine = info["machine"]
    lines = [
        "# Bring-your-own-model parity (max abs error vs eager)\n",
        lab.describe(machine) + "\n",
    ]
    for r in info["results"]:
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
    return "\n".join(lines) + "\n"


def main() -> None:
    args = lab.parser(__doc__).parse_args()
    results = [
        lab.progress(name, table_for, name, f"{MODELS}:{factory}", args.smoke) for name, factory in KINDS.items()
    ]
    machine = lab.machine()
    info = {
        "machine": machine,
        "torch": machine["versions"]["torch"],
        "results": results,
    }
    lab.write(args.out, "byo_parity", info, report)


if __name__ == "__main__":
    main()
