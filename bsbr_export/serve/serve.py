"""Run a real Triton Inference Server over a `--triton-repo` directory.

The server comes from PyPI's `nvidia-pytriton` wheel, which bundles `tritonserver` and
its Python backend (no ONNX Runtime backend). It must live in a venv of its own: the
wheel needs numpy < 2 (numpy 2 silently corrupts tensors in the Python backend), while
this package runs with numpy 2. That venv also needs onnxruntime, which the models'
`model.py` imports. `TritonServer` finds everything in that venv, serves only the models
whose backend it has (from a repository of symlinks to them: a model it cannot run would
make the whole server refuse to start), binds 127.0.0.1 only, and waits for readiness
with a hard timeout, since a server whose backend fails to load hangs in "loading".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bsbr_export.errors import UserError
from bsbr_export.manifest import MANIFEST

# Where `serve` looks for the serving venv when --triton-env is not given.
ENV_VAR = "BSBR_TRITON_ENV"
# --no-deps: the wheel's dependencies serve PyTriton's Python API, which is not used here;
# the server binary brings its own libraries.
INSTALL = (
    'python3 -m venv .venv-triton && .venv-triton/bin/pip install "numpy<2" onnxruntime tokenizers && '
    '.venv-triton/bin/pip install --no-deps "nvidia-pytriton==0.7.0"'
)
START_TIMEOUT_S = 60.0
# On SIGTERM, Triton waits this long for in-flight work (open sequences count) before exiting;
# after STOP_TIMEOUT_S we kill it.
EXIT_TIMEOUT_S = 3
STOP_TIMEOUT_S = 15.0
# Run by the serving venv's python: where its packages are, libpython's directory, its
# Python version, and the numpy / onnxruntime it has (versions read without importing them).
PROBE = """
import json, site, sys, sysconfig
from importlib import metadata

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

print(json.dumps({"site": site.getsitepackages()[0], "libdir": sysconfig.get_config_var("LIBDIR"),
                  "minor": "%d.%d" % sys.version_info[:2], "numpy": version("numpy"),
                  "onnxruntime": version("onnxruntime")}))
"""
# Triton's own log prefix: severity letter, date, time, thread, file:line]
LOG_PREFIX = re.compile(r"^[EWI]\d{4} [\d:.]+ +\d+ [^\]]+\] ?")


@dataclass(frozen=True)
class TritonEnv:
    """What a serving venv provides: the binary, its libraries and the Python backend."""

    root: Path
    tritonserver: Path
    library_path: str  # LD_LIBRARY_PATH: the wheel's bundled libs + libpython's directory
    python_backend: Path  # pytriton/tritonserver/backends/python
    stub: Path  # triton_python_backend_stub for the venv's Python minor version


def find_env(root: str | os.PathLike | None = None) -> TritonEnv:
    """The serving venv at `root` (default: $BSBR_TRITON_ENV), checked to be usable."""
    root = root or os.environ.get(ENV_VAR)
    if not root:
        raise UserError(
            f"no Triton server: install one with `{INSTALL}` and pass --triton-env .venv-triton (or set {ENV_VAR})"
        )
    root = Path(root)
    python = root / "bin" / "python"
    if not python.is_file():
        raise UserError(f"--triton-env {root} is not a venv (no bin/python): create it with `{INSTALL}`")
    done = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--triton-env {root}: its bin/python fails ({last}): recreate it with `{INSTALL}`")
    info = json.loads(done.stdout)
    if info["numpy"] is None:
        raise UserError(
            f"--triton-env {root} has no numpy, which Triton's Python backend needs: "
            f"run `{root}/bin/pip install 'numpy<2'`"
        )
    if int(info["numpy"].split(".")[0]) >= 2:
        raise UserError(
            f"--triton-env {root} has numpy {info['numpy']}, which corrupts Triton's Python-backend "
            f"tensors: run `{root}/bin/pip install 'numpy<2'`"
        )
    if info["onnxruntime"] is None:
        raise UserError(
            f"--triton-env {root} has no onnxruntime, which the models need: run `{root}/bin/pip install onnxruntime`"
        )
    site = Path(info["site"])
    server = site / "pytriton" / "tritonserver"
    env = TritonEnv(
        root=root,
        tritonserver=server / "bin" / "tritonserver",
        library_path=f"{site / 'nvidia_pytriton.libs'}:{info['libdir']}",
        python_backend=server / "backends" / "python",
        stub=server / "python_backend_stubs" / info["minor"] / "triton_python_backend_stub",
    )
    for path in (env.tritonserver, env.python_backend, env.stub):
        if not path.exists():
            raise UserError(
                f"--triton-env {root} lacks {path.relative_to(site)}: run "
                f"`{root}/bin/pip install --no-deps 'nvidia-pytriton==0.7.0'`"
            )
    return env


@dataclass(frozen=True)
class RepoModels:
    """The models of a repository that this server can run, and those it cannot."""

    loaded: tuple[str, ...]
    skipped: dict[str, str]  # model -> its backend


def repo_models(repo: str | os.PathLike, backends: set[str]) -> RepoModels:
    """Sort `repo`'s models by whether one of `backends` runs them (from each config.pbtxt)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise UserError(
            f"Triton repository {repo} is not a directory: write one with "
            "`bsbr-export export MODEL --format onnx --streaming --triton-repo DIR`"
        )
    if (repo / MANIFEST).is_file():
        raise UserError(
            f"{repo} is an export directory, not a Triton repository: write one with "
            f"`bsbr-export export MODEL --format onnx --streaming --triton-repo DIR`"
        )
    loaded, skipped = [], {}
    for config in sorted(repo.glob("*/config.pbtxt")):
        backend = _config_backend(config.read_text())
        if backend in backends:
            loaded.append(config.parent.name)
        else:
            skipped[config.parent.name] = backend
    if not loaded and not skipped:
        raise UserError(
            f"{repo} holds no models (no */config.pbtxt): write them with "
            "`bsbr-export export MODEL --format onnx --streaming --triton-repo DIR`"
        )
    if not loaded:
        raise UserError(
            f"no model in {repo} runs on this server's backends ({', '.join(sorted(backends))}): "
            f"{', '.join(f'{m} needs {b}' for m, b in skipped.items())}; re-export with --triton-repo "
            "to add the Python-backend models"
        )
    return RepoModels(tuple(loaded), skipped)


def _config_backend(text: str) -> str:
    """The backend a config names (`backend:`, or the one a `platform:` implies)."""
    backend = re.search(r'^backend:\s*"([^"]+)"', text, re.MULTILINE)
    if backend:
        return backend.group(1)
    platform = re.search(r'^platform:\s*"([^"]+)"', text, re.MULTILINE)
    if not platform:
        return "unknown"
    # Triton runs the onnxruntime_onnx platform on its onnxruntime backend.
    return {"onnxruntime_onnx": "onnxruntime"}.get(platform.group(1), platform.group(1))


def check_port(port: int, flag: str) -> int:
    """`port` if it can be bound on 127.0.0.1 (0: a free one, chosen now), else a UserError."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise UserError(f"port {port} on 127.0.0.1 is not free ({exc.strerror}): pass another {flag}") from None
        return sock.getsockname()[1]


class ServerProcess:
    """A server this project runs as a child process in a session of its own, on 127.0.0.1
    (a context manager): subclasses `start()` it; `stop()` ends it by its pid and removes
    what `cleanup()` names."""

    process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, signal_: int = signal.SIGTERM) -> int | None:
        """Send `signal_` (SIGKILL: end it as a crash would), then SIGKILL its whole process
        group after STOP_TIMEOUT_S: a server's helpers (Triton's backend stubs, nginx's
        worker) would outlive a SIGKILL to it alone. Its exit status."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal_)
                try:
                    self.process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            code = self.process.returncode
        self.cleanup()
        return code

    def cleanup(self) -> None:
        """Remove what the server's run left (nothing, unless a subclass says)."""

    def start(self) -> ServerProcess:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TritonServer(ServerProcess):
    """A tritonserver process over a repository, bound to 127.0.0.1 (a context manager).

    `start()` returns once the server reports ready (or raises UserError with the reason
    from its log); `stop()` ends it by its pid, SIGTERM then SIGKILL, and removes the
    backend directory it made.
    """

    def __init__(
        self,
        repo: str | os.PathLike,
        env: TritonEnv,
        http_port: int = 8000,
        grpc_port: int = 8001,
        timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.env = env
        self.models = repo_models(self.repo, {"python"})
        self.http_port = check_port(http_port, "--http-port")
        self.grpc_port = check_port(grpc_port, "--grpc-port")
        if self.grpc_port == self.http_port:
            raise UserError(f"--http-port and --grpc-port are both {self.http_port}: pass two different ports")
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self._workdir / "tritonserver.log"

    def start(self) -> TritonServer:
        """Launch tritonserver and wait until /v2/health/ready answers 200."""
        self._workdir = Path(tempfile.mkdtemp(prefix="bsbr-triton-"))
        # The backend directory holds the wheel's Python backend plus the stub for this
        # venv's Python (the wheel keeps them apart, one stub per Python minor version).
        backends = self._workdir / "backends"
        shutil.copytree(self.env.python_backend, backends / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(self.env.stub, backends / "python" / self.env.stub.name)
        models = self._workdir / "models"
        self._stage(models)
        environ = {
            **os.environ,
            "LD_LIBRARY_PATH": self.env.library_path,
            # The stub runs model.py with the first python on PATH: the serving venv's.
            "PATH": f"{self.env.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(self.env.root),
        }
        command = [
            str(self.env.tritonserver),
            f"--model-repository={models}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        ]
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            # Its own process group: Ctrl-C in a terminal reaches us, and we stop it in order.
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - started
        return self

    def _stage(self, target: Path) -> None:
        """Link the files of the models this server can run into `target`, a repository
        of symlinks. The server sees only those (one it cannot run would make it refuse
        to start), and what loading writes (model.py's __pycache__) stays out of the
        user's repository."""
        for model in self.models.loaded:
            for path in sorted((self.repo / model).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    link = target / path.relative_to(self.repo)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(path)

    def _wait_ready(self, started: float) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self.process.poll()
            if code is not None:
                raise UserError(f"tritonserver exited with status {code} before it was ready: {self.log_reason()}")
            with contextlib.suppress(OSError):  # refused while starting, 400 while loading
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            if time.perf_counter() - started > self.timeout_s:
                raise UserError(f"tritonserver was not ready after {self.timeout_s:g} s: {self.log_reason()}")
            time.sleep(0.1)

    def healthy(self) -> bool:
        """True while the process runs and reports ready."""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def log_reason(self) -> str:
        """The most telling line of the server's log, without Triton's prefix: which model
        failed to load and why, else the first error about a failure, else its fatal
        `error:` line, else the first error, else the last line. Triton escapes a
        traceback into one line as literal \\n: cut there."""
        text = self.log_path.read_text(errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        # Every start on a machine without a GPU logs this error, which never matters here.
        errors = [
            LOG_PREFIX.sub("", line).lstrip('"')
            for line in lines
            if LOG_PREFIX.match(line) and line[0] == "E" and "CudaDriverHelper" not in line
        ]
        candidates = (
            [line for line in errors if line.startswith("failed to load '")]  # names the model
            + [line for line in errors if "fail" in line.lower()]
            + [line for line in lines if line.startswith("error:")]
            + errors
            + lines[-1:]
        )
        reason = candidates[0] if candidates else "(its log is empty)"
        # The server saw the staged links: name the user's files instead.
        reason = reason.replace(str(self._workdir / "models"), str(self.repo))
        return reason.split("\\n")[0].strip('"; ')[:400]

    def cleanup(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)


def serve(
    repo: str | os.PathLike,
    triton_env: str | os.PathLike | None = None,
    *,
    http_port: int = 8000,
    grpc_port: int = 8001,
    timeout_s: float = START_TIMEOUT_S,
    on_ready=lambda server: None,
) -> int:
    """Serve `repo` until the server exits, Ctrl-C or SIGTERM (which stop it); the server's exit status.

    `on_ready(server)` is called once it is ready (the CLI prints the endpoints there).
    """

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (a supervisor, `kill`) stops the server as Ctrl-C does, instead of orphaning it.
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with TritonServer(repo, find_env(triton_env), http_port, grpc_port, timeout_s) as server:
            on_ready(server)
            code = server.process.wait()
            if code:
                raise UserError(f"tritonserver exited with status {code}: {server.log_reason()}")
            return code
    finally:
        signal.signal(signal.SIGTERM, previous)
