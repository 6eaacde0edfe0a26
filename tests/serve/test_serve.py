"""bsbr-export serve: a real tritonserver (the nvidia-pytriton wheel's, Python backend)
serves the --triton-repo twins like eager PyTorch, keeps many sequences apart, holds up
under a bounded load, and refuses bad input without going down."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import venv

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import print_uncaptured, run_cli
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from bsbr_export.compare.cases import stream_pieces
from bsbr_export.errors import UserError
from bsbr_export.manifest import read_manifest
from bsbr_export.model.checkpoint import load_model
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.eager import EagerRunner
from bsbr_export.runtime.onnx import OnnxRunner
from bsbr_export.serve.serve import TritonServer
from bsbr_export.serve.triton import write_triton_repo

TOLERANCE = 1e-4  # max abs error of served logits against eager
CLIENTS = {"http": httpclient, "grpc": grpcclient}
FULL, STREAMING, GENERATE = "bsbr-tiny_python", "bsbr-tiny_streaming_python", "bsbr-tiny_generate"


@pytest.fixture(scope="module")
def model(tiny_export):
    out, _ = tiny_export
    return load_model(out)


def connect(server, protocol: str):
    url = server.http_url if protocol == "http" else server.grpc_url
    return CLIENTS[protocol].InferenceServerClient(url)


def tensor(protocol: str, name: str, array: np.ndarray):
    value = CLIENTS[protocol].InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    value.set_data_from_numpy(array)
    return value


def eager_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids) if mask is None else mask}
    return EagerRunner(model).infer(feeds)["logits"]


def step(client, protocol: str, sequence: int, ids: np.ndarray, start: bool = False, end: bool = False):
    """One request of a sequence on the streaming model: (logits, open_sequences)."""
    result = client.infer(
        STREAMING, [tensor(protocol, "input_ids", ids)], sequence_id=sequence, sequence_start=start, sequence_end=end
    )
    return result.as_numpy("logits"), int(result.as_numpy("open_sequences").reshape(-1)[0])


def stream_sequence(client, protocol: str, sequence: int, ids: np.ndarray, pieces: list[int]) -> np.ndarray:
    """Feed `ids` [1, L] in `pieces` as one sequence; its logits, concatenated."""
    logits, start = [], 0
    for i, size in enumerate(pieces):
        out, _ = step(client, protocol, sequence, ids[:, start : start + size], start=i == 0, end=i == len(pieces) - 1)
        logits.append(out)
        start += size
    return np.concatenate(logits, axis=1)


# ---- the full-sequence model --------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("batch, length", [(1, 1), (3, 7), (2, 9), (1, 29), (4, 61)])  # c = 8
def test_full_sequence_matches_eager(triton_server, model, protocol, batch, length):
    ids = np.random.default_rng(100 * batch + length).integers(0, model.config.vocab_size, (batch, length))
    mask = np.ones_like(ids)
    if batch > 1:  # a right-padded row in every batch > 1
        mask[-1, length // 2 + 1 :] = 0
    client = connect(triton_server, protocol)
    result = client.infer(FULL, [tensor(protocol, "input_ids", ids), tensor(protocol, "attention_mask", mask)])
    logits = result.as_numpy("logits")
    expected = eager_logits(model, ids, mask)
    assert logits.dtype == np.float32 and logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= TOLERANCE


# ---- the streaming model ------------------------------------------------------------


def test_interleaved_sequences_each_equal_their_full_forward(triton_server, model):
    """Four sequences fed piece by piece in round robin, on one connection: every one's
    logits equal its own full eager forward (the server keeps their states apart)."""
    rng = np.random.default_rng(1)
    lengths = {101: 29, 102: 17, 103: 41, 104: 1}
    ids = {s: rng.integers(0, model.config.vocab_size, (1, n)) for s, n in lengths.items()}
    pieces = {s: stream_pieces(n, model.config.chunk_size) for s, n in lengths.items()}
    client = connect(triton_server, "http")
    got, offsets = {s: [] for s in lengths}, dict.fromkeys(lengths, 0)
    for round_ in range(max(map(len, pieces.values()))):
        for s in lengths:
            if round_ < len(pieces[s]):
                size = pieces[s][round_]
                out, _ = step(
                    client,
                    "http",
                    s,
                    ids[s][:, offsets[s] : offsets[s] + size],
                    start=round_ == 0,
                    end=round_ == len(pieces[s]) - 1,
                )
                got[s].append(out)
                offsets[s] += size
    for s in lengths:
        assert np.abs(np.concatenate(got[s], axis=1) - eager_logits(model, ids[s])).max() <= TOLERANCE


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_concurrent_sequences_each_equal_their_full_forward(triton_server, model, protocol):
    """Four clients at once, token by token after a ragged prompt."""
    rng = np.random.default_rng(2)
    ids = {200 + i: rng.integers(0, model.config.vocab_size, (1, 13 + 6 * i)) for i in range(4)}

    def run(sequence: int) -> float:
        length = ids[sequence].shape[1]
        logits = stream_sequence(
            connect(triton_server, protocol), protocol, sequence, ids[sequence], [5] + [1] * (length - 5)
        )
        return float(np.abs(logits - eager_logits(model, ids[sequence])).max())

    with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
        errors = list(pool.map(run, ids))
    assert max(errors) <= TOLERANCE


def test_sequence_without_start_is_refused(triton_server):
    client = connect(triton_server, "http")
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        step(client, "http", 300, np.array([[1, 2]]))
    assert triton_server.healthy()


def test_end_frees_the_sequence_state(triton_server):
    client = connect(triton_server, "grpc")
    _, opened = step(client, "grpc", 401, np.array([[1, 2, 3]]), start=True)
    _, both = step(client, "grpc", 402, np.array([[4]]), start=True)
    assert both == opened + 1
    _, after_end = step(client, "grpc", 401, np.array([[5]]), end=True)
    assert after_end == opened  # 401's state is gone, 402's is held
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        step(client, "grpc", 401, np.array([[6]]))  # an ended sequence cannot continue
    _, last = step(client, "grpc", 402, np.array([[7]]), end=True)
    assert last == opened - 1


def test_idle_sequence_is_released(triton_env, tiny_export, tmp_path):
    """A sequence idle past the model's timeout loses its state (and Triton forgets it),
    while a busy one keeps going. One more server, with a 1 s timeout."""
    out, _ = tiny_export
    repo = write_triton_repo(out, tmp_path / "models", idle_seconds=1)
    with TritonServer(repo, triton_env, http_port=0, grpc_port=0) as server:
        client = connect(server, "http")
        _, opened = step(client, "http", 801, np.array([[1, 2, 3]]), start=True)
        assert opened == 1
        time.sleep(2.5)
        _, opened = step(client, "http", 802, np.array([[4]]), start=True)
        assert opened == 1  # 801's state was dropped
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            step(client, "http", 801, np.array([[5]]))
        assert server.healthy()


def test_a_module_without_a_row_step_streams_through_its_decode_graph(triton_env, hf_export, tmp_path):
    """A module with stream_update but no step_rows (the transformers fixture): its step
    model runs the decode graph one sequence per call (mode decode). Two sequences fed in
    uneven pieces, interleaved, each equal the full graph over the whole sequence."""
    repo = write_triton_repo(hf_export, tmp_path / "models", "lm")
    full = OnnxRunner(hf_export / "model.onnx")
    spec = ModelSpec.from_dict(read_manifest(hf_export)["spec"])
    rng = np.random.default_rng(5)
    ids = {901: rng.integers(0, spec.tokens.high, (1, 37)), 902: rng.integers(0, spec.tokens.high, (1, 20))}
    pieces = {s: stream_pieces(i.shape[1], spec.chunk_size) for s, i in ids.items()}
    got, at = {s: [] for s in ids}, dict.fromkeys(ids, 0)
    with TritonServer(repo, triton_env, http_port=0, grpc_port=0) as server:
        client = connect(server, "http")
        for round_ in range(max(map(len, pieces.values()))):
            for s in ids:
                if round_ < len(pieces[s]):
                    chunk = ids[s][:, at[s] : at[s] + pieces[s][round_]]
                    result = client.infer(
                        "lm_streaming_python",
                        [tensor("http", "input_ids", chunk)],
                        sequence_id=s,
                        sequence_start=round_ == 0,
                        sequence_end=round_ == len(pieces[s]) - 1,
                    )
                    got[s].append(result.as_numpy("logits"))
                    at[s] += chunk.shape[1]
        assert server.healthy()
    for s, sequence in ids.items():
        feeds = {name: sequence if name == spec.tokens.name else np.ones_like(sequence) for name in full.input_names}
        assert np.abs(np.concatenate(got[s], axis=1) - full.infer(feeds)["logits"]).max() <= TOLERANCE


def test_bounded_load(triton_server, model, request):
    """8 concurrent sequences x 64 one-token requests after a ragged prompt, loopback only,
    within 60 s: every response equals the eager full forward, and the server stays up."""
    sequences, tokens, deadline_s = 8, 64, 60.0
    rng = np.random.default_rng(3)
    ids = {500 + i: rng.integers(0, model.config.vocab_size, (1, 3 + i + tokens)) for i in range(sequences)}

    def run(sequence: int) -> tuple[int, float]:
        prompt = ids[sequence].shape[1] - tokens
        client = connect(triton_server, "grpc")
        logits = stream_sequence(client, "grpc", sequence, ids[sequence], [prompt] + [1] * tokens)
        return tokens + 1, float(np.abs(logits - eager_logits(model, ids[sequence])).max())

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(sequences) as pool:
        futures = [pool.submit(run, s) for s in ids]
        done, late = concurrent.futures.wait(futures, timeout=deadline_s)
    assert not late, f"{len(late)} of {sequences} sequences unfinished after {deadline_s:g} s"
    results = [f.result() for f in done]
    assert sum(n for n, _ in results) == sequences * (tokens + 1)  # every response was checked
    assert max(err for _, err in results) <= TOLERANCE
    seconds = time.perf_counter() - start
    print_uncaptured(
        request, f"load: {sequences} x {tokens} tokens in {seconds:.2f}s ({sequences * tokens / seconds:.0f} tokens/s)"
    )
    assert triton_server.healthy()
    _, opened = step(connect(triton_server, "http"), "http", 599, np.array([[1]]), start=True, end=True)
    assert opened == 0  # every sequence ended and freed its state


def test_server_writes_nothing_into_the_repository(triton_server, triton_repo):
    """The server loads links to the repository's files, so model.py's __pycache__ (and
    anything else loading writes) lands in its own directory."""
    assert triton_server.healthy()  # it has loaded both Python models by now
    assert not list(triton_repo.rglob("__pycache__"))


# ---- bad requests: a clear error to the client, and the server stays up --------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(
    "model_name, inputs, message",
    [
        (
            FULL,
            {"input_ids": np.array([[1.0, 2.0]], np.float32)},
            "data-type is 'FP32', but model 'bsbr-tiny_python' expects 'INT64'",
        ),
        (FULL, {"input_ids": np.zeros((1, 2, 3), np.int64)}, "unexpected shape"),
        (FULL, {"input_ids": np.array([[1, 2, 97]])}, r"token ids must be in \[0, 97\)"),
        (
            FULL,
            {"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.ones((1, 2), np.int64)},
            "attention_mask has shape",
        ),
        (FULL, {"input_ids": np.array([[1, 2, 3]]), "attention_mask": None}, "missing required input"),
        (STREAMING, {"input_ids": np.array([[1], [2]])}, "must specify batch-size 1"),
        (STREAMING, {"input_ids": np.array([[1, -2]])}, r"token ids must be in \[0, 97\)"),
    ],
)
def test_bad_request_is_a_client_error(triton_server, model, protocol, model_name, inputs, message):
    """Wrong dtype or shape (Triton checks them against config.pbtxt), ids outside the
    vocabulary, mismatched inputs (model.py checks them)."""
    client = connect(triton_server, protocol)
    sequence = {"sequence_id": 700, "sequence_start": True, "sequence_end": True} if model_name == STREAMING else {}
    if model_name == FULL:  # the mask is sent unless the case is about it
        inputs = {"attention_mask": np.ones((1, 2), np.int64), **inputs}
        inputs = {name: array for name, array in inputs.items() if array is not None}
    with pytest.raises(InferenceServerException, match=message):
        client.infer(model_name, [tensor(protocol, n, a) for n, a in inputs.items()], **sequence)
    assert triton_server.healthy()
    ids = np.array([[4, 5, 6]])
    result = client.infer(
        FULL, [tensor(protocol, "input_ids", ids), tensor(protocol, "attention_mask", np.ones_like(ids))]
    )
    assert np.abs(result.as_numpy("logits") - eager_logits(model, ids)).max() <= TOLERANCE


# ---- the command line ------------------------------------------------------------------


def test_serve_names_what_it_skipped_and_stops_on_ctrl_c(triton_env, triton_repo):
    """The real command: ready with endpoints printed, serving, then SIGINT (Ctrl-C) stops
    the server by its pid and exits 130."""
    http, grpc = (_free_port() for _ in range(2))
    command = [
        sys.executable,
        "-m",
        "bsbr_export.cli",
        "serve",
        str(triton_repo),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--triton-env",
        str(triton_env.root),
    ]
    # A terminal's Ctrl-C: SIGINT at its default in the child, even when this test run was
    # started in the background of a non-interactive shell (which starts it ignored, and a
    # Python started with SIGINT ignored never raises KeyboardInterrupt).
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    try:
        while not lines or lines[-1] != "Ctrl-C stops it":
            line = process.stdout.readline()
            assert line, f"serve exited early ({process.wait(10)}): {process.stderr.read()}"
            lines.append(line.strip())
        assert re.fullmatch(
            rf"tritonserver ready in [\d.]+ s \(pid \d+\): HTTP 127.0.0.1:{http}, "
            rf"gRPC 127.0.0.1:{grpc}",
            lines[0],
        )
        assert lines[1] == f"models: {GENERATE}, {FULL}, {STREAMING}"
        assert sorted(lines[2:4]) == [
            "skipped bsbr-tiny: needs the onnxruntime backend, which this server lacks",
            "skipped bsbr-tiny_streaming: needs the onnxruntime backend, which this server lacks",
        ]
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5) as response:
            assert response.status == 200
        pid = int(re.search(r"pid (\d+)", lines[0]).group(1))
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
        assert "interrupted" in process.stderr.read()
        assert not _running(pid)
    finally:
        # A failed assertion must not orphan the server: Ctrl-C first (serve stops it), and
        # the server's own process group if serve could not.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        started = re.search(r"pid (\d+)", lines[0]) if lines else None
        if started and _running(int(started.group(1))):
            os.killpg(int(started.group(1)), signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_repository_without_models(capsys, triton_env, tmp_path):
    code, _, err = run_cli(capsys, "serve", tmp_path, "--triton-env", triton_env.root)
    assert code == 2 and err.count("\n") == 1 and "holds no models (no */config.pbtxt)" in err


def test_export_dir_instead_of_repository(capsys, triton_env, tiny_export):
    out, _ = tiny_export
    code, _, err = run_cli(capsys, "serve", out, "--triton-env", triton_env.root)
    assert code == 2 and err.count("\n") == 1 and "is an export directory, not a Triton repository" in err


def test_repository_with_only_onnxruntime_models(capsys, triton_env, triton_repo, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(triton_repo / "bsbr-tiny", repo / "bsbr-tiny")
    code, _, err = run_cli(capsys, "serve", repo, "--triton-env", triton_env.root)
    assert code == 2 and err.count("\n") == 1
    assert "no model in" in err and "bsbr-tiny needs onnxruntime" in err and "re-export with --triton-repo" in err


def test_port_in_use(capsys, triton_env, triton_repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", triton_repo, "--http-port", port, "--triton-env", triton_env.root)
    assert code == 2 and err.count("\n") == 1 and f"port {port} on 127.0.0.1 is not free" in err
    assert "pass another --http-port" in err


@pytest.mark.parametrize(
    "env, message",
    [
        (None, "no Triton server: install one with"),
        ("missing", "is not a venv (no bin/python)"),
        ("bare", "has no numpy, which Triton's Python backend needs"),
        (sys.prefix, "numpy 2"),  # this venv: numpy 2, which corrupts the Python backend's tensors
    ],
)
def test_unusable_server_env(capsys, monkeypatch, triton_repo, tmp_path, env, message):
    monkeypatch.delenv("BSBR_TRITON_ENV", raising=False)
    if env == "bare":
        venv.create(tmp_path / env, with_pip=False)  # nothing installed
    args = ["--triton-env", tmp_path / env if env in ("missing", "bare") else env] if env else []
    code, _, err = run_cli(capsys, "serve", triton_repo, *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_model_that_fails_to_load_gives_the_log_reason(triton_env, triton_repo, tmp_path):
    """A server that fails to start is one line with the reason from its log (the CLI
    prints it and exits 2), and its process is gone."""
    repo = tmp_path / "models"
    shutil.copytree(triton_repo / FULL, repo / FULL)
    os.remove(repo / FULL / "1" / "model.onnx")
    server = TritonServer(repo, triton_env, http_port=0, grpc_port=0)
    with pytest.raises(UserError) as error:
        server.start()
    message = str(error.value)
    assert "\n" not in message and "tritonserver exited with status" in message and "model.onnx" in message, message
    assert not _running(server.pid)
