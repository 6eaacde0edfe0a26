"""The command line: exit codes and one-line errors."""

from __future__ import annotations

import pytest
from conftest import run_cli

from bsbr_export.model.zoo import list_presets


def test_models_lists_every_preset(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    for name in ("bsbr-tiny", "bsbr-small", "bsbr-base", "bsbr-small-compressed"):
        assert name in out
    assert set(list_presets()) >= {"bsbr-tiny", "bsbr-small", "bsbr-base"}


def test_models_shows_one(capsys):
    code, out, _ = run_cli(capsys, "models", "bsbr-small")
    assert code == 0 and "256" in out and "bsbr-base" not in out


def test_run_preset(capsys):
    code, out, _ = run_cli(capsys, "run", "bsbr-tiny", "--length", "21")
    assert code == 0
    assert "equal" in out and "2 x 21 x 97" in out


@pytest.mark.parametrize(
    "args",
    [
        ("models", "bsbr-nope"),
        ("run", "bsbr-nope"),
        ("run", "./no/such/dir"),
        ("run", "bsbr-tiny", "--length", "0"),
        ("no-such-command",),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, args):
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bsbr-export: error:")


def test_bad_checkpoint_dir(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 30, "num_heads": 4}')
    code, _, err = run_cli(capsys, "run", str(tmp_path))
    assert code == 2 and "not divisible by num_heads" in err
