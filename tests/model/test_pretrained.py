"""Hugging Face model directories (save_pretrained) through export, validate and generate:
loaded by transformers itself, custom code only with --trust-code, the tokenizer.json
carried into the export, and directories of neither kind refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import HF_MODELING, run_cli, save_hf_model, train_tokenizer

from bsbr_export.errors import UserError
from bsbr_export.export.pipeline import export_model
from bsbr_export.formats import FORMATS
from bsbr_export.manifest import read_manifest
from bsbr_export.model.checkpoint import build_model, save_model
from bsbr_export.model.pretrained import directory_kind, load_pretrained
from bsbr_export.model.zoo import get_preset
from bsbr_export.proof.validate import validate_export
from bsbr_export.runtime.generate import load_generator

# Runs the CLI in a fresh interpreter, then says whether the model's own code was imported.
IMPORT_PROBE = """
import os, sys
from bsbr_export.cli import main
status = main(sys.argv[1:])
print("imported" if os.environ.get("BSBR_LM_IMPORTED") else "not imported")
sys.exit(status)
"""


def test_directory_kind_is_read_from_config_json(hf_model_dir, tmp_path):
    assert directory_kind(hf_model_dir) == "pretrained"
    save_model(build_model(get_preset("bsbr-tiny").config), tmp_path / "ckpt")
    assert directory_kind(tmp_path / "ckpt") == "checkpoint"


@pytest.mark.parametrize(
    "config, message",
    [
        (None, "has no config.json"),
        ({"hidden_dim": 8, "n_layers": 2}, "keys ['hidden_dim', 'n_layers'] of neither"),
        ([1, 2], "is not a JSON object"),
    ],
)
def test_a_directory_of_neither_kind_is_one_line_and_exit_2(capsys, tmp_path, config, message):
    directory = tmp_path / "model"
    directory.mkdir()
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "export", directory, "--out", tmp_path / "out")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "neither a bsbr-export checkpoint" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_custom_code_is_never_imported_without_trust_code(hf_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BSBR_LM_IMPORTED"}
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, "export", str(hf_model_dir), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stdout.strip() == "not imported"
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "ships its own model code" in err[0] and "--trust-code" in err[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_loaded_model_is_the_model_that_was_saved(hf_model_dir):
    """transformers builds models on the meta device: nothing of the layer (its rotary
    frequencies included) may be left uninitialized."""
    saved = save_hf_model(hf_model_dir.parent / "again", train_tokenizer())
    loaded = load_pretrained(hf_model_dir, trust_code=True)
    ids = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, saved(ids).logits)


def test_export_records_the_directory_and_carries_its_tokenizer(hf_model_dir, hf_export):
    manifest = read_manifest(hf_export)  # every file, tokenizer.json included, matches its sha256
    source = manifest["source"]
    assert source["kind"] == "pretrained" and source["ref"] == str(hf_model_dir.resolve())
    assert source["saved_dtype"] == "float32" and source["eos_token_id"] == 0
    assert source["transformers"] == __import__("transformers").__version__
    assert manifest["spec"]["tokenizer"] == "tokenizer.json"
    assert "tokenizer.json" in manifest["checkpoint"]
    assert (hf_export / "tokenizer.json").read_bytes() == (hf_model_dir / "tokenizer.json").read_bytes()
    assert {a["name"] for a in manifest["artifacts"]} >= {"model.onnx", "model.decode.onnx", "model.decode.pt"}


def test_validate_rebuilds_the_model_from_its_directory(hf_export):
    report = validate_export(hf_export, lengths=[1, 13, 50, 301], batches=[1, 3], trust_code=True)
    assert report.passed, report.failures
    assert {c.artifact for c in report.checks} >= {"model.onnx", "model.decode.onnx", "model.pt"}
    with pytest.raises(UserError, match="--trust-code"):
        validate_export(hf_export)


@pytest.mark.parametrize("engine", ["ort-cpu-all", "torchscript"])
def test_text_in_text_out_matches_transformers_greedy(hf_model_dir, hf_export, engine):
    """The generator's ids are greedy decoding with the model transformers loads (whole
    sequence every step), and its text is the tokenizer's decoding of them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(hf_model_dir / "tokenizer.json"))
    model = load_pretrained(hf_model_dir, trust_code=True)
    prompt = "def decode(self, s):\n    "
    generation = load_generator(hf_export, engine).generate(prompt, max_new_tokens=25)
    ids = tokenizer.encode(prompt).ids
    assert generation.prompt == ids and len(ids) % 8  # the prompt ends inside a chunk (c = 8)
    with torch.no_grad():
        for _ in range(len(generation.ids)):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert generation.ids == ids[len(generation.prompt) :]
    assert generation.text == tokenizer.decode(generation.ids, skip_special_tokens=False)
    assert generation.stopped == ("eos" if generation.ids[-1] == 0 else "length")


def test_sharded_bfloat16_directory(tmp_path):
    """Weights saved in bfloat16 over several safetensors shards: loaded as float32 by
    transformers, exported and checked against that."""
    directory = tmp_path / "sharded"
    model = save_hf_model(tmp_path / "fp32")  # then saved once more, in bfloat16 and sharded
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    result = export_model(str(directory), tmp_path / "out", [FORMATS["onnx"]], trust_code=True)
    assert result.passed
    manifest = read_manifest(tmp_path / "out")
    assert manifest["source"]["saved_dtype"] == "bfloat16"
    assert manifest["spec"].get("tokenizer") is None  # no tokenizer.json: ids in, ids out
    loaded = load_pretrained(directory, trust_code=True)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.embed.weight, model.embed.weight.float())  # bfloat16 values, as saved


def test_a_builtin_architecture_needs_no_trust_code_and_says_what_it_lacks(capsys, tmp_path):
    """No auto_map: transformers' own class is loaded without --trust-code; without a BSBR
    layer it is refused in one line."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()  # what saving printed (transformers' progress bar) is not the CLI's
    code, _, err = run_cli(capsys, "export", tmp_path / "gpt2", "--out", tmp_path / "out")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "no BSBR attention layer" in err, err


def test_the_modeling_file_travels_with_save_pretrained(hf_model_dir):
    assert (hf_model_dir / HF_MODELING.name).read_text() == HF_MODELING.read_text()
    assert (
        json.loads((hf_model_dir / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
        == "modeling_bsbr_lm.BSBRForCausalLM"
    )


def test_another_tokenizers_files_are_converted_to_tokenizer_json(tmp_path):
    """A directory with a GPT-2 style vocab.json + merges.txt and no tokenizer.json: the
    export carries the tokenizer.json transformers converts them to, encoding as they do."""
    from tokenizers import Tokenizer

    tokenizer = train_tokenizer()
    directory = tmp_path / "slow-tokenizer"
    save_hf_model(directory, tokenizer)
    (directory / "tokenizer.json").unlink()
    tokenizer.model.save(str(directory))  # vocab.json + merges.txt
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    out = tmp_path / "out"
    export_model(str(directory), out, [FORMATS["onnx"]], streaming=True, trust_code=True)
    assert read_manifest(out)["spec"]["tokenizer"] == "tokenizer.json"
    carried = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "class Parser:\n    def parse(self, s):\n        return json.loads(s)"
    assert carried.encode(text).ids == tokenizer.encode(text).ids
    generation = load_generator(out).generate(text, max_new_tokens=5)
    assert generation.prompt == tokenizer.encode(text).ids
