"""Atomic writers: a run killed mid-export leaves nothing that a later run keeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bsbr_export.errors import UserError
from bsbr_export.io import STAGING_MARKER, atomic_dir, remove_stale_staging


def _staging_dirs(parent):
    return [p for p in parent.glob(".*.tmp") if p.is_dir()]


def test_sigkilled_export_leaves_a_temp_dir_that_the_next_run_removes(tmp_path):
    out = tmp_path / "exp"
    export = subprocess.Popen(
        [sys.executable, "-m", "bsbr_export.cli", "export", "bsbr-tiny", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    # Kill it once it is writing artifacts into its staging dir (its checkpoint is there).
    while not any((d / "model.safetensors").is_file() for d in _staging_dirs(tmp_path)):
        assert export.poll() is None, "the export ended before it could be killed"
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.05)
    export.send_signal(signal.SIGKILL)
    export.wait()
    (left,) = _staging_dirs(tmp_path)
    assert (left / STAGING_MARKER).read_text().strip() == str(export.pid)
    assert not out.exists()
    # Someone else's hidden .tmp dir and a live writer's (this process) are not ours to remove.
    foreign = tmp_path / ".photos.tmp"
    foreign.mkdir()
    (foreign / "keep.jpg").write_text("mine")
    live = tmp_path / ".other.live.tmp"
    live.mkdir()
    (live / STAGING_MARKER).write_text(f"{os.getpid()}\n")

    with atomic_dir(out) as staging:
        (staging / "x").write_text("done")
    assert not left.exists()
    assert (foreign / "keep.jpg").read_text() == "mine" and live.is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["x"]  # the marker is not published
    assert set(_staging_dirs(tmp_path)) == {foreign, live}


def test_a_marker_that_is_not_a_pid_is_left_alone(tmp_path):
    odd = tmp_path / ".x.abc.tmp"
    odd.mkdir()
    (odd / STAGING_MARKER).write_text("not a pid")
    assert remove_stale_staging(tmp_path) == [] and odd.is_dir()


def test_failed_body_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_inside_the_body_names_the_path(tmp_path):
    with pytest.raises(UserError, match=r"cannot write .*d: No space left on device"), atomic_dir(tmp_path / "d"):
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
