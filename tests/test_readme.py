"""README.md and its guides in docs/ run top to bottom, in a fresh copy of the repo.

The pages are read in the order of `PAGES`: README.md, then docs/your-model.md,
docs/formats.md (the Deploy blocks), docs/serving.md, docs/accuracy.md and docs/layout.md.
Blocks marked `<!-- readme-test -->` (or `<!-- readme-test: needs TOOL ... -->`) run, in
that order, with bash in a copy of the repository, the test's virtual environment first on
PATH (as the README's activated venv), and must write nothing outside `export/` and
`build/`; a block may use what an earlier one wrote (`export/onnx`). Every page's relative
links (docs/ pages' relative to docs/) name files that exist, and the `my_model.py` example
of docs/your-model.md runs verbatim.
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
# Read in this order: a marked block may use what the blocks before it wrote.
PAGES = (
    "README.md",
    "docs/your-model.md",
    "docs/formats.md",
    "docs/serving.md",
    "docs/accuracy.md",
    "docs/layout.md",
)
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
# A relative link's file part (an anchor after it, or none); links with a scheme are skipped.
LINK = re.compile(r"\]\(([^)#:]+)(?:#[^)]*)?\)")


def readme_blocks() -> list[tuple[str, list[str], str]]:
    """(page, tools the block needs, its commands) for every marked block of every page, in order."""
    return [
        (page, (needs or "").split(), body)
        for page in PAGES
        for needs, body in MARKED.findall((ROOT / page).read_text())
    ]


def files_under(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not any(str(p.relative_to(root)).startswith(o + os.sep) for o in OUTPUTS)
    }


def test_readme_marks_its_blocks_and_stays_inside_the_repo():
    assert len(readme_blocks()) >= 5, "the Deploy section's runnable blocks lost their <!-- readme-test --> markers"
    assert "../" not in (ROOT / "README.md").read_text(), "README.md points outside the repository"
    unread = [str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if "<!-- readme-test" in p.read_text()]
    assert set(unread) <= set(PAGES), f"marked blocks on pages PAGES does not list: {sorted(set(unread) - set(PAGES))}"
    for page in PAGES:
        path = ROOT / page
        for link in LINK.findall(path.read_text()):  # relative links name files that exist
            target = (path.parent / link).resolve()
            assert target.is_relative_to(ROOT), f"{page}: {link} points outside the repository"
            assert target.exists(), f"{page}: {link}"


def test_readme_deploy_blocks_run_in_order(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*NOT_COPIED))
    before = files_under(copy)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    skipped = []
    for page, needs, body in readme_blocks():
        missing = [tool for tool in needs if not shutil.which(tool)]
        if missing:
            assert not os.environ.get("CI"), f"CI must have {', '.join(missing)} for this block of {page}:\n{body}"
            skipped.append(f"{', '.join(missing)} missing")
            continue
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", body], cwd=copy, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"{page} block failed:\n{body}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    written = files_under(copy) - before
    assert not written, f"marked blocks wrote outside export/ and build/: {sorted(written)}"
    assert (copy / "build" / "logits.npy").is_file() or skipped
    if skipped:
        pytest.skip(f"some marked blocks did not run: {'; '.join(skipped)}")


def test_readme_own_model_example_runs(tmp_path):
    """docs/your-model.md: its `my_model.py` and the Python that exports it, verbatim."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "your-model.md").read_text(), re.DOTALL)
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
