"""Every bad input a new user tried: one line on stderr, exit 2, and (where it can be
checked up front) nothing written and no work done.

Each row builds its input in a temp dir and names the command line; `where` says how
it runs: in-process, in a subprocess (warnings reach stderr as a user sees them), or
under a private mount namespace that makes a directory read-only or tiny (real EROFS
and ENOSPC, needs root's `unshare`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_config

from bsbr_export import build_model, save_model


def _checkpoint(tmp: Path, config_bytes: bytes | None = None, nan: bool = False) -> Path:
    """A checkpoint dir of a tiny model; its config.json replaced by `config_bytes`."""
    model = build_model(tiny_config())
    if nan:
        with torch.no_grad():
            model.blocks[1].ff[0].weight[0, 0] = float("nan")
    directory = save_model(model, tmp / "ckpt")
    if config_bytes is not None:
        (directory / "config.json").write_bytes(config_bytes)
    return directory


def _damaged_manifest(export: Path, damage) -> Path:
    manifest = json.loads((export / "manifest.json").read_text())
    damage(manifest)
    (export / "manifest.json").write_text(json.dumps(manifest))
    return export


def _raw_pickle(tmp: Path) -> Path:
    import pickle

    path = tmp / "model.bin"
    path.write_bytes(pickle.dumps({"embedding.weight": [1.0, 2.0]}))  # pickle, not torch.save
    return path


def _repo_holding_model(tmp: Path) -> Path:
    (tmp / "repo" / "bsbr-tiny").mkdir(parents=True)
    (tmp / "repo" / "bsbr-tiny" / "config.pbtxt").write_text("kept")
    return tmp / "repo"


IN_PROCESS, SUBPROCESS, READ_ONLY, TINY_DISK = "in-process", "subprocess", "read-only", "tiny-disk"

# kind -> (how it runs, argv builder (tmp, export) -> args, message fragment)
CASES = {
    "config.json not UTF-8": (IN_PROCESS, lambda t, e: ["run", _checkpoint(t, b"\xff\xfe{}")], "is not UTF-8"),
    "vocab_size 1e10": (
        IN_PROCESS,
        lambda t, e: ["run", _checkpoint(t, b'{"vocab_size": 10000000000}')],
        "more than this machine's",
    ),
    "vocab_size as float 1e10": (
        IN_PROCESS,
        lambda t, e: ["run", _checkpoint(t, b'{"vocab_size": 1e10}')],
        "vocab_size must be a positive integer",
    ),
    "manifest artifact without files": (
        IN_PROCESS,
        lambda t, e: ["validate", _damaged_manifest(e, lambda m: m["artifacts"][0].pop("files"))],
        "'files' must map",
    ),
    "manifest file without sha256": (
        IN_PROCESS,
        lambda t, e: [
            "validate",
            _damaged_manifest(e, lambda m: next(iter(m["artifacts"][0]["files"].values())).pop("sha256")),
        ],
        "has no sha256",
    ),
    "manifest artifacts as strings": (
        IN_PROCESS,
        lambda t, e: [
            "validate",
            _damaged_manifest(e, lambda m: m.update(artifacts=[a["name"] for a in m["artifacts"]])),
        ],
        "must be an object",
    ),
    "--out /proc/x": (IN_PROCESS, lambda t, e: ["export", "bsbr-tiny", "--out", "/proc/x"], "cannot write to /proc"),
    "bench --threads 0": (IN_PROCESS, lambda t, e: ["bench", e, "--threads", "0"], "--threads"),
    "bench --threads -1": (IN_PROCESS, lambda t, e: ["bench", e, "--threads", "-1"], "--threads"),
    "bench --budget -1": (IN_PROCESS, lambda t, e: ["bench", e, "--budget", "-1"], "--budget"),
    "bench --batch 0": (IN_PROCESS, lambda t, e: ["bench", e, "--batch", "0"], "--batch"),
    "optimize --target-top1 -1": (IN_PROCESS, lambda t, e: ["optimize", e, "--target-top1", "-1"], "--target-top1"),
    "optimize --target-top1 2": (IN_PROCESS, lambda t, e: ["optimize", e, "--target-top1", "2"], "--target-top1"),
    "optimize --threads 0": (IN_PROCESS, lambda t, e: ["optimize", e, "--threads", "0"], "--threads"),
    "--triton-repo is a file": (
        IN_PROCESS,
        lambda t, e: [
            "export",
            "bsbr-tiny",
            "--out",
            t / "x",
            "--format",
            "onnx",
            "--triton-repo",
            (t / "file", (t / "file").write_text("mine"))[0],
        ],
        "is a file",
    ),
    "--triton-repo holds the model": (
        IN_PROCESS,
        lambda t, e: [
            "export",
            "bsbr-tiny",
            "--out",
            t / "x",
            "--format",
            "onnx",
            "--triton-repo",
            _repo_holding_model(t),
        ],
        "already exists: pass --force",
    ),
    "triton-repo onto a file": (
        IN_PROCESS,
        lambda t, e: ["triton-repo", e, (t / "file", (t / "file").write_text("mine"))[0]],
        "is a file",
    ),
    "triton-repo of a directory that is no export": (
        IN_PROCESS,
        lambda t, e: ["triton-repo", t, t / "repo"],
        "manifest.json",
    ),
    "NaN weights": (IN_PROCESS, lambda t, e: ["run", _checkpoint(t, nan=True)], "NaN or infinite weights"),
    "raw pickle .bin": (
        SUBPROCESS,
        lambda t, e: ["import-upstream", _raw_pickle(t), "--heads", "4", "--chunk-size", "8", "--out", t / "imported"],
        "refusing to load",
    ),
    "validate on a read-only export": (READ_ONLY, lambda t, e: ["validate", e], "Read-only file system"),
    "bench on a read-only export": (
        READ_ONLY,
        lambda t, e: ["bench", e, "--lengths", "8", "--decode", ""],
        "Read-only file system",
    ),
    "optimize on a read-only export": (READ_ONLY, lambda t, e: ["optimize", e], "Read-only file system"),
    "export onto a full disk": (
        TINY_DISK,
        lambda t, e: ["export", "bsbr-tiny", "--out", t / "disk" / "x", "--format", "onnx"],
        "No space left on device",
    ),
}


def _namespace_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    return (
        subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True).returncode == 0
    )


def _run_subprocess(args: list, mount: str = "", after: str = "") -> tuple[int, str, str]:
    """Run the CLI in a fresh process; with `mount`, in a private mount namespace set up
    by that shell command, running `after` there before the namespace goes away."""
    command = [sys.executable, "-m", "bsbr_export.cli", *map(str, args)]
    if mount:
        command = [
            "unshare",
            "-m",
            "sh",
            "-c",
            f'{mount} || exit 99; "$@"; rc=$?; {after or ":"}; exit $rc',
            "sh",
            *command,
        ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def _tree(path: Path) -> dict[str, int | None]:
    """Every path under `path`, with the mtime of files (a probe for writability touches
    a directory's own mtime, and leaves nothing)."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns if p.is_file() else None for p in path.rglob("*")}


@pytest.fixture
def onnx_copy(tiny_onnx_export, tmp_path):
    """A private copy of an ONNX-only bsbr-tiny export (each case may damage it)."""
    copy = tmp_path / "export"
    shutil.copytree(tiny_onnx_export, copy)
    return copy


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, onnx_copy, kind):
    where, make_args, message = CASES[kind]
    export_copy = onnx_copy
    work = tmp_path / "work"
    work.mkdir()
    if where in (READ_ONLY, TINY_DISK) and not _namespace_ok():
        pytest.skip("needs `unshare -m` with mount rights (root) for a real read-only / full filesystem")
    if where == TINY_DISK:
        (work / "disk").mkdir()
    args = make_args(work, export_copy)
    before = _tree(export_copy), _tree(work)
    if where == IN_PROCESS:
        code, _, err = run_cli(capsys, *args)
    elif where == SUBPROCESS:
        code, _, err = _run_subprocess(args)
    elif where == READ_ONLY:
        code, _, err = _run_subprocess(
            args, f"mount --bind {export_copy} {export_copy} && mount -o remount,bind,ro {export_copy}"
        )
    else:
        code, _, err = _run_subprocess(
            args,
            f"mount -t tmpfs -o size=64k tmpfs {work / 'disk'}",
            after=f"ls -A {work / 'disk'} > {tmp_path / 'left.txt'}",
        )
    assert code == 2, err
    if where == TINY_DISK:  # found while writing: progress lines may come first, the error is the last line
        err = err.splitlines()[-1] + "\n"
    assert err.count("\n") == 1 and err.startswith("bsbr-export: error:"), err
    assert message.lower() in err.lower(), err
    if where != TINY_DISK:  # checked up front: nothing written, nothing left behind
        assert (_tree(export_copy), _tree(work)) == before
    else:  # what the full disk held when the command ended: nothing, not even a temp dir
        assert (tmp_path / "left.txt").read_text() == ""
