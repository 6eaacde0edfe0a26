"""The `model.py` of bsbr-export's Triton Python-backend models (copied into each one).

It runs inside Triton's Python backend stub, in the serving venv (numpy < 2, onnxruntime
and tokenizers; no torch). The bsbr-export package never imports it:
`triton.write_triton_repo` copies it as `1/model.py`, and for the `rows` and `generate`
models also the torch-free modules it runs (`runtime.serving`, `runtime.batching` and what
they import) as
`1/bsbr_export/`, with the export's graphs and manifest in `1/export/`, so the model runs
the code of the bsbr-export that wrote it.

The config picks the mode (`parameters { key: "mode" }`):
- `full`: `model.onnx`, input_ids + attention_mask -> logits, one session run per request.
- `rows`: the step model behind Triton's sequence batcher (START / END / CORRID control
  inputs, the "oldest" strategy, so one `execute` gets several sequences' requests). The
  sequences' states live here (Triton's implicit state does not reach Python-backend
  models), in a `runtime.batching.Sequences`: every request of one token that leaves its
  chunk open goes into one row-step call; a prompt, several tokens, or a token that closes
  a chunk go through the decode step. END frees the state; a sequence idle for longer than
  `idle_seconds` is dropped (Triton forgets it after the same timeout).
- `decode`: the same protocol for exports without a row step: each request one decode
  call, on a state kept as the decode step returns it (finished chunks appended).
- `generate` (decoupled): a prompt in, tokens streamed out as they are made, every running
  generation advanced by one row-step call per iteration of a loop thread, joining prompts
  prefilled in pieces within a token budget (in-flight batching and its scheduler,
  `runtime.serving.ServingLoop` over `runtime.batching.Batcher`, as the OpenAI server);
  tensor names as Triton's vLLM backend.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
# vLLM's sampling_parameters keys this model reads (others are refused by name).
SAMPLING_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids")
DEFAULT_MAX_TOKENS = 16  # vLLM's default


class TritonPythonModel:
    """Triton's entry point: `initialize`, `execute(requests)`, `finalize`."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        modes = {"full": FullModel, "decode": DecodeModel, "rows": RowsModel, "generate": GenerateModel}
        self.model = modes[params["mode"]](version_dir, params)

    def execute(self, requests: list) -> list | None:
        return self.model.execute(requests)

    def finalize(self) -> None:
        self.model.finalize()


class RequestError(Exception):
    """What was wrong with one request: sent back to its client as the response's error."""


def error_response(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def serve_each(requests: list, respond) -> list:
    """`respond(request)` for each request; one bad request gets its own error and the
    others are still served."""
    responses = []
    for request in requests:
        try:
            responses.append(respond(request))
        except RequestError as exc:
            responses.append(error_response(str(exc)))
    return responses


def session(path: str):
    options = ort.SessionOptions()
    # Triton runs other models beside this one; idle ORT threads must not spin on its cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def input_ids(request, vocab_size: int) -> np.ndarray:
    ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise RequestError(f"input_ids must be [batch, tokens] with at least one token, got shape {list(ids.shape)}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise RequestError(f"token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    return ids


def control(request, name: str) -> int:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"{name} control input missing: send the request as part of a sequence (sequence_id)")
    return int(tensor.as_numpy().reshape(-1)[0])


def not_open(sequence: int, idle_seconds: float) -> RequestError:
    return RequestError(
        f"sequence {sequence} is not open here (ended, idle for over {idle_seconds:g} s, never "
        "started, or the server restarted since): send its first request with sequence_start"
    )


def import_bsbr_export():
    """The bsbr_export modules copied beside this file (the version that wrote the model)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from bsbr_export.errors import UserError
    from bsbr_export.runtime import batching, serving

    return batching, serving, UserError


def log(message: str) -> None:
    pb_utils.Logger.log_info(message)


class FullModel:
    """The full-sequence graph, one session run per request."""

    def __init__(self, version_dir: str, params: dict) -> None:
        self.vocab_size = int(params["vocab_size"])
        self.session = session(os.path.join(version_dir, params["onnx_file"]))
        self.logits = self.session.get_outputs()[0].name

    def execute(self, requests: list) -> list:
        return serve_each(requests, self._respond)

    def _respond(self, request):
        ids = input_ids(request, self.vocab_size)
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()  # Triton requires it
        if mask.shape != ids.shape:
            raise RequestError(
                f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}: they must match"
            )
        (logits,) = self.session.run([self.logits], {"input_ids": ids, "attention_mask": mask})
        return pb_utils.InferenceResponse([pb_utils.Tensor(self.logits, logits)])

    def finalize(self) -> None:
        pass


class Expiry:
    """When each open sequence was last used; those idle for over `seconds` are dropped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last_used: dict[int, float] = {}

    def touch(self, sequence: int) -> None:
        self.last_used[sequence] = time.monotonic()

    def forget(self, sequence: int) -> None:
        self.last_used.pop(sequence, None)

    def idle(self) -> list[int]:
        """The sequences idle for too long, now forgotten here."""
        if self.seconds <= 0:
            return []
        now = time.monotonic()
        idle = [s for s, t in self.last_used.items() if now - t > self.seconds]
        for sequence in idle:
            del self.last_used[sequence]
        return idle


class DecodeModel:
    """The decode graph on one sequence per call (exports without a row step)."""

    def __init__(self, version_dir: str, params: dict) -> None:
        import_bsbr_export()
        from bsbr_export.runtime import state

        self.state = state  # how a state starts, and how a step's outputs advance it
        self.vocab_size = int(params["vocab_size"])
        self.state_shapes = json.loads(params["state_shapes"])
        self.session = session(os.path.join(version_dir, params["onnx_file"]))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.sequences: dict[int, dict[str, np.ndarray]] = {}  # correlation id -> past.* arrays
        self.expiry = Expiry(float(params.get("idle_seconds", "0")))

    def execute(self, requests: list) -> list:
        for sequence in self.expiry.idle():
            self.sequences.pop(sequence, None)
        return serve_each(requests, self._respond)

    def _respond(self, request):
        ids = input_ids(request, self.vocab_size)  # of batch 1: Triton's sequence batcher refuses any other
        start, end, sequence = control(request, "START"), control(request, "END"), control(request, "CORRID")
        if start:
            self.sequences[sequence] = self._empty_state()
        elif sequence not in self.sequences:
            raise not_open(sequence, self.expiry.seconds)
        past = self.sequences[sequence]
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, {"input_ids": ids, **past})))
        self.sequences[sequence] = self.state.advance_state(past, outputs)
        if end:
            del self.sequences[sequence]
            self.expiry.forget(sequence)
        else:
            self.expiry.touch(sequence)
        held = np.array([[len(self.sequences)]], dtype=np.int64)  # [batch 1, 1]
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor(self.output_names[0], outputs[self.output_names[0]]),
                pb_utils.Tensor("open_sequences", held),
            ]
        )

    def _empty_state(self) -> dict[str, np.ndarray]:
        """Zeros of batch 1 with no finished chunks and no cached tokens."""
        return {name: self.state.empty_state_tensor(shape, 1) for name, shape in self.state_shapes.items()}

    def finalize(self) -> None:
        self.sequences.clear()


def limits(batching, params: dict, sequences):
    """The model's `runtime.batching.Limits` from its config's parameters, logged once."""
    keys = ("max_sequences", "max_state_bytes", "max_prompt_tokens")
    limits = batching.Limits(**{key: int(params[key]) for key in keys})
    log(limits.describe(sequences))
    return limits


class RowsModel:
    """The step model over `Sequences`: one row-step call for a batch's one-token requests."""

    def __init__(self, version_dir: str, params: dict) -> None:
        batching, _, self.UserError = import_bsbr_export()
        self.sequences = batching.Sequences(os.path.join(version_dir, "export"), int(params["threads"]) or None)
        self.vocab_size = self.sequences.spec.tokens.high
        self.limits = limits(batching, params, self.sequences)
        self.expiry = Expiry(float(params.get("idle_seconds", "0")))

    def execute(self, requests: list) -> list:
        for sequence in self.expiry.idle():
            if sequence in self.sequences:
                self.sequences.close(sequence)
        responses: list = [None] * len(requests)
        feeds, ends = {}, {}  # correlation id -> its tokens / (request index, END)
        for i, request in enumerate(requests):
            try:
                ids = input_ids(request, self.vocab_size)[0]
                start, end, sequence = control(request, "START"), control(request, "END"), control(request, "CORRID")
                if start:
                    if sequence in self.sequences:  # a new sequence reusing an id starts afresh
                        self.sequences.close(sequence)
                    self.limits.check_open(self.sequences, len(ids), len(ids))
                    responses[i] = self.sequences.open(sequence, ids.tolist())
                elif sequence not in self.sequences:
                    raise not_open(sequence, self.expiry.seconds)
                else:
                    feeds[sequence] = ids.tolist()
                ends[sequence] = (i, end)
            except (RequestError, self.UserError) as exc:
                responses[i] = error_response(str(exc))
        if feeds:
            for sequence, logits in self.sequences.feed(feeds).items():
                responses[ends[sequence][0]] = logits
        for sequence, (_, end) in ends.items():
            if end:
                self.sequences.close(sequence)
                self.expiry.forget(sequence)
            else:
                self.expiry.touch(sequence)
        held = np.array([[len(self.sequences)]], dtype=np.int64)
        logits_name = self.sequences.logits
        return [
            r
            if not isinstance(r, np.ndarray)
            else pb_utils.InferenceResponse(
                [pb_utils.Tensor(logits_name, r[None].astype(np.float32)), pb_utils.Tensor("open_sequences", held)]
            )
            for r in responses
        ]

    def finalize(self) -> None:
        pass


def optional_input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def text_of(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Job:
    """A generation request on its way: its checked request, and how its tokens are sent
    (each as made when it streams, else the whole text at the end)."""

    def __init__(self, request, sender, stream: bool, prefix: str) -> None:
        self.request, self.sender, self.stream, self.prefix = request, sender, stream, prefix

    def __call__(self, token, error: Exception | None) -> None:
        """The serving loop's listener: raises when the client is gone (the loop then
        frees the sequence)."""
        if error is not None:
            self.sender.send(error_response(str(error)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        done = self.request.done
        if self.stream:
            response = text_response(token.text, [token.id])
        elif done:
            result = self.request.result
            response = text_response(self.prefix + result.text, result.ids)
        else:
            return
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if done else 0)


def text_response(text: str, ids: list[int]):
    return pb_utils.InferenceResponse(
        [
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int64)),
        ]
    )


class GenerateModel:
    """In-flight batching behind Triton's decoupled mode: `execute` checks each request and
    submits it to a `runtime.serving.ServingLoop` (the OpenAI server's too), whose thread
    runs one `Batcher.step` per iteration (every running generation's next token, then
    joining prompts in pieces within the token budget); each token goes out as made."""

    def __init__(self, version_dir: str, params: dict) -> None:
        batching, serving, self.UserError = import_bsbr_export()
        batcher = batching.Batcher(
            os.path.join(version_dir, "export"),
            int(params["threads"]) or None,
            token_budget=int(params["token_budget"]),
        )
        self.prompts = batcher.prompts
        self.loop = serving.ServingLoop(batcher, limits(batching, params, batcher.sequences)).start()

    def execute(self, requests: list) -> None:  # decoupled: responses go through each request's sender
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._job(request, sender)
            except (RequestError, self.UserError) as exc:
                sender.send(error_response(str(exc)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.loop.submit(job.request, job, sender.is_cancelled)

    def finalize(self) -> None:
        self.loop.stop()

    def _job(self, request, sender) -> Job:
        """A request's checked `Job` (vLLM's tensor names), or a RequestError saying what is wrong."""
        text = optional_input(request, "text_input")
        ids = optional_input(request, "input_ids")
        if (text is None) == (ids is None):
            raise RequestError("send the prompt as text_input or as input_ids (one of them)")
        if text is not None and self.prompts.text is None:
            raise RequestError("this model has no tokenizer: send the prompt as input_ids")
        raw = optional_input(request, "sampling_parameters")
        try:
            sampling = json.loads(text_of(raw[0])) if raw is not None and len(raw) else {}
        except ValueError as exc:
            raise RequestError(f"sampling_parameters is not JSON: {exc}") from None
        if not isinstance(sampling, dict):
            raise RequestError("sampling_parameters must be a JSON object")
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise RequestError(
                f"unknown sampling parameter {unknown[0]!r}: this model reads {', '.join(SAMPLING_KEYS)}"
            )
        max_tokens = optional_input(request, "max_tokens")
        max_tokens = int(max_tokens[0]) if max_tokens is not None else sampling.get("max_tokens", DEFAULT_MAX_TOKENS)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        stop = sampling.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        top_k = sampling.get("top_k")
        options = {
            "temperature": sampling.get("temperature", 0.0),
            "top_k": None if top_k in (None, -1, 0) else top_k,  # vLLM: -1 (or 0) means all
            "top_p": sampling.get("top_p"),
            "seed": sampling.get("seed", 0),
            "stop": stop + list(sampling.get("stop_token_ids") or []),
        }
        prompt = text_of(text[0]) if text is not None else [int(i) for i in ids]
        checked = self.prompts.request(prompt, max_tokens, **options)
        stream = optional_input(request, "stream")
        exclude = optional_input(request, "exclude_input_in_output")
        streaming = True if stream is None else bool(stream[0])
        prefix = (
            prompt if isinstance(prompt, str) and not streaming and not (exclude is not None and exclude[0]) else ""
        )
        return Job(checked, sender, streaming, prefix)
