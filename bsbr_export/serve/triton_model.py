"""The `model.py` of bsbr-export's Triton Python-backend models (copied into each one).

It runs inside Triton's Python backend stub, in the serving venv (numpy < 2 and
onnxruntime; not this package), so it imports nothing from bsbr_export. The bsbr-export
package never imports it: `triton.write_triton_repo` copies it as `1/model.py`.

Two models share it; the config picks which (`parameters { key: "mode" }`):
- `full`: `model.onnx`, input_ids + attention_mask -> logits, one session run per request.
- `decode`: `model.decode.onnx` behind Triton's sequence batcher (START / END / CORRID
  control inputs). This model keeps each sequence's state itself, in a dict keyed by
  correlation id, because Triton's implicit state does not reach Python-backend models
  (it feeds zeros). A decode step returns the current chunk's `present.*` (replacing
  the held one) and the `new.*` rows of the chunks it finished (usually none), which are
  appended; nothing copies the finished chunks on a token that finishes none, so a token
  costs the same at any context length. END frees the sequence's state; a sequence idle
  for longer than `idle_seconds` is dropped (Triton forgets it after the same timeout).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Triton's entry point: `initialize`, `execute(requests)`, `finalize`."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.mode = params["mode"]
        self.vocab_size = int(params["vocab_size"])
        self.idle_seconds = float(params.get("idle_seconds", "0"))
        self.state_shapes = json.loads(params.get("state_shapes", "{}"))
        options = ort.SessionOptions()
        # Triton runs other models beside this one; idle ORT threads must not spin on its cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = os.path.join(args["model_repository"], args["model_version"], params["onnx_file"])
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.sequences: dict[int, dict[str, np.ndarray]] = {}  # correlation id -> past.* arrays
        self.last_used: dict[int, float] = {}

    def execute(self, requests: list) -> list:
        step = self._decode if self.mode == "decode" else self._full
        if self.mode == "decode":
            self._drop_idle()
        responses = []
        for request in requests:
            # One bad request gets its own error; the others in the batch are still served.
            try:
                responses.append(step(request))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def finalize(self) -> None:
        self.sequences.clear()

    def _ids(self, request) -> np.ndarray:
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RequestError(f"input_ids must be [batch, tokens] with at least one token, got shape {list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise RequestError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        return ids

    def _full(self, request):
        ids = self._ids(request)
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()  # Triton requires it
        if mask.shape != ids.shape:
            raise RequestError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}: they must match")
        (logits,) = self.session.run(self.output_names[:1], {"input_ids": ids, "attention_mask": mask})
        return pb_utils.InferenceResponse([pb_utils.Tensor(self.output_names[0], logits)])

    def _decode(self, request):
        ids = self._ids(request)  # of batch 1: Triton's sequence batcher refuses any other
        start, end = (bool(_control(request, name)) for name in ("START", "END"))
        sequence = int(_control(request, "CORRID"))
        if start:
            self.sequences[sequence] = self._empty_state()
        elif sequence not in self.sequences:
            raise RequestError(f"sequence {sequence} is not open here (ended, idle for over {self.idle_seconds:g} s, "
                               "or never started): send its first request with sequence_start")
        past = self.sequences[sequence]
        outputs = self.session.run(self.output_names, {"input_ids": ids, **past})
        for name, value in zip(self.output_names[1:], outputs[1:]):
            if name.startswith("present."):
                past[name.replace("present.", "past.", 1)] = value
            elif value.shape[2]:  # new.*: chunks this step finished, appended to the past
                key = name.replace("new.", "past.", 1)
                past[key] = np.concatenate([past[key], value], axis=2)
        if end:
            del self.sequences[sequence]
            self.last_used.pop(sequence, None)
        else:
            self.last_used[sequence] = time.monotonic()
        held = np.array([[len(self.sequences)]], dtype=np.int64)  # [batch 1, 1]
        return pb_utils.InferenceResponse([pb_utils.Tensor(self.output_names[0], outputs[0]),
                                           pb_utils.Tensor("open_sequences", held)])

    def _empty_state(self) -> dict[str, np.ndarray]:
        """Zeros of batch 1 with no finished chunks and no cached tokens."""
        return {name: np.zeros([1 if d == "batch" else 0 if isinstance(d, str) else d for d in shape], np.float32)
                for name, shape in self.state_shapes.items()}

    def _drop_idle(self) -> None:
        if self.idle_seconds <= 0:
            return
        now = time.monotonic()
        for sequence in [s for s, t in self.last_used.items() if now - t > self.idle_seconds]:
            self.sequences.pop(sequence, None)
            del self.last_used[sequence]


class RequestError(Exception):
    """What was wrong with one request: sent back to its client as the response's error."""


def _control(request, name: str) -> int:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"{name} control input missing: send the request as part of a sequence (sequence_id)")
    return int(tensor.as_numpy().reshape(-1)[0])
