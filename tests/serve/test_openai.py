"""serve.openai: `bsbr-export serve-openai` driven by the official `openai` client, as its
users drive it: what it returns (streamed or not) is what `runtime.generate` generates
alone; errors come in OpenAI's shape; limits refuse without disturbing other requests."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request

import openai
import pytest

from bsbr_export.runtime.generate import load_generator
from bsbr_export.serve.openai import OpenAIServerProcess

PROMPTS = ["def main(", "import ", "class Parser:\n    def ", "    for i in range(", "x"]


@pytest.fixture(scope="module")
def server(stdlib_streaming_export):
    with OpenAIServerProcess(stdlib_streaming_export, options=["--threads", "1"]) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def alone(stdlib_streaming_export):
    return load_generator(stdlib_streaming_export, threads=1)


def post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server.url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_lists_the_one_served(client):
    assert [m.id for m in client.models.list().data] == ["bsbr-stdlib"]
    assert client.models.retrieve("bsbr-stdlib").owned_by == "bsbr-export"


def test_greedy_completion_is_what_generate_makes_alone(client, alone):
    for prompt in PROMPTS[:3]:
        completion = client.completions.create(model="bsbr-stdlib", prompt=prompt, max_tokens=24, temperature=0)
        expected = alone.generate(prompt, 24)
        assert completion.choices[0].text == expected.text
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.prompt_tokens == len(expected.prompt)
        assert completion.usage.completion_tokens == 24 and completion.usage.total_tokens == len(expected.prompt) + 24


def test_a_prompt_as_token_ids_and_echo(client, alone):
    ids = list(b"import os\n")
    completion = client.completions.create(model="bsbr-stdlib", prompt=ids, max_tokens=10, temperature=0)
    assert completion.choices[0].text == alone.generate(ids, 10).text
    echoed = client.completions.create(model="bsbr-stdlib", prompt="import ", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "import " + alone.generate("import ", 5).text


def test_streamed_chunks_join_to_the_same_text_then_usage_and_done(client, alone):
    stream = client.completions.create(
        model="bsbr-stdlib",
        prompt=PROMPTS[1],
        max_tokens=30,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)  # the client reads up to data: [DONE]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == alone.generate(PROMPTS[1], 30, temperature=0.8, top_p=0.9, seed=7).text
    assert len([c for c in chunks if c.choices]) > 5  # streamed as made, not at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_a_stop_string_ends_it_and_is_left_out_streamed_or_not(client, alone):
    free = alone.generate(PROMPTS[0], 40).text
    assert "\n" in free
    expected = free[: free.index("\n")]
    completion = client.completions.create(
        model="bsbr-stdlib", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop="\n"
    )
    assert completion.choices[0].text == expected and completion.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model="bsbr-stdlib", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=["\n", "zzz"], stream=True
    )
    chunks = [c.choices[0] for c in stream]
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def test_concurrent_streams_each_equal_generating_alone(client, alone):
    """Five clients at once (the server batches them in flight, prompts joining mid-run)."""
    results = {}

    def run(i: int, prompt: str) -> None:
        stream = client.completions.create(
            model="bsbr-stdlib", prompt=prompt, max_tokens=40 + 7 * i, temperature=0.7, seed=i, stream=True
        )
        results[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == alone.generate(prompt, 40 + 7 * i, temperature=0.7, seed=i).text


def test_chat_needs_a_chat_template(client):
    with pytest.raises(openai.BadRequestError, match="has no chat template"):
        client.chat.completions.create(model="bsbr-stdlib", messages=[{"role": "user", "content": "hi"}])


def test_chat_renders_the_exports_template(stdlib_streaming_export, tmp_path, alone):
    export = tmp_path / "with-template"
    shutil.copytree(stdlib_streaming_export, export)
    (export / "chat_template.jinja").write_text(
        "{% for m in messages %}# {{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}# assistant:{% endif %}"
    )
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "print hello"}]
    prompt = "# system: be brief\n# user: print hello\n# assistant:"
    with OpenAIServerProcess(export, options=["--threads", "1", "--model-name", "chatty"]) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="chatty", messages=messages, max_tokens=20, temperature=0)
        stream = client.chat.completions.create(
            model="chatty", messages=messages, max_tokens=20, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream)
    expected = alone.generate(prompt, 20).text
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == expected
    assert streamed == expected


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"model": "nope", "prompt": "x"}, 404, "the model 'nope' does not exist here"),
        ({"model": "bsbr-stdlib", "prompt": "x", "n": 2}, 400, "n is not supported"),
        ({"model": "bsbr-stdlib", "prompt": "x", "logprobs": 3}, 400, "logprobs is not supported"),
        ({"model": "bsbr-stdlib", "prompt": [1, 300]}, 400, "token id 300 is out of range"),
        ({"model": "bsbr-stdlib", "prompt": ""}, 400, "the prompt is empty"),
        ({"model": "bsbr-stdlib", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "bsbr-stdlib", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens must be at most"),
        ({"model": "bsbr-stdlib", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "bsbr-stdlib"}, 400, "prompt"),
        ({"model": "bsbr-stdlib", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ],
)
def test_bad_requests_get_openais_error_shape(server, body, status, message):
    code, answer = post(server, "/v1/completions", body)
    assert code == status
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert message in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


def test_limits_refuse_a_request_and_serve_the_next(stdlib_streaming_export, alone):
    options = ["--threads", "1", "--max-prompt-tokens", "16", "--max-sequences", "1"]
    with OpenAIServerProcess(stdlib_streaming_export, options=options) as server:
        code, answer = post(server, "/v1/completions", {"model": "bsbr-stdlib", "prompt": "x" * 17})
        assert code == 400 and "over this model's max_prompt_tokens (16)" in answer["error"]["message"]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        running = client.completions.create(
            model="bsbr-stdlib", prompt="def ", max_tokens=400, temperature=0, stream=True
        )
        next(iter(running))  # one generation open: the second is refused with 429 until it ends
        with pytest.raises(openai.RateLimitError, match="max_sequences: retry when one ends"):
            client.completions.create(model="bsbr-stdlib", prompt="import ", max_tokens=5)
        rest = "".join(c.choices[0].text for c in running)
        assert rest
        later = client.completions.create(model="bsbr-stdlib", prompt="import ", max_tokens=5, temperature=0)
        assert later.choices[0].text == alone.generate("import ", 5).text
