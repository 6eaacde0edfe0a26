"""The one engine table: engine name -> the file it runs -> how it runs -> its precision
and provider. Bench, optimize and the report read it; nothing parses engine names.

Adding an engine adds a row (and, for a new kind of runner, one opener below).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bsbr_export.defaults import OPTIMIZATION_LEVELS
from bsbr_export.errors import UserError
from bsbr_export.formats import FORMATS, ONNX, artifact_name
from bsbr_export.machine import bf16_missing
from bsbr_export.manifest import manifest_spec, read_manifest
from bsbr_export.model.sources import rebuild
from bsbr_export.precisions import BF16_PLAN, PRECISION
from bsbr_export.runtime.artifacts import open_artifact
from bsbr_export.runtime.base import Runner, cuda_missing
from bsbr_export.runtime.eager import AutocastRunner, CompiledRunner, EagerRunner
from bsbr_export.runtime.onnx import available_providers
from bsbr_export.runtime.openvino import OpenVinoRunner, openvino_missing

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
ON_CUDA = {"device": "cuda"}  # the options of a torch runner that computes on the GPU
BOUND = {"io_binding": True}  # ORT on a GPU: feeds bound on the device, so timing leaves out host copies


@dataclass(frozen=True)
class Engine:
    """One way to run a model: `runs` names the opener; `artifact` the file it runs in
    an export directory (None: the eager model rebuilt from it)."""

    name: str
    runs: str  # "eager", "compile", "autocast", "onnx", "openvino", or a format's name
    artifact: str | None = None
    precision: str = "fp32"
    provider: str | None = None  # ONNX Runtime's execution provider
    options: dict = field(default_factory=dict)  # what its runner is built with
    device: str = "cpu"  # where it computes: "cpu" or "cuda"


def _onnx_engines() -> list[Engine]:
    levels = [
        Engine(f"ort-cpu-{level}", "onnx", artifact_name(ONNX), provider=CPU, options={"optimization": level})
        for level in OPTIMIZATION_LEVELS
    ]
    return [
        *levels,
        Engine("ort-cuda-all", "onnx", artifact_name(ONNX), provider=CUDA, options=BOUND, device="cuda"),
        Engine("ort-cpu-optimized", "onnx", artifact_name(ONNX, variant="optimized"), provider=CPU),
        Engine("ort-cpu-int8", "onnx", PRECISION["int8"].artifact, "int8", CPU),
        Engine("ort-cpu-int8-static", "onnx", PRECISION["int8-static"].artifact, "int8", CPU),
        Engine("ort-cuda-fp16", "onnx", PRECISION["fp16"].artifact, "fp16", CUDA, options=BOUND, device="cuda"),
    ]


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine("eager", "eager"),
        Engine("compile", "compile"),
        # One engine per format that torch runs, named like the format (ONNX gets ORT's below).
        *(Engine(f.name, f.name, artifact_name(f, "full")) for f in FORMATS.values() if f.engine),
        *_onnx_engines(),
        # Both bf16 engines run the same autocast regions: what `optimize --bf16` measured for eager-bf16.
        Engine("eager-bf16", "autocast", precision="bf16"),
        Engine("compile-bf16", "autocast", precision="bf16", options={"compile": True}),
        Engine("openvino-fp32", "openvino", artifact_name(ONNX), options={"precision": "f32"}),
        Engine("openvino-bf16", "openvino", artifact_name(ONNX), "bf16", options={"precision": "bf16"}),
        # torch on a CUDA GPU: the same runners, the model (or file) and the feeds moved there.
        Engine("eager-cuda", "eager", options=ON_CUDA, device="cuda"),
        Engine("eager-cuda-bf16", "autocast", precision="bf16", options=ON_CUDA, device="cuda"),
        Engine("compile-cuda", "compile", options=ON_CUDA, device="cuda"),
        Engine(
            "torchscript-cuda",
            "torchscript",
            artifact_name(FORMATS["torchscript"], "full"),
            options=ON_CUDA,
            device="cuda",
        ),
    )
}
DEVICES = ("cpu", "cuda")
BASELINES = {"cpu": "eager", "cuda": "eager-cuda"}  # what speed-ups on each device are measured against


def check_device(device: str) -> str:
    """`device` when engines can run on it here, else a UserError saying why."""
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}: choose from {', '.join(DEVICES)}")
    if device == "cuda" and (missing := cuda_missing()):
        raise UserError(
            f"--device cuda: {missing}; install a CUDA build of torch (and onnxruntime-gpu for the "
            "ort-cuda engines) on a machine with an NVIDIA GPU"
        )
    return device


def why_not(engine: Engine, export_dir: Path) -> str | None:
    """Why `engine` cannot run from `export_dir` on this machine (None: it can)."""
    if engine.artifact and not (Path(export_dir) / engine.artifact).is_file():
        return f"no {engine.artifact} in {export_dir} (bsbr-export export / optimize write it)"
    if engine.provider and engine.provider not in available_providers():
        return f"ONNX Runtime's {engine.provider} is not available here"
    if engine.runs == "openvino" and (missing := openvino_missing()):
        return missing
    if engine.device == "cuda" and engine.runs != "onnx" and (missing := cuda_missing()):
        return missing
    if engine.precision == "bf16" and engine.device == "cpu":
        return bf16_missing()
    return None


def available_engines(export_dir: Path, device: str | None = None) -> list[str]:
    """Engines that can run from `export_dir` here (on `device` only, when given), in
    the table's order."""
    return [
        e.name for e in ENGINES.values() if (device is None or e.device == device) and why_not(e, export_dir) is None
    ]


def _source(export_dir: Path, trust_code: bool):
    """The eager model the export dir came from (a user's module only with `trust_code`)."""
    return rebuild(export_dir, read_manifest(export_dir, verify=False), trust_code=trust_code)


def _eager(engine: Engine, export_dir: Path, threads: int, trust_code: bool) -> Runner:
    source = _source(export_dir, trust_code)
    return EagerRunner(source.module, source.spec, **engine.options)


def _compiled(engine: Engine, export_dir: Path, threads: int, trust_code: bool) -> Runner:
    source = _source(export_dir, trust_code)
    return CompiledRunner(source.module, source.spec, **engine.options)


def _autocast(engine: Engine, export_dir: Path, threads: int, trust_code: bool) -> Runner:
    source = _source(export_dir, trust_code)
    keep = read_plans(export_dir).get("eager-bf16", {}).get("keep_fp32", ())
    return AutocastRunner(source.module, source.spec, keep, **engine.options)


def open_engine_file(
    engine: Engine,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    threads: int | None,
    spinning: bool = False,
) -> Runner:
    """A runner of `engine`'s kind over the artifact file `path` (its own, or another graph
    of the same format, e.g. the decode step): ONNX Runtime on the engine's provider with
    `threads` (`spinning` threads only where the session is alone in its process)."""
    options = dict(engine.options)
    if engine.runs == "onnx":
        options |= {"provider": engine.provider, "threads": threads, "spinning": spinning}
    return open_artifact(engine.runs, path, input_names, output_names, **options)


def _artifact(engine: Engine, export_dir: Path, threads: int, trust_code: bool) -> Runner:
    spec = manifest_spec(export_dir)
    # Alone in a bench worker process: spinning threads steal from nobody (ORT's default).
    return open_engine_file(
        engine, Path(export_dir) / engine.artifact, spec.input_names, spec.output_names, threads, spinning=True
    )


def _openvino(engine: Engine, export_dir: Path, threads: int, trust_code: bool) -> Runner:
    return OpenVinoRunner(Path(export_dir) / engine.artifact, threads=threads, **engine.options)


OPENERS = {"eager": _eager, "compile": _compiled, "autocast": _autocast, "openvino": _openvino}


def open_engine(name: str, export_dir: Path, *, threads: int | None = None, trust_code: bool = False) -> Runner:
    """A runner for engine `name` over `export_dir` (a user's module is rebuilt for the
    eager engines only with `trust_code`)."""
    engine = ENGINES[name]
    return OPENERS.get(engine.runs, _artifact)(engine, Path(export_dir), threads, trust_code)


def read_plans(export_dir: Path) -> dict[str, dict]:
    """The bf16 plans `optimize --bf16` wrote, by engine ({} when none)."""
    path = Path(export_dir) / BF16_PLAN
    return json.loads(path.read_text()) if path.is_file() else {}
