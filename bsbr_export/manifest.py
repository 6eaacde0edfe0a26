"""`manifest.json`: what an export directory holds, with the sha256 of every file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bsbr_export.errors import UserError
from bsbr_export.formats import kind_of_record, recorded_kind
from bsbr_export.io import atomic_write, read_json
from bsbr_export.model.spec import ModelSpec

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    """The manifest entry of one file."""
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def read_manifest(export_dir: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest of an export directory; with `verify`, every listed file must exist
    and match its sha256 (a changed file is a UserError that says to re-export)."""
    directory = Path(export_dir)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise UserError(f"{directory} is not an export directory (run `bsbr-export export` first)")
    if not path.is_file():
        raise UserError(f"{directory} has no {MANIFEST}: is it an export directory? (run `bsbr-export export`)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or "artifacts" not in manifest:
        raise UserError(f"{path} is not a bsbr-export manifest (no 'artifacts')")
    problem = _shape_problem(manifest)
    if problem:
        raise UserError(f"{path} is damaged: {problem}; re-export")
    if verify:
        files = dict(manifest.get("checkpoint", {}))
        for artifact in manifest["artifacts"]:
            files.update(artifact["files"])
        for name, record in files.items():
            file = directory / name
            if not file.is_file():
                raise UserError(f"{file} is listed in {MANIFEST} but missing: re-export")
            if sha256(file) != record["sha256"]:
                raise UserError(f"{file} does not match the sha256 in {MANIFEST}: it changed after export; re-export")
    return manifest


def _shape_problem(manifest: dict) -> str | None:
    """What keeps `manifest` from being read entry by entry, or None: every artifact an
    object with a name and a `files` map of file name -> {"sha256", "bytes"}."""
    artifacts = manifest["artifacts"]
    if not isinstance(artifacts, list):
        return f"'artifacts' must be a list, got {type(artifacts).__name__}"
    sections = [("checkpoint", manifest.get("checkpoint", {}))]
    for i, artifact in enumerate(artifacts):
        if not isinstance(artifact, dict) or not isinstance(artifact.get("name"), str):
            return f"artifact {i} must be an object with a 'name', got {artifact!r:.60}"
        sections.append((artifact["name"], artifact.get("files")))
    for where, files in sections:
        if not isinstance(files, dict):
            return f"{where}: 'files' must map file names to records, got {files!r:.60}"
        for name, record in files.items():
            if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
                return f"{where}: file {name} has no sha256"
    return None


def add_artifacts(export_dir: str | os.PathLike, entries: list[dict]) -> dict:
    """Record new artifacts (replacing same-named ones) in the manifest, atomically.

    Each entry needs `name`, `format`, `kind` (as the code names it) and `settings`;
    file hashes are computed here.
    """
    directory = Path(export_dir)
    manifest = read_manifest(directory)
    names = {e["name"] for e in entries}
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["name"] not in names]
    for entry in entries:
        manifest["artifacts"].append(
            {
                **entry,
                "kind": recorded_kind(entry["kind"]),
                "files": {entry["name"]: file_record(directory / entry["name"])},
            }
        )
    with atomic_write(directory / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def artifact_kind(artifact: dict) -> str:
    """What a manifest's artifact entry computes (`formats.KINDS`)."""
    return kind_of_record(artifact["kind"])


def manifest_spec(export_dir: str | os.PathLike) -> ModelSpec:
    """The ModelSpec an export directory was made with (its manifest's `spec`)."""
    return ModelSpec.from_dict(read_manifest(export_dir, verify=False)["spec"])


def state_manifest(spec: ModelSpec) -> dict:
    """Names and shapes of the streaming state, for metadata and for callers that build
    the empty initial state: every `past.*` tensor is zeros of its shape with the named
    growing axes (`past_chunks`, `past_tokens`) at 0."""
    state = spec.state
    return {
        "chunk_size": spec.chunk_size,
        "inputs": state.inputs,
        "outputs": state.outputs,
        "appended": list(state.appended),
        "initial": "zeros, with past_chunks = past_tokens = 0",
        "dtype": state.dtype,
    }
