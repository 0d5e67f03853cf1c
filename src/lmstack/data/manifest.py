"""Versioning: the dataset manifest and its digest, the dataset version.

Every change to a data pipeline makes a new dataset, so the dataset carries a record of how it was
made: the inputs' content hashes, the pipeline config, the tokenizer's files, the outputs' hashes and
the counts of every stage. The *version* is the SHA-256 of that record in canonical JSON (sorted keys,
no whitespace), computed with the `version` field left out.

For the same inputs and config to give the same version on any machine, nothing machine-specific may
enter the record: files are named by their path relative to the input argument they came from (never
absolute), lists are sorted, there are no timestamps, and every hash is SHA-256 of bytes (never
Python's per-process salted `hash()`).

The *recipe* is the same kind of digest over the inputs, eval sets, config and tokenizer only: two runs
with the same recipe produce the same dataset, so a prepared folder with a matching recipe is reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmstack.atomic import atomic_write_text
from lmstack.errors import InputError

FORMAT = "lmstack-dataset"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def folder_hashes(folder: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under `folder`, sorted."""
    return {
        p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def manifest_version(manifest: dict[str, Any]) -> str:
    return digest({k: v for k, v in manifest.items() if k != "version"})


def finalize(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its `version` field set (placed first for readers)."""
    body = {k: v for k, v in manifest.items() if k != "version"}
    return {"version": manifest_version(body), **body}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = finalize(manifest)
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load and check a dataset manifest; the version must match the content (tamper/corruption check)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(
            f"{folder} is not a prepared dataset (no {MANIFEST_NAME}) — run `lmstack data prepare`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is corrupt ({exc}) — re-run `lmstack data prepare`") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path} is not an lmstack dataset manifest — re-run `lmstack data prepare`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path} has dataset format {manifest.get('format_version')}; this lmstack reads "
            f"{FORMAT_VERSION} — re-run `lmstack data prepare`"
        )
    if manifest.get("version") != manifest_version(manifest):
        raise InputError(
            f"{path} was modified: its version does not match its content — re-run `lmstack data prepare`"
        )
    return manifest
