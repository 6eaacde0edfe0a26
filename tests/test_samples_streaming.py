"""samples/streaming: generate.py (a command line over runtime.generate) generates exactly
the ids that greedy decoding with the full eager model does, and rejects bad input with
one line, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import eager_greedy, prompt_of

from bsbr_export.model.checkpoint import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "samples" / "streaming" / "generate.py"
NEW_TOKENS = 30  # with c = 8: crosses 3-4 chunk boundaries after any of the prompts below


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("which", ["tiny_export", "compressed_export"])
@pytest.mark.parametrize("length", [1, 8, 13])  # c = 8: one token, exactly one chunk, a ragged tail
def test_matches_eager_greedy(request, which, length, tmp_path):
    out, _ = request.getfixturevalue(which)
    model = load_model(out)
    prompt = prompt_of(length, model.config.vocab_size)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(" ".join(map(str, prompt)) + "\n")
    done = run(out, "--prompt-file", prompt_file, "--max-new-tokens", NEW_TOKENS, "--out", tmp_path / "out.json")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    expected = eager_greedy(model, prompt, NEW_TOKENS)
    assert result["prompt"] == prompt
    assert result["generated"] == expected
    assert len(result["token_ms"]) == NEW_TOKENS - 1  # one call per token after the prompt's
    # Tokens are printed as they come, on one line, before the latency summary.
    assert done.stdout.splitlines()[0].split() == [str(t) for t in expected]
    assert "per-token latency median" in done.stdout


@pytest.mark.parametrize("temperature, top_k", [(0.8, None), (1.5, 5)])
def test_sampling_matches_eager_logits_drawn_with_the_same_seed(tiny_export, tmp_path, temperature, top_k):
    """--temperature/--top-k/--seed: the draws the sample makes from its ONNX logits are
    the ones the same generator makes from the full eager model's logits, step by step."""
    import numpy as np
    import torch

    from bsbr_export.runtime.requests import Sampling, pick

    out, _ = tiny_export
    model = load_model(out)
    prompt = prompt_of(13, model.config.vocab_size)
    args = ["--temperature", temperature, "--seed", 7] + (["--top-k", top_k] if top_k else [])
    done = run(out, *prompt, "--max-new-tokens", NEW_TOKENS, "--out", tmp_path / "out.json", *args)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    rng, ids = np.random.default_rng(7), list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(pick(model(torch.tensor([ids]))[0, -1].numpy(), Sampling(temperature, top_k), rng))
    assert result["generated"] == ids[len(prompt) :]
    assert result["generated"] != eager_greedy(model, prompt, NEW_TOKENS)  # it did sample
    assert (result["temperature"], result["top_k"], result["seed"]) == (temperature, top_k, 7)
    if top_k:  # every draw is among the k most likely of its step
        logits = model(torch.tensor([ids[:-1]]))[0, len(prompt) - 1 :].detach()
        ranks = (logits > logits.gather(-1, torch.tensor(ids[len(prompt) :])[:, None])).sum(-1)
        assert int(ranks.max()) < top_k


def _without_streaming(out: Path, tmp_path: Path) -> tuple[Path, str]:
    """An export made without --streaming: its manifest lists no streaming graph."""
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    streaming = ("model.streaming.onnx", "model.decode.onnx")
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["name"] not in streaming]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy, "has no streaming graph to run here"


def _changed_model(out: Path, tmp_path: Path) -> tuple[Path, str]:
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    with open(copy / "model.decode.onnx", "ab") as f:  # the graph the sample prefers
        f.write(b"\0")
    return copy, "does not match the sha256"


def _missing_dir(out: Path, tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / "nowhere", "is not an export directory"


@pytest.mark.parametrize("make", [_missing_dir, _without_streaming, _changed_model])
def test_bad_artifact_is_one_line_and_exit_2(tiny_export, tmp_path, make):
    out, _ = tiny_export
    export_dir, message = make(out, tmp_path)
    done = run(export_dir, 1, 2, 3)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["1", "97"], "out of range"),  # bsbr-tiny's vocabulary is [0, 97)
        ([], "no prompt"),
        (["1", "--text", "a"], "pass one prompt: token ids and --text given"),
        (["--text", "def"], "has no tokenizer"),  # bsbr-tiny's ids are no bytes
        (["1", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
        (["1", "--temperature", "-0.5"], "temperature must be a number >= 0"),
        (["1", "--temperature", "nan"], "temperature must be a number >= 0"),
        (["1", "--temperature", "1", "--top-k", "0"], "top_k must be an integer >= 1"),
        (["1", "--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["1", "--engine", "eager"], "engine 'eager' cannot generate"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_export, args, message):
    out, _ = tiny_export
    done = run(out, *args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


def test_full_state_streaming_graph_when_no_decode_graph(tiny_export, tmp_path):
    """An export listing only model.streaming.onnx: the sample falls back to it."""
    out, _ = tiny_export
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["name"] != "model.decode.onnx"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "model.decode.onnx").unlink()
    model = load_model(copy)
    prompt = prompt_of(13, model.config.vocab_size)
    done = run(copy, *prompt, "--max-new-tokens", NEW_TOKENS, "--out", tmp_path / "out.json")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out.json").read_text())["generated"] == eager_greedy(model, prompt, NEW_TOKENS)


def test_text_through_the_exports_tokenizer_json(hf_export, tmp_path):
    """An export of a Hugging Face model directory: --text goes in through its tokenizer.json."""
    from bsbr_export.runtime.generate import load_generator

    done = run(hf_export, "--text", "def f(x):", "--max-new-tokens", 12, "--out", tmp_path / "out.json")
    assert done.returncode == 0, done.stderr
    expected = load_generator(hf_export).generate("def f(x):", 12)
    assert json.loads((tmp_path / "out.json").read_text())["generated"] == expected.ids
    assert done.stdout.startswith("def f(x):")
