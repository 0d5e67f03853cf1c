"""Atomic file writes: write `<name>.tmp`, fsync, rename.

A crash at any instant leaves either the previous file or the new one, never a half-written file under
the final name. `os.replace` is atomic on POSIX and Windows when source and target share a folder,
which is why the temporary file always sits next to its target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_path(path: str | Path) -> None:
    """Flush a written file, or a folder's entries, to disk. The rename of an atomic write lives in the
    directory entry, so the folder is synced too. Windows cannot open folders: there it is a no-op."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open `path.tmp` for binary writing; on success fsync and rename it to `path`.

    On an exception the temporary file is removed and the target is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written `tmp_dir` into place as `final_dir`, replacing any previous one.

    Directories cannot be swapped in one atomic call, so the old one is first renamed aside; a crash
    in between leaves `final_dir.old`, never a partial `final_dir`.
    """
    for file in tmp_dir.rglob("*"):
        if file.is_file():
            fsync_path(file)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    fsync_path(final_dir.parent)
    if old.exists():
        shutil.rmtree(old)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below `folder`, then `folder` itself (files before their folders)."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and prove it writable, or raise an InputError naming it and the fix."""
    from lmstack.errors import InputError

    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} is a file — choose a folder for --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"cannot write to the output folder {out} ({exc.strerror}) — choose a writable --out"
        ) from None
    return out
