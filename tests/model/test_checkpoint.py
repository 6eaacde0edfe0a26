from __future__ import annotations

import collections
import json

import pytest
import torch
from conftest import random_ids, tiny_config

from bsbr_export import UserError, build_model, load_model, save_model
from bsbr_export.model.checkpoint import load_state_dict


def test_preset_weights_are_reproducible_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("bsbr-tiny")
    after = torch.rand(1)
    b = load_model("bsbr-tiny")
    assert torch.equal(before, after)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_round_trip(tmp_path):
    model = build_model(tiny_config(compression=5), seed=4)
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    ids = random_ids(model.config, 2, 13)
    assert torch.equal(loaded(ids), model(ids))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_save_refuses_non_empty_dir_unless_overwrite(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        save_model(build_model(tiny_config()), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "keep.txt").exists()
    save_model(build_model(tiny_config()), tmp_path / "ckpt", overwrite=True)
    assert not (tmp_path / "ckpt" / "keep.txt").exists()


def test_pickled_state_dict_loads_with_weights_only(tmp_path):
    model = build_model(tiny_config())
    torch.save(model.state_dict(), tmp_path / "model.pt")
    state = load_state_dict(tmp_path / "model.pt")
    assert set(state) == set(model.state_dict())


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    torch.save({"w": torch.zeros(1), "evil": Payload()}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="refusing to load .*code execution"):
        load_state_dict(tmp_path / "model.pt")
    assert "code ran" not in capsys.readouterr().out


def test_tensors_not_matching_config_listed(tmp_path):
    save_model(build_model(tiny_config()), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["hidden_size"] = 32
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match its config: wrong shapes"):
        load_model(tmp_path / "ckpt")


def test_missing_and_extra_keys_listed(tmp_path):
    model = build_model(tiny_config())
    state = collections.OrderedDict(model.state_dict())
    state.pop("ln_f.weight")
    state["surprise"] = torch.zeros(1)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(state, tmp_path / "ckpt" / "model.pt")
    with pytest.raises(UserError, match="missing ln_f.weight; unexpected surprise"):
        load_model(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "nope", "does not exist"),
        (lambda d: d, "config.json is missing"),
        (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", "is a file"),
    ],
)
def test_bad_paths(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        load_model(make(tmp_path))


def test_unknown_preset_suggests_close_names():
    with pytest.raises(UserError, match="did you mean bsbr-tiny"):
        load_model("bsbr-tinny")


def test_not_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_state_dict(tmp_path / "model.safetensors")


@pytest.mark.parametrize("ref", [None, 3, ["bsbr-tiny"]])
def test_load_model_of_something_that_is_not_a_name_or_path(ref):
    with pytest.raises(UserError, match="load_model takes a preset name or a checkpoint directory"):
        load_model(ref)
