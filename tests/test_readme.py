"""README.md runs top to bottom: its Deploy blocks, in order, in a fresh copy of the repo.

Blocks marked `<!-- readme-test -->` (or `<!-- readme-test: needs TOOL ... -->`) run
with bash in a copy of the repository, the test's virtual environment first on PATH (as
the README's activated venv), and must write nothing outside `export/` and `build/`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"<!-- readme-test(?::\s*needs ([^>]*?))?\s*-->\n```bash\n(.*?)```", re.DOTALL)
# What a fresh clone does not have, and what the blocks may write.
NOT_COPIED = (
    ".venv",
    ".venv-triton",
    ".git",
    "export",
    "build",
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    "*.egg-info",
)
OUTPUTS = ("export", "build", "samples/node/node_modules", "web/node_modules")


def readme_blocks() -> list[tuple[list[str], str]]:
    """(tools the block needs, its commands) for every marked block, in README order."""
    return [((needs or "").split(), body) for needs, body in MARKED.findall((ROOT / "README.md").read_text())]


def files_under(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not any(str(p.relative_to(root)).startswith(o + os.sep) for o in OUTPUTS)
    }


def test_readme_marks_its_blocks_and_stays_inside_the_repo():
    assert len(readme_blocks()) >= 5, "the Deploy section's runnable blocks lost their <!-- readme-test --> markers"
    text = (ROOT / "README.md").read_text()
    assert "../" not in text, "README.md points outside the repository"
    for link in re.findall(r"\]\(([^)#:]+)\)", text):  # relative links name files that exist
        assert (ROOT / link).exists(), link


def test_readme_deploy_blocks_run_in_order(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*NOT_COPIED))
    before = files_under(copy)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    skipped = []
    for needs, body in readme_blocks():
        missing = [tool for tool in needs if not shutil.which(tool)]
        if missing:
            assert not os.environ.get("CI"), f"CI must have {', '.join(missing)} for this README block:\n{body}"
            skipped.append(f"{', '.join(missing)} missing")
            continue
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", body], cwd=copy, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"README block failed:\n{body}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    written = files_under(copy) - before
    assert not written, f"README blocks wrote outside export/ and build/: {sorted(written)}"
    assert (copy / "build" / "logits.npy").is_file() or skipped
    if skipped:
        pytest.skip(f"some README blocks did not run: {'; '.join(skipped)}")


def test_readme_own_model_example_runs(tmp_path):
    """ "Your own model": the README's `my_model.py` and the Python that exports it, verbatim."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    model_file = next(b for b in blocks if b.startswith("# my_model.py"))
    usage = next(b for b in blocks if "from my_model import build" in b)
    (tmp_path / "my_model.py").write_text(model_file)
    (tmp_path / "use.py").write_text(usage)
    done = subprocess.run(
        [sys.executable, "use.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert "chunk_size=16" in done.stdout  # the printed spec: c read from the layers
    assert {"model.onnx", "model.pt", "model.streaming.onnx", "manifest.json"} <= {
        p.name for p in (tmp_path / "export" / "my-decoder").iterdir()
    }
