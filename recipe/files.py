"""Crash-safe file writes: write NAME.tmp, fsync, rename over NAME. A reader sees the old file or the
whole new one, never a torn one (shard conversion, checkpoints' `latest`, metrics.jsonl on resume)."""
from __future__ import annotations

import os

TMP_SUFFIX = ".tmp"


def fsync_and_rename(f, tmp_path: str, final_path: str) -> None:
    """Flush and fsync the open file f (written at tmp_path), close it and move it to final_path."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp_path, final_path)


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes) -> None:
    tmp = path + TMP_SUFFIX
    f = open(tmp, "wb")  # closed by fsync_and_rename
    f.write(data)
    fsync_and_rename(f, tmp, path)
