"""runtime.generate: the Python generation API over an export's graphs generates
what the eager model generates (greedy, and the same draws from the same seed), streams
tokens and text as they come, stops where told, and refuses bad input in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import user_models
from conftest import eager_greedy, prompt_of

from bsbr_export.errors import UserError
from bsbr_export.export.pipeline import export_model
from bsbr_export.formats import FORMATS
from bsbr_export.model.checkpoint import load_model
from bsbr_export.runtime.generate import generation_engines, load_generator
from bsbr_export.runtime.requests import Sampling, pick

NEW_TOKENS = 30  # with c = 8: crosses 3-4 chunk boundaries after any of the prompts below


@pytest.mark.parametrize("engine", ["ort-cpu-all", "torchscript"])
@pytest.mark.parametrize("length", [1, 8, 13])  # c = 8: one token, exactly one chunk, a ragged tail
def test_greedy_matches_eager(tiny_export, engine, length):
    out, _ = tiny_export
    model = load_model(out)
    prompt = prompt_of(length, model.config.vocab_size)
    generation = load_generator(out, engine).generate(prompt, max_new_tokens=NEW_TOKENS)
    assert generation.prompt == prompt and generation.stopped == "length"
    assert generation.ids == eager_greedy(model, prompt, NEW_TOKENS)
    assert len(generation.token_seconds) == NEW_TOKENS - 1 and generation.prefill_seconds > 0


def test_onnx_runtime_generates_through_the_row_step_and_frees_an_abandoned_stream(tiny_export):
    """ORT engines take the servers' path (the row step; torchscript the decode loop), and a
    stream the caller stops reading leaves no sequence open."""
    out, _ = tiny_export
    generator = load_generator(out)
    assert generator.kind == "rows" and load_generator(out, "torchscript").kind == "decode"
    tokens = generator.generate(prompt_of(5, 97), 50, stream=True)
    first = [next(tokens).id for _ in range(3)]
    tokens.close()
    assert len(generator.batcher.sequences) == 0 and not generator.batcher.active
    assert generator.generate(prompt_of(5, 97), 3).ids == first


def test_a_user_modules_decode_graph_appends_finished_chunks(tmp_path):
    """A user's module with `stream_update`: its decode graph returns finished chunks as
    `new.*` rows, which the generator appends (a generator that replaced the state with
    them would drift after the first chunk boundary)."""
    out = tmp_path / "rotary"
    export_model(
        f"{Path(user_models.__file__)}:rotary_decoder",
        out,
        [FORMATS["onnx"]],
        streaming=True,
        trust_code=True,
    )
    model = user_models.rotary_decoder()
    prompt = prompt_of(6, 67)
    generator = load_generator(out)
    assert generator.kind == "decode"
    assert "new.0.meta_keys" in generator.runner.output_names
    assert generator.generate(prompt, max_new_tokens=NEW_TOKENS).ids == eager_greedy(model, prompt, NEW_TOKENS)


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(0.8, seed=3),
        Sampling(1.5, top_k=5, seed=4),
        Sampling(1.0, top_p=0.3, seed=5),
        Sampling(2.0, top_k=20, top_p=0.5, seed=6),
    ],
)
def test_sampling_draws_what_eager_logits_draw_with_the_same_seed(tiny_export, sampling):
    out, _ = tiny_export
    model = load_model(out)
    prompt = prompt_of(13, model.config.vocab_size)
    generation = load_generator(out).generate(
        prompt,
        NEW_TOKENS,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        seed=sampling.seed,
    )
    rng, ids = np.random.default_rng(sampling.seed), list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(pick(model(torch.tensor([ids]))[0, -1].numpy(), sampling, rng))
    assert generation.ids == ids[len(prompt) :]
    assert generation.ids != eager_greedy(model, prompt, NEW_TOKENS)  # it did sample


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = {pick(logits, Sampling(1.0, top_p=0.7), rng) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert {pick(logits, Sampling(1.0, top_p=0.5), rng) for _ in range(100)} == {0}
    assert {pick(logits, Sampling(1.0, top_k=3), rng) for _ in range(500)} == {0, 1, 2}


def test_byte_level_text_streams_as_it_comes(stdlib_streaming_export):
    """bsbr-stdlib: text in, tokens out one by one, each with the text it completes; a
    prompt with a multi-byte character goes in as its UTF-8 bytes."""
    generator = load_generator(stdlib_streaming_export)
    tokens = list(generator.generate("def grüße(", max_new_tokens=40, temperature=0.9, seed=1, stream=True))
    assert len(tokens) == 40 and all(isinstance(t.text, str) for t in tokens)
    ids, streamed = [t.id for t in tokens], "".join(t.text for t in tokens)
    whole = generator.generate("def grüße(", max_new_tokens=40, temperature=0.9, seed=1)
    assert whole.prompt == list("def grüße(".encode()) and whole.ids == ids
    assert whole.text == bytes(ids).decode("utf-8", errors="replace")
    # The pieces are the whole text, but for a last character whose bytes never all came.
    assert whole.text.startswith(streamed) and len(whole.text) - len(streamed) <= 1
    stop = streamed[len(streamed) // 2]
    stopped = generator.generate("def grüße(", max_new_tokens=40, temperature=0.9, seed=1, stop=[stop])
    assert stopped.stopped == "stop" and stopped.text == streamed[: streamed.index(stop) + 1]


def test_stops_at_a_stop_id_or_text(tiny_export):
    out, _ = tiny_export
    generator = load_generator(out)
    prompt = prompt_of(5, 97)
    free = generator.generate(prompt, max_new_tokens=NEW_TOKENS)
    stop_at = free.ids[6]
    first = free.ids.index(stop_at)
    stopped = generator.generate(prompt, max_new_tokens=NEW_TOKENS, stop=[stop_at])
    assert stopped.ids == free.ids[: first + 1] and stopped.stopped == "stop"


def test_engines_that_can_generate(tiny_export, tiny_onnx_export):
    out, _ = tiny_export
    assert {"ort-cpu-all", "torchscript"} <= set(generation_engines(out))
    assert generation_engines(tiny_onnx_export) == []
    with pytest.raises(UserError, match="no streaming graphs"):
        load_generator(tiny_onnx_export)
    with pytest.raises(UserError, match="engine 'eager' cannot generate .* use one of"):
        load_generator(out, "eager")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda g: g.generate([], 5), "the prompt is empty"),
        (lambda g: g.generate([1, 97], 5), "token id 97 is out of range"),
        (lambda g: g.generate([1, -2], 5), "token id -2 is not a non-negative integer"),
        (lambda g: g.generate("text", 5), "has no tokenizer"),
        (lambda g: g.generate([1], 0), "max_new_tokens must be an integer >= 1"),
        (lambda g: g.generate([1], 5, temperature=float("nan")), "temperature must be a number >= 0"),
        (lambda g: g.generate([1], 5, temperature=1, top_k=0), "top_k must be an integer >= 1"),
        (lambda g: g.generate([1], 5, temperature=1, top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_input_is_one_user_error(tiny_export, call, message):
    out, _ = tiny_export
    with pytest.raises(UserError, match=message):
        call(load_generator(out))
