"""LocalStorage: atomic, durable, never overwriting, confined to its root; storage_from_url."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from poh_batcher.errors import ConfigurationError, KeyExistsError, PohBatcherError, StorageError
from poh_batcher.storage import LocalStorage, StorageBackend, storage_from_url

KEY = "20250101/00/ack_batch_000000.json.zst"


async def test_save_and_load(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")  # created on first write
    await storage.save_bytes(KEY, b"payload")
    assert (tmp_path / "root" / KEY).read_bytes() == b"payload"
    assert await storage.load_bytes(KEY) == b"payload"
    assert await storage.exists(KEY)
    assert not await storage.exists("20250101/00/ack_batch_000001.json.zst")


async def test_save_json_minified_utf8(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.save_json("x/meta.json", {"a": [1, 2], "b": "é"})
    assert (tmp_path / "x/meta.json").read_bytes() == '{"a":[1,2],"b":"é"}'.encode()
    with pytest.raises(KeyExistsError):
        await storage.save_json("x/meta.json", {})


async def test_never_overwrites(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.save_bytes(KEY, b"first")
    with pytest.raises(KeyExistsError) as info:
        await storage.save_bytes(KEY, b"second")
    assert info.value.key == KEY
    assert not info.value.retryable
    assert isinstance(info.value, StorageError)
    assert isinstance(info.value, PohBatcherError)
    assert (tmp_path / KEY).read_bytes() == b"first"
    assert sorted(p.name for p in (tmp_path / KEY).parent.iterdir()) == [Path(KEY).name]  # no temp left


async def test_rewriting_the_same_bytes_is_an_earlier_attempt_not_a_new_object(tmp_path: Path) -> None:
    """A retry whose first attempt landed (say its folder fsync failed) must not need a second key."""
    storage = LocalStorage(tmp_path)
    await storage.save_bytes(KEY, b"the batch")
    before = (tmp_path / KEY).stat()
    await storage.save_bytes(KEY, b"the batch")  # no KeyExistsError: it is already there
    after = (tmp_path / KEY).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # untouched
    assert os.listdir((tmp_path / KEY).parent) == [Path(KEY).name]  # and no temp left behind
    with pytest.raises(KeyExistsError):
        await storage.save_bytes(KEY, b"the batcH")


async def test_concurrent_writers_one_wins(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    results = await asyncio.gather(
        *(storage.save_bytes(KEY, f"writer {i}".encode()) for i in range(8)), return_exceptions=True
    )
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(isinstance(r, KeyExistsError) for r in results if r is not None)
    assert (tmp_path / KEY).read_bytes() == f"writer {winners[0]}".encode()
    assert os.listdir((tmp_path / KEY).parent) == [Path(KEY).name]


async def test_file_mode_0644_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        storage = LocalStorage(tmp_path)
        await storage.save_bytes(KEY, b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / KEY).stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "key", ["../x", "/abs", "a/../../b", "a/../b", "..", "", "a//b", "./a", "a/./b", "a/", "a\\..\\b", "a\x00b"]
)
async def test_refuses_keys_escaping_root(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    storage = LocalStorage(root)
    with pytest.raises(StorageError) as info:
        await storage.save_bytes(key, b"x")
    assert not info.value.retryable
    with pytest.raises(StorageError):
        await storage.load_bytes(key)
    with pytest.raises(StorageError):
        storage.get_url(key)
    assert _escaped(tmp_path) == []


def _escaped(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "x", tmp_path / "b", Path("/abs")) if p.exists()]


async def test_list_sorted_prefix_and_ignores_temp_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    keys = [
        "20250101/01/ack_batch_000001.json.zst",
        "20250101/00/ack_batch_000010.json.zst",
        "20250101/00/ack_batch_000002.json.zst",
        "20250102/00/ack_batch_000000.json.gz",
        "top.json",
    ]
    for key in keys:
        await storage.save_bytes(key, b"x")
    (tmp_path / "20250101/00/.ack_batch_000003.json.zst.abc.tmp").write_bytes(b"partial")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden/f").write_bytes(b"")
    assert await storage.list() == sorted(keys)
    assert await storage.list("20250101/00/") == [
        "20250101/00/ack_batch_000002.json.zst",
        "20250101/00/ack_batch_000010.json.zst",
    ]
    assert await storage.list("20250101/") == sorted(keys[:3])
    assert await storage.list("2025010") == sorted(keys[:4])
    assert await storage.list("20250101/00/ack_batch_00001") == ["20250101/00/ack_batch_000010.json.zst"]
    assert await storage.list("20990101/") == []
    with pytest.raises(StorageError):
        await storage.list("../")


async def test_list_of_missing_root_is_empty(tmp_path: Path) -> None:
    assert await LocalStorage(tmp_path / "nope").list() == []


async def test_load_missing_is_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="ack_batch_000000"):
        await LocalStorage(tmp_path).load_bytes(KEY)


async def test_get_url(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    url = storage.get_url(KEY)
    assert url == (tmp_path / KEY).as_uri()
    assert url.startswith("file:///")


def test_relative_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert LocalStorage("rel/dir").root == tmp_path / "rel/dir"


async def test_unwritable_root_fails_preflight_and_write(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file where a folder should be")  # unwritable even for root
    storage = LocalStorage(blocker / "sub")
    with pytest.raises(StorageError) as info:
        await storage.preflight()
    assert "blocker" in str(info.value)
    assert not info.value.retryable
    with pytest.raises(StorageError) as info2:
        await storage.save_bytes(KEY, b"x")
    assert "blocker" in str(info2.value)
    assert not info2.value.retryable
    assert blocker.read_bytes() == b"a file where a folder should be"


async def test_preflight_creates_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a/b")
    await storage.preflight()
    assert (tmp_path / "a/b").is_dir()


# -- storage_from_url ---------------------------------------------------------


def test_file_url_absolute(tmp_path: Path) -> None:
    storage = storage_from_url(f"file://{tmp_path}/out")
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "out"
    assert storage_from_url(f"file://localhost{tmp_path}").root == tmp_path  # type: ignore[attr-defined]
    assert storage_from_url("file:///a%20b").root == Path("/a b")  # type: ignore[attr-defined]


def test_file_url_relative_and_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url, expected in [
        ("file://./rel", tmp_path / "rel"),
        ("file://rel/sub", tmp_path / "rel/sub"),
        ("plain/dir", tmp_path / "plain/dir"),
        (str(tmp_path / "abs"), tmp_path / "abs"),
    ]:
        storage = storage_from_url(url)
        assert isinstance(storage, LocalStorage), url
        assert storage.root == expected, url


def test_s3_url_is_routed_to_s3_backend() -> None:
    try:
        storage = storage_from_url("s3://bucket/prefix")
    except PohBatcherError:
        pytest.skip("S3 backend needs configuration; S3 tests live elsewhere")
    assert type(storage).__name__ == "S3Storage"
    assert isinstance(storage, StorageBackend)


@pytest.mark.parametrize("url", ["http://example.com/x", "ftp://h/p", "gs://bucket/x"])
def test_unsupported_scheme(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        storage_from_url(url)
    message = str(info.value)
    assert url in message
    assert "file://" in message
    assert "s3://" in message


def test_empty_url_and_file_url_without_path() -> None:
    with pytest.raises(ConfigurationError):
        storage_from_url("")
    with pytest.raises(ConfigurationError):
        storage_from_url("file://")


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    """A write that fails half way (here: over the file size limit) cleans up its temporary file."""
    script = f"""
import os, resource, signal
from poh_batcher.errors import StorageError
from poh_batcher.storage import LocalStorage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
storage = LocalStorage({str(tmp_path)!r})
try:
    storage.write_durably("a/k.json", b"x" * 5000)
except StorageError as exc:
    print("failed:", exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("failed:")
    assert "a/k.json" in result.stdout
    assert os.listdir(tmp_path / "a") == []
