"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Write to a temporary file in the same folder (same file system, so the rename is atomic),
fsync it, `os.replace` it over the target, then fsync the folder so the rename itself
survives a power cut. A crash mid-write leaves the target untouched. Pure standard
library: the web process uses it without importing torch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o644  # mkstemp makes 0600; web and worker may run as different users


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(file)` writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as temp:
            write(temp)
            temp.flush()
            os.fsync(temp.fileno())
        os.chmod(temp_name, FILE_MODE)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda file: file.write(data))


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems cannot open folders; the data itself is synced
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
