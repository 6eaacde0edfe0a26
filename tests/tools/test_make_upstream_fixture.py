"""tools/make_upstream_fixture.py: regenerated from the real package, the fixture equals the
committed one, so tests/fixtures/upstream/ is what the tool makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURE = Path(__file__).parents[1] / "fixtures" / "upstream"


def test_make_upstream_fixture_regenerates_the_committed_fixture(run_study, tmp_path):
    """The fixture made again from bsbr 0.1.1 has the committed files, arguments and tensors."""
    pytest.importorskip("bsbr")
    info, report = run_study("make_upstream_fixture", name="fixture")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in FIXTURE.iterdir())
    committed = json.loads((FIXTURE / "fixture.json").read_text())
    for key in ("bsbr", "constructor", "lengths", "seed", "import"):  # not torch: a newer one still counts
        assert info[key] == committed[key], key
    for name in ("model.safetensors", "expected.safetensors"):
        made, kept = load_file(tmp_path / name), load_file(FIXTURE / name)
        assert made.keys() == kept.keys(), name
        for key in kept:
            torch.testing.assert_close(made[key], kept[key], msg=lambda m, at=f"{name} {key}": f"{at}: {m}")
    assert f"| hidden_dim | {committed['constructor']['hidden_dim']} |" in report
