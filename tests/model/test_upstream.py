"""Flavor bsbr-0.1.1: checkpoints of the PyPI package `bsbr` 0.1.1, its numerics exactly.

Parity is checked against the real package when it is installed (CI installs it with
`pip install --no-deps --ignore-requires-python bsbr==0.1.1`), and always against the
committed fixture made by `tools/make_upstream_fixture.py` from the real package.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rehash, weight_used_only_in
from safetensors.torch import load_file, save_file

from bsbr_export import BSBRConfig
from bsbr_export.cli import main
from bsbr_export.errors import UserError
from bsbr_export.model.checkpoint import load_model
from bsbr_export.model.upstream import UpstreamBSBRModel, sinusoid_table

FIXTURE = Path(__file__).parents[1] / "fixtures" / "upstream"
ATOL = 1e-5  # float32 round-off: the package and ours compute the same sums in other orders
MAX_ERR: dict[str, float] = {}  # worst error per test, printed at the end of the package matrix


def fixture_info() -> dict:
    return json.loads((FIXTURE / "fixture.json").read_text())


def import_cli(checkpoint, out, heads, chunk, *extra) -> Path:
    code = main(
        [
            "import-upstream",
            str(checkpoint),
            "--heads",
            str(heads),
            "--chunk-size",
            str(chunk),
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == 0
    return out


def hidden(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect exit 2 with exactly one stderr line containing every needle."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------------------
# The committed fixture: parity without the package


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    info = fixture_info()
    out = tmp_path_factory.mktemp("upstream") / "fixture-ckpt"
    return import_cli(FIXTURE / "model.safetensors", out, *info["import"][1::2])


def test_fixture_matches_package_outputs(fixture_dir):
    model = load_model(fixture_dir)
    assert isinstance(model, UpstreamBSBRModel)
    assert model.config.flavor == "bsbr-0.1.1" and not model.config.causal and not model.config.lm_head
    expected = load_file(FIXTURE / "expected.safetensors")
    for length in fixture_info()["lengths"]:
        want = expected[f"hidden.{length}"]
        got = hidden(model, expected[f"ids.{length}"])
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= ATOL, length


def test_fixture_config_is_inferred(fixture_dir):
    cfg = json.loads((fixture_dir / "config.json").read_text())
    args = fixture_info()["constructor"]
    assert cfg["vocab_size"] == args["vocab_size"] and cfg["hidden_size"] == args["hidden_dim"]
    assert cfg["num_layers"] == args["num_layers"] and cfg["ff_size"] == args["ff_dim"]
    assert cfg["compression"] == args["hidden_dim"] // args["compression_factor"]
    assert cfg["flavor"] == "bsbr-0.1.1" and cfg["max_positions"] is None


def test_state_dict_keys_are_the_packages():
    sd = load_file(FIXTURE / "model.safetensors")
    model = load_model_from(sd)
    assert sorted(model.state_dict()) == sorted(sd)  # safetensors stores keys sorted
    assert "pos_encoding.pe" in sd and "layers.0.ff.3.bias" in sd


def load_model_from(sd) -> UpstreamBSBRModel:
    from bsbr_export.model.upstream import infer_config

    info = fixture_info()
    model = UpstreamBSBRModel(infer_config(sd, int(info["import"][1]), int(info["import"][3])))
    model.load_state_dict(sd)
    return model.eval()


@pytest.fixture(scope="module")
def fixture_export(fixture_dir, tmp_path_factory):
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    out = tmp_path_factory.mktemp("upstream-export") / "exp"
    result = export_model(fixture_dir, out, [FORMATS["onnx"], FORMATS["torchscript"]])
    assert result.passed
    return out


def run_artifacts(export_dir: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime and TorchScript outputs of an export directory for `ids`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    onnx_out = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    traced = torch.jit.load(str(export_dir / "model.pt"))
    with torch.no_grad():
        ts_out = traced(torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.int64)).numpy()
    return {"onnx": onnx_out, "torchscript": ts_out}


def test_fixture_export_matches_package_outputs(fixture_export):
    manifest = json.loads((fixture_export / "manifest.json").read_text())
    assert manifest["causal"] is False and "NOT causal" in manifest["note"]
    expected = load_file(FIXTURE / "expected.safetensors")
    for length in fixture_info()["lengths"]:  # the export example was 2c + c/2 = 10 tokens
        outs = run_artifacts(fixture_export, expected[f"ids.{length}"].numpy())
        for engine, got in outs.items():
            err = np.abs(got - expected[f"hidden.{length}"].numpy()).max()
            assert err <= ATOL, (engine, length, err)


def test_validate_names_the_upstream_layer(fixture_export, tmp_path):
    import shutil

    import onnx
    from onnx import numpy_helper

    from bsbr_export.proof.validate import validate_export

    broken = tmp_path / "broken"
    shutil.copytree(fixture_export, broken)
    proto = onnx.load(str(broken / "model.onnx"))
    init = weight_used_only_in(proto, "model.layers.1", "layers")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3.0, init.name))
    onnx.save(proto, str(broken / "model.onnx"))
    rehash(broken, "model.onnx")
    result = validate_export(broken, lengths=[9], batches=(1,))
    check = next(c for c in result.checks if c.artifact == "model.onnx")
    assert not check.passed and check.first_bad_layer == "layers.1"
    assert [d.layer for d in check.layers][:2] == ["layers.0", "layers.1"] and check.layers[0].passed


def test_validate_and_no_streaming_on_export(fixture_dir, fixture_export, capsys):
    assert main(["validate", str(fixture_export), "--lengths", "1,3,4,9,300", "--batches", "1,3"]) == 0
    one_line_error(
        capsys,
        ["export", str(fixture_dir), "--out", str(fixture_export.parent / "s"), "--streaming"],
        "not causal",
        "drop --streaming",
    )
    assert not (fixture_export.parent / "s").exists()


# ---------------------------------------------------------------------------
# Behaviour that is the package's on purpose


def test_not_causal_and_mask_ignored(fixture_dir):
    model = load_model(fixture_dir)
    c = model.config.chunk_size
    ids = torch.randint(0, model.config.vocab_size, (1, 3 * c + 1), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.config.vocab_size
    base, moved = hidden(model, ids), hidden(model, changed)
    assert (base[0, 0] - moved[0, 0]).abs().max() > 1e-4  # a later token moves the first output
    with torch.no_grad():
        masked = model(ids, torch.zeros_like(ids))
    assert torch.equal(masked, base)


def test_positional_limit_and_extension(fixture_dir, tmp_path, capsys):
    model = load_model(fixture_dir)
    ids = torch.zeros(1, 5001, dtype=torch.int64)
    with pytest.raises(UserError, match="max_positions"):
        model(ids)
    hidden(model, ids[:, :5000])  # the package's own limit works
    out = import_cli(FIXTURE / "model.safetensors", tmp_path / "long", 2, 4, "--max-positions", "6000")
    long = load_model(out)
    assert long.pos_encoding.rows == 6000
    assert torch.equal(long.pos_encoding.pe, model.pos_encoding.pe)  # the checkpoint's buffer
    got = hidden(long, ids)
    assert got.shape == (1, 5001, model.config.hidden_size) and torch.isfinite(got).all()
    # Within the package's limit the extended model is the same model.
    assert torch.allclose(hidden(long, ids[:, :4999]), hidden(model, ids[:, :4999]), atol=0, rtol=0)


def test_sinusoid_extension_matches_package_table():
    bsbr = pytest.importorskip("bsbr")
    from bsbr.bsbr import PositionalEncoding

    for dim in (8, 30, 256):
        assert torch.equal(PositionalEncoding(dim, 0.0).pe[0], sinusoid_table(5000, dim))
        assert torch.equal(PositionalEncoding(dim, 0.0, max_len=9000).pe[0], sinusoid_table(9000, dim))
    assert bsbr.BSBRModel  # the package itself is importable


def test_config_flavor_validation():
    with pytest.raises(UserError, match="flavor must be one of"):
        BSBRConfig(flavor="bsbr-0.2")
    with pytest.raises(UserError, match="max_positions applies"):
        BSBRConfig(max_positions=6000)
    with pytest.raises(UserError, match="no LM head"):
        BSBRConfig(flavor="bsbr-0.1.1")
    with pytest.raises(UserError, match=">= 5000"):
        BSBRConfig(flavor="bsbr-0.1.1", lm_head=False, max_positions=100)
    cfg = BSBRConfig(flavor="bsbr-0.1.1", lm_head=False, max_positions=8000)
    assert BSBRConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert BSBRConfig().causal and not cfg.causal


def test_run_and_streaming_refused(fixture_dir, capsys):
    one_line_error(capsys, ["run", str(fixture_dir)], "not causal")
    model = load_model(fixture_dir)
    with pytest.raises(UserError, match="cannot stream"):
        model.init_state(1)


# ---------------------------------------------------------------------------
# Bad input: one line, exit 2


@pytest.fixture
def fixture_sd() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "model.safetensors")


def test_missing_extra_and_wrong_keys(fixture_sd, tmp_path, capsys):
    sd = dict(fixture_sd)
    del sd["layers.1.attention.meta_h_proj.bias"]
    sd["layers.0.attention.gate.weight"] = torch.zeros(2)
    sd["layers.0.ff.3.weight"] = torch.zeros(8, 17)
    path = tmp_path / "bad.safetensors"
    save_file(sd, path)
    one_line_error(
        capsys,
        ["import-upstream", str(path), "--heads", "2", "--chunk-size", "4", "--out", str(tmp_path / "o")],
        "missing layers.1.attention.meta_h_proj.bias",
        "unexpected layers.0.attention.gate.weight",
        "layers.0.ff.3.weight [8, 17] != [8, 16]",
    )
    assert not (tmp_path / "o").exists()


def test_native_checkpoint_is_refused(tmp_path, capsys):
    from bsbr_export.model.checkpoint import save_model
    from bsbr_export.model.zoo import get_preset

    save_model(load_model("bsbr-tiny"), tmp_path / "native")
    assert get_preset("bsbr-tiny")
    one_line_error(
        capsys,
        ["import-upstream", str(tmp_path / "native" / "model.safetensors"), "--heads", "2", "--chunk-size", "4"],
        "cannot import as a bsbr 0.1.1 BSBRModel",
        "no layers.N.* keys",
        "look like a bsbr-export checkpoint",
    )


def test_heads_must_divide_hidden(capsys):
    one_line_error(
        capsys,
        ["import-upstream", str(FIXTURE / "model.safetensors"), "--heads", "3", "--chunk-size", "4"],
        "--heads 3 does not divide hidden size 8",
    )


def test_wrong_heads_named_by_compression(capsys):
    one_line_error(
        capsys,
        ["import-upstream", str(FIXTURE / "model.safetensors"), "--heads", "4", "--chunk-size", "4"],
        "pass --heads 2",
    )


def test_pickle_needing_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"embedding.weight": torch.zeros(2, 2), "x": Path("/")}, f)
    one_line_error(
        capsys, ["import-upstream", str(path), "--heads", "1", "--chunk-size", "2"], "refusing to load", "weights_only"
    )


def test_wrong_pe_values_are_refused(fixture_sd, tmp_path, capsys):
    sd = dict(fixture_sd)
    sd["pos_encoding.pe"] = torch.zeros_like(sd["pos_encoding.pe"])
    path = tmp_path / "pe.pt"
    torch.save(sd, path)
    one_line_error(
        capsys,
        ["import-upstream", str(path), "--heads", "2", "--chunk-size", "4"],
        "pos_encoding.pe is not the package's sinusoid table",
    )


# ---------------------------------------------------------------------------
# Against the real package (skipped cleanly when it is not installed)

PACKAGE_CONFIGS = [
    # heads, chunk, compression_factor, layers, hidden, suffix
    pytest.param(4, 8, None, 2, 32, ".pt", id="h4-c8-plain-2l"),
    pytest.param(4, 8, 4, 2, 32, ".safetensors", id="h4-c8-cf4-2l"),
    pytest.param(2, 5, None, 1, 16, ".bin", id="h2-c5-plain-1l"),
    pytest.param(8, 16, 2, 3, 64, ".pt", id="h8-c16-cf2-3l"),
    pytest.param(1, 1, None, 1, 8, ".safetensors", id="h1-c1-plain-1l"),
    pytest.param(4, 3, 8, 3, 32, ".pt", id="h4-c3-cf8-3l"),
    pytest.param(2, 64, 16, 2, 64, ".safetensors", id="h2-c64-cf16-2l"),
]


def package_model(heads, chunk, cf, layers, hidden_dim, seed=0):
    bsbr = pytest.importorskip("bsbr")
    torch.manual_seed(seed)
    model = bsbr.BSBRModel(
        vocab_size=97,
        hidden_dim=hidden_dim,
        num_layers=layers,
        num_heads=heads,
        chunk_size=chunk,
        ff_dim=2 * hidden_dim,
        dropout=0.1,
        compression_factor=cf,
    ).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_(0.0, 0.5)
    return model


def save_state(model, path: Path) -> Path:
    state = model.state_dict()
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


def lengths_for(chunk: int) -> list[int]:
    return sorted({1, 2, max(chunk - 1, 1), chunk, chunk + 1, 2 * chunk - 1, 3 * chunk + 2, 5 * chunk, 97, 301})


@pytest.mark.parametrize("heads, chunk, cf, layers, hidden_dim, suffix", PACKAGE_CONFIGS)
def test_matches_package(heads, chunk, cf, layers, hidden_dim, suffix, tmp_path):
    upstream = package_model(heads, chunk, cf, layers, hidden_dim)
    ckpt = save_state(upstream, tmp_path / f"up{suffix}")
    model = load_model(import_cli(ckpt, tmp_path / "ours", heads, chunk))
    assert list(model.state_dict()) == list(upstream.state_dict())  # same keys, same order
    assert model.config.compression == (hidden_dim // cf if cf else None)
    worst = 0.0
    generator = torch.Generator().manual_seed(1)
    for length in lengths_for(chunk):
        for batch in (1, 3):
            ids = torch.randint(0, 97, (batch, length), generator=generator)
            want = hidden(upstream, ids)
            got = hidden(model, ids)
            assert got.shape == want.shape
            worst = max(worst, (got - want).abs().max().item())
    MAX_ERR[f"{heads}-{chunk}-{cf}-{layers}"] = worst
    assert worst <= ATOL


def test_matches_package_at_the_limit(tmp_path):
    upstream = package_model(4, 64, 4, 1, 32)
    model = load_model(import_cli(save_state(upstream, tmp_path / "up.pt"), tmp_path / "o", 4, 64))
    ids = torch.randint(0, 97, (1, 5000), generator=torch.Generator().manual_seed(2))
    assert (hidden(model, ids) - hidden(upstream, ids)).abs().max().item() <= ATOL


def test_exports_match_package_at_unseen_lengths(tmp_path):
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    upstream = package_model(4, 8, 4, 2, 32, seed=3)
    ours = import_cli(save_state(upstream, tmp_path / "up.safetensors"), tmp_path / "ours", 4, 8)
    out = tmp_path / "exp"
    assert export_model(ours, out, [FORMATS["onnx"], FORMATS["torchscript"]]).passed
    generator = torch.Generator().manual_seed(4)
    for batch, length in [(1, 1), (3, 7), (2, 8), (1, 9), (3, 37), (2, 515), (1, 4999)]:  # example was 2 x 20
        ids = torch.randint(0, 97, (batch, length), generator=generator)
        want = hidden(upstream, ids).numpy()
        for engine, got in run_artifacts(out, ids.numpy()).items():
            err = float(np.abs(got - want).max())
            MAX_ERR[f"export-{engine}-{length}"] = err
            assert err <= ATOL, (engine, batch, length, err)


def test_train_mode_without_dropout_matches_package(tmp_path):
    # dropout p = 0 in train mode is eval mode in the package; our imported config has p = 0.
    upstream = package_model(2, 4, 2, 2, 16)
    model = load_model(import_cli(save_state(upstream, tmp_path / "up.pt"), tmp_path / "o", 2, 4)).train()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))
    assert (hidden(model, ids) - hidden(upstream, ids)).abs().max().item() <= ATOL


def test_report_max_error():
    pytest.importorskip("bsbr")
    if MAX_ERR:
        print(f"\nmax abs error vs bsbr 0.1.1 over {len(MAX_ERR)} configs/engines: {max(MAX_ERR.values()):.2e}")
