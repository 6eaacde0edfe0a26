"""Shared fixtures: tiny configs and models, seeded random inputs."""

from __future__ import annotations

import json

import pytest
import torch

from bsbr_export import BSBRConfig, build_model

# The lengths where chunked code breaks: one token, around one chunk, a ragged tail.
EDGE_LENGTHS = {
    "1": lambda c: 1,
    "c-1": lambda c: max(c - 1, 1),
    "c": lambda c: c,
    "c+1": lambda c: c + 1,
    "3c+5": lambda c: 3 * c + 5,
}

TINY = dict(vocab_size=61, hidden_size=16, num_layers=2, num_heads=2, chunk_size=4, ff_size=32)


def tiny_config(**overrides) -> BSBRConfig:
    """A config small enough for float64 property tests."""
    return BSBRConfig(**{**TINY, **overrides})


def random_ids(config: BSBRConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids drawn from their own generator, so tests never share RNG state."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run `bsbr-export ARGS` in-process: (exit status, stdout, stderr)."""
    from bsbr_export.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(params=[None, 5], ids=["plain", "compressed"])
def tiny_model(request):
    """A float64 tiny model, with and without chunk-state compression."""
    return build_model(tiny_config(compression=request.param), seed=1).double()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """bsbr-tiny exported once per session: ONNX + TorchScript, full and streaming."""
    from bsbr_export.formats import FORMATS
    from bsbr_export.pipeline import export_model

    out = tmp_path_factory.mktemp("exports") / "bsbr-tiny"
    result = export_model("bsbr-tiny", out, list(FORMATS.values()), streaming=True)
    return out, result


@pytest.fixture(scope="session")
def compressed_export(tmp_path_factory):
    """bsbr-tiny-compressed exported once per session (ONNX only, full and streaming)."""
    from bsbr_export.formats import FORMATS
    from bsbr_export.pipeline import export_model

    out = tmp_path_factory.mktemp("exports") / "bsbr-tiny-compressed"
    result = export_model("bsbr-tiny-compressed", out, [FORMATS["onnx"]], streaming=True)
    return out, result


@pytest.fixture(scope="session")
def tiny_onnx_export(tmp_path_factory):
    """bsbr-tiny exported once per session as model.onnx alone: the cheapest real export dir."""
    from bsbr_export.formats import FORMATS
    from bsbr_export.pipeline import export_model

    out = tmp_path_factory.mktemp("exports") / "bsbr-tiny-onnx"
    export_model("bsbr-tiny", out, [FORMATS["onnx"]])
    return out


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    """A private copy of the session's bsbr-tiny export, for tests that change it."""
    import shutil

    out, _ = tiny_export
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    return copy


def rehash(directory, name):
    """Record a file's new hash, as a broken exporter would have."""
    from bsbr_export.manifest import sha256

    manifest = json.loads((directory / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        if name in artifact["files"]:
            artifact["files"][name]["sha256"] = sha256(directory / name)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def weight_used_only_in(proto, scope: str, block_path: str = "blocks"):
    """An initializer (matrix) that only nodes of `scope` read (equal constants are shared)."""
    from bsbr_export.localize import block_scope

    readers = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(block_scope(node, block_path))
    return next(
        i for i in proto.graph.initializer if len(i.dims) == 2 and readers.get(i.name) == {scope}
    )
