"""MODULE_REF resolution: every way a reference can be wrong is one line and exit 2."""

from __future__ import annotations

import pytest
from conftest import run_cli
from torch import nn

from bsbr_export import UserError
from bsbr_export.model.usercode import build_module, load_factory

FILE = """
from torch import nn

def make():
    return nn.Linear(4, 4)

def not_a_module():
    return "a string"

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "usermodel.py"
    path.write_text(FILE)
    return path


def test_file_and_package_references_resolve(user_file):
    assert isinstance(build_module(f"{user_file}:make", trust_code=True), nn.Linear)
    factory = load_factory("bsbr_export.nn:BSBRAttention", trust_code=True)
    assert isinstance(factory(hidden_size=8, num_heads=2, chunk_size=4), nn.Module)


@pytest.mark.parametrize(
    "ref, trust, message",
    [
        ("{file}:make", False, "pass --trust-code"),
        ("{file}", True, "is not path/to/file.py:factory"),
        ("{dir}/missing.py:make", True, "no such file"),
        ("no_such_package_xyz.models:make", True, "no module named 'no_such_package_xyz'"),
        ("{file}:mkae", True, "has no attribute 'mkae': did you mean 'make'"),
        ("{file}:NOT_CALLABLE", True, "is a int, not a callable"),
        ("{file}:not_a_module", True, "returned a str, not a torch.nn.Module"),
    ],
)
def test_bad_reference_is_one_user_error(user_file, ref, trust, message):
    ref = ref.format(file=user_file, dir=user_file.parent)
    with pytest.raises(UserError, match=message):
        build_module(ref, trust_code=trust)


@pytest.mark.parametrize(
    "ref, flags",
    [
        ("{file}:make", []),
        ("{dir}/missing.py:make", ["--trust-code"]),
        ("no_such_package_xyz:make", ["--trust-code"]),
        ("{file}:nothing", ["--trust-code"]),
        ("{file}:NOT_CALLABLE", ["--trust-code"]),
        ("{file}:not_a_module", ["--trust-code"]),
    ],
)
def test_doctor_cli_bad_reference_exits_2_with_one_line(capsys, user_file, ref, flags):
    code, out, err = run_cli(capsys, "doctor", ref.format(file=user_file, dir=user_file.parent), *flags)
    assert code == 2
    assert err.startswith("bsbr-export: error: ") and len(err.strip().splitlines()) == 1
    assert out == ""
