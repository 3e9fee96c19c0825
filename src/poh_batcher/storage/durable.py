"""Durable, atomic, never-overwriting file creation, and the fsync helpers behind it.

A batch file must become visible under its name only with all its bytes on
disk, and be durable before it is acknowledged: write a temporary file in the
same folder, fsync it, ``link`` it to its name (which fails on an existing
name, where ``rename`` would replace it), and fsync the folder.

Sharing flushes between concurrent writers (group commit: fdatasync a group of
files, link them, fsync the folder once) was measured here and was slower:
2,000 files of 62 KB with 8 threads took 0.61-0.92 s grouped against
0.40-0.67 s one by one, since one leader thread serialises what the disk would
otherwise overlap.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class FileTakenError(FileExistsError):
    """The final name holds other bytes: the caller must choose another name."""


def create_durably(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` holding ``data``, durably; ``FileTakenError`` if it holds other bytes.

    If ``path`` already holds exactly ``data`` (an earlier attempt whose answer
    was lost, say its folder fsync failed), its folder is fsync'd again and it
    counts as created: retrying never makes a second object of one batch.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # independent of the process umask
            write_fully(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            if path.read_bytes() != data:
                raise FileTakenError(path) from None
    finally:
        os.unlink(temp)  # a partial temp file must not pile up (disk full, retried)
    fsync_dir(path.parent)


def write_fully(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (it may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
