"""onnxruntime-web's wasm backend under Node.js: the runtime the web page runs, so an
export can check its web graphs where they will run (`--format web`'s runner).

One Node process per runner holds the session (`ortweb_worker.mjs`); feeds and outputs
cross its stdin/stdout as JSON lines of base64 arrays. onnxruntime-web's files come from
$BSBR_ORT_WEB, else the checkout's web/node_modules (`npm ci --prefix web`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from bsbr_export.errors import UserError

ENV_VAR = "BSBR_ORT_WEB"
VERSION = "1.31.1"  # web/package.json pins it
WORKER = Path(__file__).with_name("ortweb_worker.mjs")
INSTALL = (
    f"run `npm ci --prefix web` in a bsbr-export checkout, or `npm install onnxruntime-web@{VERSION}` "
    f"and set {ENV_VAR}=node_modules/onnxruntime-web/dist"
)
DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32}


def ort_web_dist(needs: tuple[str, ...] = ("ort.node.min.mjs",)) -> Path:
    """onnxruntime-web's `dist/` ($BSBR_ORT_WEB, else the checkout's web/node_modules),
    checked to hold `needs` and to be the pinned version."""
    default = Path(__file__).resolve().parents[2] / "web" / "node_modules" / "onnxruntime-web" / "dist"
    dist = Path(os.environ.get(ENV_VAR) or default)
    missing = [f for f in needs if not (dist / f).is_file()]
    if missing:
        raise UserError(
            f"onnxruntime-web's files are needed for the web format, and {dist} lacks {missing[0]}: {INSTALL}"
        )
    package = dist.parent / "package.json"
    version = json.loads(package.read_text()).get("version") if package.is_file() else None
    if version != VERSION:
        raise UserError(f"the web format needs onnxruntime-web {VERSION}, {dist.parent} is {version}: {INSTALL}")
    return dist


class OrtWebRunner:
    """A graph in onnxruntime-web (wasm, one thread) under Node, behind the runner contract."""

    name = "onnxruntime-web"

    def __init__(
        self, path: str | os.PathLike, input_names: list[str] | None = None, output_names: list[str] | None = None
    ) -> None:
        node = shutil.which("node")
        if node is None:
            raise UserError(
                "the web format's graphs are checked in onnxruntime-web under Node.js: install node (>= 18)"
            )
        self.path = Path(path)
        self.process = subprocess.Popen(
            [node, str(WORKER), str(ort_web_dist()), str(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = self._read()
        if "error" in first:
            self.close()
            raise UserError(f"onnxruntime-web cannot load {self.path.name}: {first['error'].splitlines()[0][:400]}")
        self.input_names, self.output_names = first["inputs"], first["outputs"]
        for given, own in ((input_names, self.input_names), (output_names, self.output_names)):
            if given is not None and set(given) != set(own):
                self.close()
                raise UserError(f"{self.path.name} has {', '.join(own)}, expected {', '.join(given)}: re-export it")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = {
            name: {
                "dtype": str(feeds[name].dtype),
                "dims": list(feeds[name].shape),
                "data": base64.b64encode(np.ascontiguousarray(feeds[name]).tobytes()).decode(),
            }
            for name in self.input_names
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise UserError(f"onnxruntime-web failed to run {self.path.name}: {answer['error'].splitlines()[0][:400]}")
        return {
            name: np.frombuffer(base64.b64decode(value["data"]), DTYPES[value["dtype"]]).reshape(value["dims"])
            for name, value in answer["outputs"].items()
        }

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            reason = self.process.stderr.read().strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"onnxruntime-web under Node stopped: {reason[0][:400]}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(10)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the pipe may be gone already
            pass
