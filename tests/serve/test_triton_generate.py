"""The generate model on a real tritonserver: a prompt in, tokens streamed back as they
are made (Triton's generate extension over HTTP with curl, gRPC streaming with
tritonclient), every generation equal to `runtime.generate` alone while many run at once;
bad requests fail alone, limits answer with errors, cancelled clients free their slots,
and the step model's memory comes back after 10,000 sequences."""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import print_uncaptured, prompt_of
from tritonclient.utils import InferenceServerException

from bsbr_export.runtime.generate import load_generator
from bsbr_export.serve.serve import TritonServer
from bsbr_export.serve.triton import write_triton_repo

GENERATE, STEP = "bsbr-tiny_generate", "bsbr-tiny_streaming_python"
VOCAB = 97  # bsbr-tiny


@pytest.fixture(scope="module")
def alone(tiny_export):
    out, _ = tiny_export
    return load_generator(out)


def curl_stream(server, body: dict, endpoint: str = "generate_stream") -> list[dict]:
    """POST `body` to the model's generate extension with curl; the server-sent events."""
    done = subprocess.run(
        [
            "curl",
            "-sN",
            "--max-time",
            "60",
            "-d",
            json.dumps(body),
            f"http://{server.http_url}/v2/models/{GENERATE}/{endpoint}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    if endpoint == "generate":
        return [json.loads(done.stdout)]
    return [json.loads(line.removeprefix("data: ")) for line in done.stdout.splitlines() if line.startswith("data: ")]


def tensor(name: str, values, dtype) -> grpcclient.InferInput:
    array = np.array(values, dtype=dtype)
    value = grpcclient.InferInput(
        name, list(array.shape), {np.int64: "INT64", np.int32: "INT32", np.bool_: "BOOL", np.object_: "BYTES"}[dtype]
    )
    value.set_data_from_numpy(array)
    return value


def grpc_inputs(ids: list[int], max_tokens: int, **sampling) -> list[grpcclient.InferInput]:
    inputs = [tensor("input_ids", ids, np.int64), tensor("max_tokens", [max_tokens], np.int32)]
    if sampling:
        inputs.append(tensor("sampling_parameters", [json.dumps(sampling).encode()], np.object_))
    return inputs


def grpc_generate(
    server, inputs, cancel_after: int | None = None, cancel_when: threading.Event | None = None
) -> tuple[list[int], bool, list[float]]:
    """One generation over a gRPC stream: (its token ids, whether the last response was
    flagged final, the seconds at which each arrived). With `cancel_after`, the stream is
    cancelled once that many tokens came (and `cancel_when` is set)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    start = time.perf_counter()
    client.async_stream_infer(GENERATE, inputs)
    ids, final, times = [], False, []
    try:
        while not final:
            result, error = responses.get(timeout=60)
            if error is not None:
                raise error
            ids += result.as_numpy("output_ids").tolist()
            times.append(time.perf_counter() - start)
            final = result.get_response().parameters["triton_final_response"].bool_param
            if cancel_after is not None and len(ids) >= cancel_after and (cancel_when is None or cancel_when.is_set()):
                break
    finally:
        client.stop_stream(cancel_requests=cancel_after is not None)
        client.close()
    return ids, final, times


# ---- what comes back ------------------------------------------------------------------


def test_generate_stream_with_curl_streams_what_generation_alone_makes(triton_server, alone):
    """The issue's own command: curl -N .../generate_stream with a prompt and max_tokens:
    one event per token, the tokens greedy generation makes alone."""
    prompt = prompt_of(13, VOCAB)
    events = curl_stream(triton_server, {"input_ids": prompt, "max_tokens": 24})
    assert len(events) == 24 and all("error" not in e for e in events)
    assert [e["output_ids"] for e in events] == alone.generate(prompt, 24).ids


def test_not_streamed_is_one_response_with_every_token(triton_server, alone):
    prompt = prompt_of(30, VOCAB)
    (event,) = curl_stream(triton_server, {"input_ids": prompt, "max_tokens": 9, "stream": False}, "generate")
    assert event["output_ids"] == alone.generate(prompt, 9).ids


def test_sampling_parameters_as_vllm_sends_them(triton_server, alone):
    """temperature, top_k, top_p and seed in the JSON of sampling_parameters draw what
    the same options draw alone; max_tokens may come in it too; stop_token_ids stop."""
    prompt = prompt_of(17, VOCAB)
    options = {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 11}
    ids, final, _ = grpc_generate(triton_server, grpc_inputs(prompt, 30, **options))
    assert final and ids == alone.generate(prompt, 30, **options).ids
    events = curl_stream(
        triton_server, {"input_ids": prompt, "sampling_parameters": json.dumps({**options, "max_tokens": 12})}
    )
    assert [e["output_ids"] for e in events] == alone.generate(prompt, 12, **options).ids
    free = alone.generate(prompt, 30).ids
    events = curl_stream(
        triton_server,
        {"input_ids": prompt, "max_tokens": 30, "sampling_parameters": json.dumps({"stop_token_ids": [free[6]]})},
    )
    assert [e["output_ids"] for e in events] == free[: free.index(free[6]) + 1]


def test_concurrent_generations_each_equal_alone(triton_server, alone, request):
    """16 gRPC streams at once, prompts of 1 to 301 tokens (c = 8), 10 to 60 new tokens,
    half of them sampled: they join and leave the running batch at different steps, and
    each gets exactly what it gets alone, its last response flagged final."""
    plans = [
        (prompt_of(n, VOCAB), 10 + 3 * i, {"temperature": 0.8, "seed": i} if i % 2 else {})
        for i, n in enumerate([1, 7, 8, 9, 13, 16, 23, 30, 41, 64, 65, 99, 128, 150, 222, 301])
    ]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(plans)) as pool:
        results = list(
            pool.map(lambda plan: grpc_generate(triton_server, grpc_inputs(plan[0], plan[1], **plan[2])), plans)
        )
    seconds = time.perf_counter() - start
    for (prompt, n, options), (ids, final, _) in zip(plans, results):
        assert final and ids == alone.generate(prompt, n, **options).ids
    tokens = sum(len(ids) for ids, _, _ in results)
    print_uncaptured(request, f"generate: {len(plans)} streams, {tokens} tokens in {seconds:.2f}s")


def test_text_in_text_out_as_vllm_clients_send_it(triton_env, stdlib_streaming_export, tmp_path):
    """bsbr-stdlib (byte-level) behind its own server: text_input in, text_output pieces
    out that make up what generation alone makes (a multi-byte character whole, with its
    last byte); not streamed, the prompt comes first unless exclude_input_in_output; stop
    strings end it."""
    repo = write_triton_repo(stdlib_streaming_export, tmp_path / "models")
    alone = load_generator(stdlib_streaming_export)
    prompt, options = "def grüße(", {"temperature": 0.9, "seed": 1}
    expected = alone.generate(prompt, 40, **options)
    pieces = [t.text for t in alone.generate(prompt, 40, stream=True, **options)]
    with TritonServer(repo, triton_env, http_port=0, grpc_port=0) as server:

        def generate(body: dict, endpoint: str = "generate_stream") -> list[dict]:
            done = subprocess.run(
                [
                    "curl",
                    "-sN",
                    "--max-time",
                    "60",
                    "-d",
                    json.dumps(body),
                    f"http://{server.http_url}/v2/models/bsbr-stdlib_generate/{endpoint}",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            lines = [line.removeprefix("data: ") for line in done.stdout.splitlines() if line.strip()]
            return [json.loads(line) for line in lines]

        body = {"text_input": prompt, "max_tokens": 40, "sampling_parameters": json.dumps(options)}
        events = generate(body)
        assert [e["output_ids"] for e in events] == expected.ids
        assert [e["text_output"] for e in events] == pieces
        (whole,) = generate({**body, "stream": False}, "generate")
        assert whole["text_output"] == prompt + expected.text
        (whole,) = generate({**body, "stream": False, "exclude_input_in_output": True}, "generate")
        assert whole["text_output"] == expected.text
        stop = "".join(pieces)[10]
        events = generate({**body, "sampling_parameters": json.dumps({**options, "stop": [stop]})})
        text = "".join(e["text_output"] for e in events)
        assert text.endswith(stop) and stop not in text[:-1]


# ---- bad requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input_ids": [1, 97, 3], "max_tokens": 4}, "token id 97 is out of range"),
        ({"input_ids": [], "max_tokens": 4}, "the prompt is empty"),
        ({"input_ids": [1], "max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"input_ids": [1], "sampling_parameters": "{temperature"}, "sampling_parameters is not JSON"),
        ({"input_ids": [1], "sampling_parameters": '{"temprature": 1}'}, "unknown sampling parameter 'temprature'"),
        ({"input_ids": [1], "sampling_parameters": '{"temperature": -1}'}, "temperature must be a number >= 0"),
        ({"input_ids": [1], "text_input": "a"}, "as text_input or as input_ids"),
        ({"max_tokens": 3}, "as text_input or as input_ids"),
        ({"text_input": "def main("}, "this model has no tokenizer: send the prompt as input_ids"),
    ],
)
def test_a_bad_request_fails_alone(triton_server, alone, body, message):
    """Each bad request gets one error event naming what is wrong, while a good generation
    running at the same time is served in full; the server stays up."""
    prompt = prompt_of(20, VOCAB)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        good = pool.submit(grpc_generate, triton_server, grpc_inputs(prompt, 40))
        events = curl_stream(triton_server, body)
        ids, final, _ = good.result(timeout=60)
    assert len(events) == 1 and message in events[0]["error"]
    assert final and ids == alone.generate(prompt, 40).ids
    assert triton_server.healthy()


# ---- limits, cancellation, memory, restarts ---------------------------------------------


@pytest.fixture(scope="module")
def small_server(triton_env, tiny_export, tmp_path_factory):
    """A second server whose models hold at most 2 sequences and take prompts of at most 64 tokens."""
    out, _ = tiny_export
    repo = write_triton_repo(out, tmp_path_factory.mktemp("limited") / "models", max_sequences=2, max_prompt_tokens=64)
    with TritonServer(repo, triton_env, http_port=0, grpc_port=0) as server:
        yield server


def test_limits_answer_with_errors_and_cancelled_clients_free_their_slots(small_server, alone):
    """Two long generations fill the model; a third is refused with the limit named; both
    clients cancel mid-stream, which frees their slots: two new generations then run to
    the end. A prompt over max_prompt_tokens is refused."""
    long, refused = grpc_inputs(prompt_of(5, VOCAB), 1_000_000), threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(grpc_generate, small_server, long, 50, refused) for _ in range(2)]
        time.sleep(1.0)  # both are streaming by now
        try:
            with pytest.raises(InferenceServerException, match="2 sequences are open, this model's max_sequences"):
                grpc_generate(small_server, grpc_inputs([1, 2], 5))
        finally:
            refused.set()
        for future in running:
            ids, final, _ = future.result(timeout=60)
            assert len(ids) >= 50 and not final  # cancelled mid-generation
    deadline = time.monotonic() + 10  # the model sees a cancellation at its next step
    while True:
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                results = list(pool.map(lambda _: grpc_generate(small_server, grpc_inputs([3, 4], 20)), range(2)))
            break
        except InferenceServerException:
            assert time.monotonic() < deadline, "cancelled generations kept their slots"
            time.sleep(0.2)
    assert all(final and ids == alone.generate([3, 4], 20).ids for ids, final, _ in results)
    events = curl_stream(small_server, {"input_ids": prompt_of(65, VOCAB), "max_tokens": 2})
    assert "the prompt has 65 tokens, over this model's max_prompt_tokens (64)" in events[0]["error"]
    assert small_server.healthy()


def test_step_model_refuses_past_max_sequences(small_server):
    client = grpcclient.InferenceServerClient(small_server.grpc_url)

    def step(sequence, start=False, end=False):
        return client.infer(
            STEP,
            [tensor("input_ids", [[1, 2]], np.int64)],
            sequence_id=sequence,
            sequence_start=start,
            sequence_end=end,
        )

    step(11, start=True)
    step(12, start=True)
    with pytest.raises(InferenceServerException, match="2 sequences are open"):
        step(13, start=True)
    step(11, end=True)
    step(13, start=True, end=True)  # a slot came free
    step(12, end=True)


def test_state_memory_bound_answers_with_an_error(triton_env, tiny_export, tmp_path):
    """max_state_bytes: a sequence whose state would take the model past it is refused
    with the figures, and fits once another one ends (bsbr-tiny: 5632 bytes per sequence
    plus 2304 per finished 8-token chunk)."""
    out, _ = tiny_export
    repo = write_triton_repo(out, tmp_path / "models", max_state_bytes=12_000)
    with TritonServer(repo, triton_env, http_port=0, grpc_port=0) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)

        def step(sequence, ids, start=False, end=False):
            return client.infer(
                STEP,
                [tensor("input_ids", [ids], np.int64)],
                sequence_id=sequence,
                sequence_start=start,
                sequence_end=end,
            )

        step(21, list(range(20)), start=True)  # 2 finished chunks: 10240 bytes
        with pytest.raises(
            InferenceServerException,
            match="the open sequences hold 10240 state bytes; this one "
            "needs 5632 more, over this model's max_state_bytes",
        ):
            step(22, [1, 2, 3], start=True)
        step(21, [5], end=True)
        step(22, [1, 2, 3], start=True, end=True)
        assert server.healthy()


def _stub_rss(server, model: str) -> int:
    """Resident bytes of the Python-backend stub process that runs `model`."""
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = status.read_bytes().split(b"\0")
        except OSError:
            continue
        if command and command[0].endswith(b"triton_python_backend_stub") and f"/{model}/".encode() in command[1]:
            fields = dict(line.split(":", 1) for line in (status.parent / "status").read_text().splitlines())
            return int(fields["VmRSS"].split()[0]) * 1024
    raise AssertionError(f"no stub process runs {model}")


def test_memory_is_back_after_ten_thousand_sequences(triton_server, request):
    """10,000 short sequences (a prompt of 1-20 tokens, two more tokens, END) on the step
    model, 4 clients at a time: the stub's resident memory after them is where it was after
    the first 500 (within 8 MiB: allocator noise), so no sequence leaves state behind."""
    rng = np.random.default_rng(5)

    def run(first: int, count: int) -> None:
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        for sequence in range(first, first + count):
            prompt = rng.integers(0, VOCAB, (1, int(rng.integers(1, 21))))
            for i, ids in enumerate([prompt, [[5]], [[7]]]):
                client.infer(
                    STEP,
                    [tensor("input_ids", ids, np.int64)],
                    sequence_id=sequence,
                    sequence_start=i == 0,
                    sequence_end=i == 2,
                )
        client.close()

    def wave(first: int, total: int) -> None:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda k: run(first + k * total // 4, total // 4), range(4)))

    start = time.perf_counter()
    wave(10_000, 500)
    before = _stub_rss(triton_server, STEP)
    wave(20_000, 9_500)
    after = _stub_rss(triton_server, STEP)
    print_uncaptured(
        request,
        f"10,000 sequences in {time.perf_counter() - start:.1f}s: step model "
        f"{before / 2**20:.1f} MiB after 500, {after / 2**20:.1f} MiB after 10,000",
    )
    assert after - before <= 8 * 2**20
    assert triton_server.healthy()


def test_a_killed_server_restarted_refuses_old_sequences(triton_env, triton_repo):
    """SIGKILL takes the server and its states; started again on the same repository, it
    answers a continuation of an old sequence with an error, never with logits computed
    from a fresh state."""
    client_of = lambda server: grpcclient.InferenceServerClient(server.grpc_url)  # noqa: E731
    first = TritonServer(triton_repo, triton_env, http_port=0, grpc_port=0).start()
    try:
        client_of(first).infer(STEP, [tensor("input_ids", [[1, 2, 3]], np.int64)], sequence_id=77, sequence_start=True)
        os.killpg(first.pid, signal.SIGKILL)
        first.process.wait(10)
    finally:
        first.stop()
    with TritonServer(triton_repo, triton_env, http_port=0, grpc_port=0) as again:
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            client_of(again).infer(STEP, [tensor("input_ids", [[4]], np.int64)], sequence_id=77)
        assert again.healthy()
