"""An OpenAI-compatible HTTP server over an export: `bsbr-export serve-openai EXPORT_DIR`.

    POST /v1/completions       prompt (text or token ids) -> text, streamed as server-sent events
    POST /v1/chat/completions  messages -> text, where the export carries a chat template
    GET  /v1/models            the one model served
    GET  /health               200 once the model is loaded (for a proxy's checks)

An ASGI app (FastAPI) under uvicorn, on 127.0.0.1 unless told otherwise. Every request
becomes a `runtime.requests.Request` and goes to one `runtime.serving.ServingLoop`, the
same in-flight batcher and scheduler as Triton's generate model: running generations get
a token every iteration, joining prompts are prefilled in chunk-aligned pieces within the
token budget. A request past a limit, or malformed, gets an error in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) and never reaches the loop; a client
that goes away mid-stream frees its sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field

from bsbr_export.defaults import DEFAULT_TOKEN_BUDGET
from bsbr_export.errors import Busy, UserError
from bsbr_export.model.usercode import export_name
from bsbr_export.runtime.batching import Batcher, Limits
from bsbr_export.runtime.requests import Request as Generation
from bsbr_export.runtime.requests import Token
from bsbr_export.runtime.serving import ServingLoop, Ticket
from bsbr_export.serve.serve import ServerProcess, check_port

DEFAULT_MAX_TOKENS = 16  # OpenAI's, for /v1/completions
MAX_TOKENS = 4096  # the most one request may ask for (and a chat request's default)
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    """What completions and chat requests share; unknown fields are ignored, as OpenAI's
    and vLLM's servers do, but the ones whose non-default values we cannot honour are
    refused by name (see `unsupported`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = None  # vLLM's extension: -1 or 0 means all
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None


class CompletionRequest(Sampled):
    prompt: str | list[int] | list[str]
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | None = None


class ChatRequest(Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# Fields accepted only at these values (OpenAI's defaults): anything else is refused.
UNSUPPORTED = {
    "n": 1,
    "best_of": 1,
    "logprobs": None,
    "top_logprobs": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "suffix": None,
    "tools": None,
    "response_format": None,
}


class OpenAIError(Exception):
    """A request's error in OpenAI's shape, with its HTTP status."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass
class Served:
    """What the app serves: the model's name, its loop, and its chat template (if any)."""

    name: str
    loop: ServingLoop
    chat_template: Template | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(
    export_dir: str | Path,
    model_name: str | None = None,
    *,
    threads: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    limits: Limits | None = None,
) -> FastAPI:
    """The ASGI app serving `export_dir` (an ONNX export with `--streaming` of a model with a
    row step) under `model_name` (default: the export's model name). Loads the model now
    (a UserError if it cannot be served); the loop thread runs while the app does."""
    export_dir = Path(export_dir)
    batcher = Batcher(export_dir, threads, token_budget=token_budget)
    manifest = batcher.sequences.manifest
    name = model_name or export_name(manifest["model"]) or export_dir.resolve().name
    template, special = chat_template(export_dir)
    served = Served(name, ServingLoop(batcher, limits), template, special)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.loop.start()
        yield
        served.loop.stop()

    app = FastAPI(title=f"bsbr-export: {name}", lifespan=lifespan)
    app.state.served = served

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return OpenAIError(f"{where}: {first['msg']}", param=where or None).response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(served)]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict:
        check_model(served, model)
        return model_card(served)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(served, body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise OpenAIError("send one prompt per request (n and prompt arrays are not supported)", param="prompt")
            prompt = prompt[0]
        generation = checked(served, body, prompt, body.max_tokens or DEFAULT_MAX_TOKENS)
        echo = prompt if body.echo and isinstance(prompt, str) else ""
        return await respond(served, body, generation, request, "text_completion", echo)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(served, body.model)
        if served.chat_template is None:
            raise OpenAIError(
                f"{served.name} has no chat template (the export carries none: a model directory's "
                f"tokenizer_config.json chat_template or {CHAT_TEMPLATE_FILE}): use /v1/completions",
                param="messages",
            )
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt = served.chat_template.render(messages=messages, add_generation_prompt=True, **served.special_tokens)
        generation = checked(served, body, prompt, body.max_completion_tokens or body.max_tokens or MAX_TOKENS)
        return await respond(served, body, generation, request, "chat.completion", "")

    return app


def model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "bsbr-export"}


def check_model(served: Served, model: str) -> None:
    if model != served.name:
        raise OpenAIError(
            f"the model {model!r} does not exist here: this server serves {served.name!r}",
            status=404,
            param="model",
        )


def checked(served: Served, body: Sampled, prompt: str | list[int], max_tokens: int) -> Generation:
    """The request's `Generation` request, every field checked (an OpenAIError if not)."""
    extra = body.model_extra or {}
    for name, default in UNSUPPORTED.items():
        value = getattr(body, name, extra.get(name, default))
        if value not in (default, None):
            raise OpenAIError(f"{name} is not supported by this server (only {default!r})", param=name)
    if max_tokens > MAX_TOKENS:
        raise OpenAIError(f"max_tokens must be at most {MAX_TOKENS}, got {max_tokens}", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise OpenAIError("stop takes at most 4 sequences", param="stop")
    try:
        return served.loop.batcher.prompts.request(
            prompt,
            max_tokens,
            temperature=body.temperature,
            top_k=None if body.top_k in (None, -1, 0) else body.top_k,
            top_p=None if body.top_p == 1 else body.top_p,
            # No seed: a fresh one per request, as OpenAI's sampling is not repeatable either.
            seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
            stop=stop,
        )
    except UserError as exc:
        raise OpenAIError(str(exc)) from None


class Events:
    """A ticket's tokens, carried from the loop thread into the request's event loop, each
    with whether it was the last (read on the loop thread, as it is made)."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Token | None, bool, Exception | None]] = asyncio.Queue()

    def __call__(self, token: Token | None, error: Exception | None) -> None:
        event = (token, self.generation.done, error)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self) -> tuple[Token, bool]:
        """The next token and whether it was the last; an OpenAIError if the request failed."""
        token, last, error = await self.queue.get()
        if error is not None:
            raise refused(error)
        return token, last


async def respond(served: Served, body: Sampled, generation: Generation, request: Request, kind: str, echo: str) -> Any:
    """The response to a checked request: one JSON object, or server-sent events."""
    events = Events(generation)
    ticket = served.loop.submit(generation, events)
    identity = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    texts = Texts(generation, echo)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = stream(served, ticket, events, texts, identity, kind, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")
    try:
        last = False
        while not last:
            token, last = await events.next()
            texts.add(token, last)
    except asyncio.CancelledError:  # the client went away
        served.loop.cancel(ticket)
        raise
    return {
        "id": identity,
        "object": kind,
        "created": int(time.time()),
        "model": served.name,
        "choices": [choice(kind, texts.final(), finish_reason(generation), final=True)],
        "usage": usage(generation),
    }


async def stream(
    served: Served, ticket: Ticket, events: Events, texts: Texts, identity: str, kind: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, the finish reason on the last, the
    usage when asked, then `[DONE]`; an error mid-stream as one `error` event."""
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
    generation = ticket.request

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def chunk(choices: list, usage_: dict | None = None) -> str:
        payload = {"id": identity, "object": chunk_kind, "created": int(time.time()), "model": served.name}
        payload["choices"] = choices
        if include_usage:
            payload["usage"] = usage_
        return event(payload)

    last = False
    try:
        if kind != "text_completion":
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        elif texts.echo:
            yield chunk([choice(kind, texts.echo, None, final=False)])
        while not last:
            try:
                token, last = await events.next()
            except OpenAIError as exc:
                yield event(exc.body())
                return
            piece = texts.add(token, last)
            if piece or last:
                yield chunk([choice(kind, piece, finish_reason(generation) if last else None, final=False)])
        if include_usage:
            yield chunk([], usage(generation))
        yield "data: [DONE]\n\n"
    finally:
        if not last:  # the client went away (or the request failed): free its sequence
            served.loop.cancel(ticket)


class Texts:
    """The text a client sees: stop strings left out (OpenAI's rule), so while any might
    be forming, that many characters are held back from the stream."""

    def __init__(self, generation: Generation, echo: str) -> None:
        self.generation, self.echo = generation, echo
        self.hold = max((len(s) for s in generation.stop_texts), default=1) - 1
        self.text = ""  # the generated text so far, as the tokens' pieces
        self.sent = 0  # characters of it already streamed

    def add(self, token: Token, last: bool) -> str:
        """The text that can be streamed now that `token` is made."""
        self.text = self.visible() if last else self.text + token.text
        end = len(self.text) if last else max(len(self.text) - self.hold, self.sent)
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def visible(self) -> str:
        """The finished generation's text, without the stop string or end-of-text token that ended it."""
        result = self.generation.result
        if result.stopped == "stop":
            matched = next((s for s in self.generation.stop_texts if result.text.endswith(s)), "")
            return result.text[: len(result.text) - len(matched)]
        if result.stopped == "eos" and self.generation.text is not None:
            return self.generation.text.decode(result.ids[:-1])
        return result.text

    def final(self) -> str:
        return self.echo + self.text


def choice(kind: str, text: str, reason: str | None, final: bool) -> dict:
    if kind == "text_completion":
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    if final:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
    return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason}


def finish_reason(generation: Generation) -> str:
    return "length" if generation.result.stopped == "length" else "stop"


def usage(generation: Generation) -> dict:
    prompt, completion = len(generation.result.prompt), len(generation.result.ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def refused(error: Exception) -> OpenAIError:
    """The OpenAI error of a request the loop refused or failed: 429 when the server is
    full (retry later), 400 when the request passes a limit, 500 when a step failed."""
    if isinstance(error, Busy):
        return OpenAIError(str(error), status=429, kind="rate_limit_error")
    if isinstance(error, UserError):
        return OpenAIError(str(error))
    return OpenAIError(str(error), status=500, kind="server_error")


def chat_template(export_dir: Path) -> tuple[Template | None, dict[str, str]]:
    """The export's chat template as a sandboxed jinja2 template (as transformers renders
    it), and the special tokens it may name; (None, {}) when the export carries none."""
    settings_path = export_dir / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    source = settings.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if (export_dir / CHAT_TEMPLATE_FILE).is_file():
        source = (export_dir / CHAT_TEMPLATE_FILE).read_text()
    if not source:
        return None, {}

    def token(value) -> str:
        return value.get("content", "") if isinstance(value, dict) else value or ""

    try:
        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    except TemplateError as exc:
        raise UserError(f"{export_dir}'s chat template does not parse: {exc}") from None
    special = {k: token(settings.get(k)) for k in ("bos_token", "eos_token")}
    return template, special


def serve_openai(app: FastAPI, host: str, port: int) -> None:
    """Run `app` under uvicorn until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level="info")


class OpenAIServerProcess(ServerProcess):
    """`bsbr-export serve-openai EXPORT_DIR` in a process of its own on 127.0.0.1 (a context
    manager), for load tools, tests and a proxy's upstreams: `start()` returns once /health
    answers (or raises UserError with the end of its log); `stop()` ends it by its pid."""

    def __init__(self, export_dir: str | Path, port: int = 0, options: Sequence[str] = (), timeout_s: float = 120):
        self.export_dir, self.options, self.timeout_s = Path(export_dir), list(options), timeout_s
        self.port = check_port(port, "port")
        self.process: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OpenAIServerProcess:
        command = [sys.executable, "-c", "from bsbr_export.cli import main; raise SystemExit(main())"]
        command += ["serve-openai", str(self.export_dir), "--port", str(self.port), *self.options]
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"serve-openai exited with status {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError):  # refused while it loads
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            time.sleep(0.2)
        reason = self.log_tail()
        self.stop()
        raise UserError(f"serve-openai was not ready within {self.timeout_s:g} s: {reason}")

    def log_tail(self, lines: int = 5) -> str:
        self.log.seek(0)
        return " | ".join(self.log.read().decode(errors="replace").strip().splitlines()[-lines:])

    def cleanup(self) -> None:
        self.log.close()
