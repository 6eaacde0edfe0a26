"""samples/triton_client: generate.py (tritonclient + numpy) against a real tritonserver
generates exactly the ids greedy decoding with the full eager model does, over HTTP and
gRPC, frees its sequence on the server, and reports bad input in one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import eager_greedy, prompt_of

from bsbr_export.model.checkpoint import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "samples" / "triton_client" / "generate.py"
MODEL = "bsbr-tiny_streaming_python"
NEW_TOKENS = 20  # with c = 8: crosses chunk boundaries after any of the prompts below


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("length", [1, 8, 13])
def test_matches_eager_greedy(triton_server, tiny_export, tmp_path, protocol, length):
    out, _ = tiny_export
    model = load_model(out)
    prompt = prompt_of(length, model.config.vocab_size)
    done = run(
        MODEL,
        *prompt,
        "--protocol",
        protocol,
        "--url",
        url(triton_server, protocol),
        "--max-new-tokens",
        NEW_TOKENS,
        "--out",
        tmp_path / "out.json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    expected = eager_greedy(model, prompt, NEW_TOKENS)
    assert result["prompt"] == prompt and result["generated"] == expected
    assert len(result["token_ms"]) == NEW_TOKENS - 1  # one request per token after the prompt's
    assert done.stdout.splitlines()[0].split() == [str(t) for t in expected]  # streamed as they came


def test_last_request_ends_the_sequence(triton_server, tiny_export, tmp_path):
    """The request whose answer gives the last token ends the sequence (with one new
    token: the prompt's own), so the server no longer knows its id afterwards."""
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    out, _ = tiny_export
    model = load_model(out)
    for new_tokens, sequence in ((1, 42), (4, 43)):
        done = run(
            MODEL,
            5,
            6,
            7,
            "--url",
            triton_server.http_url,
            "--max-new-tokens",
            new_tokens,
            "--sequence-id",
            sequence,
            "--out",
            tmp_path / "out.json",
        )
        assert done.returncode == 0, done.stderr
        result = json.loads((tmp_path / "out.json").read_text())
        assert result["generated"] == eager_greedy(model, [5, 6, 7], new_tokens)
        ids = httpclient.InferInput("input_ids", [1, 1], "INT64")
        ids.set_data_from_numpy(np.array([[1]], dtype=np.int64))
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            httpclient.InferenceServerClient(triton_server.http_url).infer(MODEL, [ids], sequence_id=sequence)


@pytest.mark.parametrize(
    "args, message",
    [
        ([MODEL, "1", "97"], "refused the request: token ids must be in [0, 97)"),  # bsbr-tiny's vocabulary
        ([MODEL], "no prompt"),
        ([MODEL, "1", "x"], "token id 'x' is not a non-negative integer"),
        (["no-such-model", "1"], "model no-such-model is not ready"),
        ([MODEL, "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(triton_server, args, message):
    done = run(*args, "--url", triton_server.http_url)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert triton_server.healthy()


def test_no_server_is_one_line_and_exit_2(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        done = run(MODEL, "1", "--protocol", "grpc", "--url", f"127.0.0.1:{sock.getsockname()[1]}")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "cannot reach Triton at" in done.stderr, done.stderr
