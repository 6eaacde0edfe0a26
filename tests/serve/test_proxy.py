"""serve.proxy: two `serve-openai` servers behind Debian's nginx, driven by the official
`openai` client. least_conn spreads concurrent streams over both; when one server is
killed mid-run its streams end with a connection error, the other's finish intact, and new
requests go to the survivor."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import openai
import pytest

from bsbr_export.errors import UserError
from bsbr_export.runtime.generate import load_generator
from bsbr_export.serve.openai import OpenAIServerProcess
from bsbr_export.serve.proxy import NginxProxy, find_nginx, nginx_config

PROMPTS = ["def main(", "import ", "class Parser:\n    def ", "    for i in range(", "x = ", "# a comment\n"]
# 300 tokens take under a second here: long enough streams that all are still running when
# the kill lands, however slow the machine is that moment.
MAX_TOKENS = 1000


@pytest.fixture(scope="module")
def nginx() -> str:
    try:
        return find_nginx()
    except UserError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the proxy tests: {exc}")
        pytest.skip(str(exc))


def test_config_spreads_by_least_conn_unbuffered_and_nginx_accepts_it(nginx, tmp_path):
    upstreams = ["127.0.0.1:8101", "127.0.0.1:8102"]
    config = nginx_config(upstreams, 8100, tmp_path)
    lines = [line.strip() for line in config.splitlines()]
    assert "least_conn;" in lines
    assert [line for line in lines if line.startswith("server 127")] == [
        f"server {upstream} max_fails=1 fail_timeout=10s;" for upstream in upstreams
    ]
    assert [line for line in lines if line.startswith("listen")] == ["listen 127.0.0.1:8100;"]
    assert {"proxy_buffering off;", "proxy_cache off;", "proxy_next_upstream error timeout;"} <= set(lines)
    assert "daemon" not in config  # given on the command line, where a second one is an error
    (tmp_path / "nginx.conf").write_text(config)
    check = [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")]
    done = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "syntax is ok" in done.stderr, done.stderr


def test_a_killed_server_fails_its_streams_and_the_survivor_takes_the_rest(nginx, stdlib_streaming_export):
    options = ["--threads", "1"]
    with (
        OpenAIServerProcess(stdlib_streaming_export, options=options) as doomed,
        OpenAIServerProcess(stdlib_streaming_export, options=options) as survivor,
        NginxProxy([f"127.0.0.1:{doomed.port}", f"127.0.0.1:{survivor.port}"]) as proxy,
    ):
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=120)
        started = [threading.Event() for _ in PROMPTS]
        chunks: dict[int, list] = {i: [] for i in range(len(PROMPTS))}
        errors: dict[int, BaseException] = {}
        finished: set[int] = set()

        def run(i: int) -> None:
            try:
                stream = client.completions.create(
                    model="bsbr-stdlib", prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0, stream=True
                )
                for chunk in stream:
                    chunks[i].append(chunk.choices[0])
                    started[i].set()
                finished.add(i)
            except Exception as exc:
                errors[i] = exc
            finally:
                started[i].set()  # a stream that failed before its first chunk must not hold the test up

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(PROMPTS))]
        for thread in threads:
            thread.start()
        assert all(event.wait(120) for event in started), "a stream sent no first chunk within 120 s"
        assert not errors and not finished, (errors, finished)  # all six running: the kill lands mid-run
        doomed.stop(signal.SIGKILL)
        for thread in threads:
            thread.join(120)
        assert not [thread for thread in threads if thread.is_alive()], "a stream neither ended nor failed"

        # least_conn: six streams open at once, three on each server.
        assert len(errors) == 3 and len(finished) == 3, (errors, finished)
        for i, exc in errors.items():
            # nginx relays what it had, then closes the client's connection without the last
            # chunk of the chunked body: the client's HTTP library (httpx, or httpx2 in
            # openai 3) reports the cut, openai wraps it.
            assert type(exc) is openai.APIConnectionError, repr(exc)
            assert type(exc.__cause__).__name__ == "RemoteProtocolError", repr(exc.__cause__)
            assert "peer closed connection without sending complete message body (incomplete chunked read)" in str(
                exc.__cause__
            )
            assert chunks[i] and all(choice.finish_reason is None for choice in chunks[i])
            assert len(chunks[i]) < MAX_TOKENS
        assert survivor.process.poll() is None

        # After the kill: the first request finds the dead server refusing, nginx marks it
        # down and sends the request (not sent yet) to the survivor; later ones go there.
        later = [
            client.completions.create(model="bsbr-stdlib", prompt=prompt, max_tokens=20, temperature=0)
            for prompt in PROMPTS[:3]
        ]
        log = (proxy.prefix / "error.log").read_text()
        assert log.count("upstream prematurely closed connection") == 3, log

    alone = load_generator(stdlib_streaming_export, threads=1)
    for i in finished:
        assert [choice.finish_reason for choice in chunks[i]][-1] == "length"
        assert "".join(choice.text for choice in chunks[i]) == alone.generate(PROMPTS[i], MAX_TOKENS).text
    for prompt, completion in zip(PROMPTS[:3], later, strict=True):
        assert completion.choices[0].finish_reason == "length"
        assert completion.choices[0].text == alone.generate(prompt, 20).text


def test_a_proxy_that_cannot_listen_says_why(nginx):
    with NginxProxy(["127.0.0.1:9"]) as first:
        second = NginxProxy(["127.0.0.1:9"])
        second.port = first.port  # taken since check_port chose it
        try:
            with pytest.raises(UserError, match="nginx exited with status 1: .*Address already in use"):
                second.start()
        finally:
            second.stop()  # had it started, it would take the port over once the first one ends
        assert not second.prefix.exists()
    assert first.process.returncode == 0 and not first.prefix.exists()
