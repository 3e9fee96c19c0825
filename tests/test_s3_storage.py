"""S3Storage against a real S3-compatible server (SeaweedFS), checked with boto3.

Every write is read back with a second, independent client (boto3) and, for
batches, decompressed with the ``zstd`` command-line tool.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from faultkit import FlakyStorage
from poh_batcher.batcher import AsyncBatcher
from poh_batcher.clock import SystemClock
from poh_batcher.errors import ConfigurationError, DeliveryError, KeyExistsError, StorageError
from poh_batcher.retry import RetryPolicy
from poh_batcher.storage import StorageBackend, storage_from_url
from poh_batcher.storage.s3 import ObjectInfo, S3Storage
from s3server import CORRUPT, DROP, DROP_RESPONSE, SLOW_DOWN, FaultProxy, S3Server, fail_first

DATA = Path(__file__).parent / "data" / "acks_10k.jsonl"
HOUR = datetime(2025, 1, 1, 7, 30, tzinfo=UTC)
FAST_RETRY = RetryPolicy(attempts=10, initial_delay=0.01, max_delay=0.2)
NO_INTERNAL_RETRY: Any = {"max_retries": 0, "retry_timeout": timedelta(seconds=10)}
WRONG_SECRET = "Wr0ng-S3cret-Value-do-not-print"
KEY_RE = re.compile(r"archive/20250101/07/ack_batch_(\d{6})\.json\.zst")


class FixedHourClock(SystemClock):
    """Real timers, but every key lands in the same UTC hour (no flake at an hour boundary)."""

    def utcnow(self) -> datetime:
        return HOUR





def make_storage(server: S3Server, bucket: str, prefix: str = "", **options: Any) -> S3Storage:
    settings: dict[str, Any] = {
        "endpoint": server.endpoint,
        "region": server.region,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
    }
    settings.update(options)
    return S3Storage(bucket, prefix, **settings)


def ack_lines(count: int | None = None) -> list[bytes]:
    lines = DATA.read_bytes().splitlines()
    return lines if count is None else lines[:count]


def read_object(server: S3Server, bucket: str, key: str) -> bytes:
    body: bytes = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def zstd_cli_decompress(payload: bytes) -> bytes:
    zstd = shutil.which("zstd")
    assert zstd is not None, "the zstd command-line tool is needed to check batches independently"
    return subprocess.run([zstd, "-d", "-c", "-q"], input=payload, capture_output=True, check=True).stdout


def batch_keys(server: S3Server, bucket: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def stored_acks(server: S3Server, bucket: str) -> tuple[list[bytes], list[int]]:
    """Every ACK line in the bucket's batches (in key order) and the seqs of those batches."""
    lines: list[bytes] = []
    seqs: list[int] = []
    for key in batch_keys(server, bucket):
        match = KEY_RE.fullmatch(key)
        assert match is not None, f"unexpected key {key!r}"
        seqs.append(int(match[1]))
        array = json.loads(zstd_cli_decompress(read_object(server, bucket, key)))
        lines.extend(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode() for item in array)
    return lines, seqs


async def run_batcher(storage: StorageBackend, lines: list[bytes], **options: Any) -> AsyncBatcher:
    settings: dict[str, Any] = {"max_items": 1000, "timeout": 30.0, "codec": "zstd", "retry": FAST_RETRY}
    settings.update(options)
    batcher = AsyncBatcher(sink=storage, clock=FixedHourClock(), **settings)
    async with batcher:
        done = await batcher.enqueue_many(lines)
    await done
    return batcher


# -- the backend on its own ---------------------------------------------------


async def test_round_trip_save_load_exists_list_get_url(s3_server: S3Server, s3_bucket: str) -> None:
    storage = make_storage(s3_server, s3_bucket, "pre/fix")
    await storage.preflight()
    assert await storage.list() == []
    await storage.save_bytes("20250101/07/b.json", b"[2]", content_type="application/json")
    await storage.save_bytes("20250101/07/a.json", b"[1]", content_type="application/json")
    await storage.save_bytes("20250101/08/c.json", b"[3]")
    await storage.save_json("other/d.json", {"x": 1})

    assert await storage.load_bytes("20250101/07/a.json") == b"[1]"
    assert await storage.load_bytes("other/d.json") == b'{"x":1}'
    assert await storage.exists("20250101/07/a.json")
    assert not await storage.exists("20250101/07/zzz.json")
    assert await storage.list() == ["20250101/07/a.json", "20250101/07/b.json", "20250101/08/c.json", "other/d.json"]
    assert await storage.list("20250101/07/") == ["20250101/07/a.json", "20250101/07/b.json"]
    assert await storage.list("2025") == ["20250101/07/a.json", "20250101/07/b.json", "20250101/08/c.json"]
    assert await storage.list("20250101/07/b") == ["20250101/07/b.json"]
    assert await storage.list("nothing/") == []
    assert storage.get_url("20250101/07/a.json") == f"s3://{s3_bucket}/pre/fix/20250101/07/a.json"
    # The prefix is applied on the server, as boto3 sees it.
    assert read_object(s3_server, s3_bucket, "pre/fix/20250101/07/a.json") == b"[1]"
    with pytest.raises(StorageError, match="no such object") as missing:
        await storage.load_bytes("20250101/07/zzz.json")
    assert not missing.value.retryable
    await storage.close()


async def test_keys_outside_the_root_are_refused(s3_server: S3Server, s3_bucket: str) -> None:
    storage = make_storage(s3_server, s3_bucket, "p")
    for key in ("../escape", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(StorageError) as caught:
            await storage.save_bytes(key, b"x")
        assert not caught.value.retryable
    assert batch_keys(s3_server, s3_bucket) == []


def test_from_url_and_storage_from_url() -> None:
    storage = S3Storage.from_url("s3://my-bucket/some/prefix/", endpoint="http://127.0.0.1:9", region="us-east-1")
    assert (storage.bucket, storage.prefix, storage.endpoint) == ("my-bucket", "some/prefix", "http://127.0.0.1:9")
    assert storage.get_url("k.json") == "s3://my-bucket/some/prefix/k.json"
    assert S3Storage.from_url("s3://my-bucket").prefix == ""
    chosen = storage_from_url("s3://my-bucket/p", endpoint="http://127.0.0.1:9")
    assert isinstance(chosen, S3Storage)
    assert chosen.url == "s3://my-bucket/p"
    for bad in ("s3:///prefix", "s3://my-bucket/../up", "s3://my-bucket/a/./b", "s3://BAD_bucket/p"):
        with pytest.raises(ConfigurationError):
            storage_from_url(bad, endpoint="http://127.0.0.1:9")


def test_endpoint_and_plain_http_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    storage = S3Storage("my-bucket", "p")
    assert storage.endpoint == "http://127.0.0.1:9"
    options = storage._store.client_options or {}
    assert str(options.get("allow_http")).lower() == "true"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.test")
    assert S3Storage("my-bucket").endpoint == "https://s3.example.test"


async def test_env_credentials_are_used(s3_env: dict[str, str], s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, "env")  # endpoint, region and keys from AWS_* only
    await storage.preflight()
    await storage.save_bytes("k.json", b"[]")
    assert await storage.list() == ["k.json"]


async def test_credentials_from_an_aws_profile(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[archive]\naws_access_key_id = {s3_server.access_key}\naws_secret_access_key = {s3_server.secret_key}\n"
    )
    (tmp_path / "config").write_text("[profile archive]\nregion = us-east-1\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "archive")
    storage = S3Storage(s3_bucket, "profile", endpoint=s3_server.endpoint)
    await storage.preflight()
    await storage.save_bytes("k.json", b"[]")
    assert read_object(s3_server, s3_bucket, "profile/k.json") == b"[]"


async def test_second_save_of_a_key_never_overwrites(s3_server: S3Server, s3_bucket: str) -> None:
    storage = make_storage(s3_server, s3_bucket, "p")
    await storage.save_bytes("20250101/07/ack_batch_000000.json", b"[first]")
    with pytest.raises(KeyExistsError) as caught:
        await storage.save_bytes("20250101/07/ack_batch_000000.json", b"[second]")
    assert caught.value.key == "20250101/07/ack_batch_000000.json"
    assert not caught.value.retryable
    # Even identical bytes from a PUT that did not fail before are refused: a create is a create.
    with pytest.raises(KeyExistsError):
        await storage.save_bytes("20250101/07/ack_batch_000000.json", b"[first]")
    assert read_object(s3_server, s3_bucket, "p/20250101/07/ack_batch_000000.json") == b"[first]"


async def test_sixteen_concurrent_creates_of_one_key_have_exactly_one_winner(
    s3_server: S3Server, s3_bucket: str
) -> None:
    storages = [make_storage(s3_server, s3_bucket, "race") for _ in range(16)]
    payloads = [f"[writer {index}]".encode() for index in range(16)]
    results = await asyncio.gather(
        *(storage.save_bytes("k.json", payload) for storage, payload in zip(storages, payloads, strict=True)),
        return_exceptions=True,
    )
    winners = [index for index, result in enumerate(results) if result is None]
    losers = [result for result in results if result is not None]
    assert len(winners) == 1, results
    assert all(isinstance(result, KeyExistsError) for result in losers), losers
    assert read_object(s3_server, s3_bucket, "race/k.json") == payloads[winners[0]]


async def test_metadata_content_type_encoding_and_checksum_are_stored(s3_server: S3Server, s3_bucket: str) -> None:
    storage = make_storage(s3_server, s3_bucket, "meta")
    payload = b"\x28\xb5\x2f\xfd compressed bytes"
    await storage.save_bytes(
        "20250101/07/ack_batch_000000.json.zst",
        payload,
        content_type="application/json",
        content_encoding="zstd",
        metadata={"ack-count": "256", "codec": "zstd"},
    )
    head = s3_server.client().head_object(
        Bucket=s3_bucket, Key="meta/20250101/07/ack_batch_000000.json.zst", ChecksumMode="ENABLED"
    )
    assert head["ContentType"] == "application/json"
    assert head["ContentEncoding"] == "zstd"
    assert head["Metadata"] == {"ack-count": "256", "codec": "zstd"}
    assert head["ContentLength"] == len(payload)
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(payload).digest()).decode()
    assert head["ETag"].strip('"') == hashlib.md5(payload).hexdigest()

    info = await storage.head("20250101/07/ack_batch_000000.json.zst")
    assert info == ObjectInfo(
        key="20250101/07/ack_batch_000000.json.zst",
        size=len(payload),
        metadata={"ack-count": "256", "codec": "zstd"},
        content_type="application/json",
        content_encoding="zstd",
        etag=head["ETag"],
    )


async def test_wrong_secret_fails_fast_naming_the_bucket_without_the_secret(
    s3_server: S3Server, s3_bucket: str
) -> None:
    storage = make_storage(s3_server, s3_bucket, "p", secret_access_key=WRONG_SECRET)
    errors: list[StorageError] = []
    for operation in (
        storage.preflight(),
        storage.save_bytes("k.json", b"[]"),
        storage.load_bytes("k.json"),
        storage.list(""),
    ):
        with pytest.raises(StorageError) as caught:
            await operation
        errors.append(caught.value)
    for error in errors:
        message = str(error)
        assert not error.retryable, message
        assert s3_bucket in message
        assert "\n" not in message
        assert WRONG_SECRET not in message
        assert s3_server.secret_key not in message
    assert "SignatureDoesNotMatch" in str(errors[0])
    assert str(errors[0]).startswith(f"cannot use s3://{s3_bucket}/p: ")


async def test_unknown_access_key_fails_fast(s3_server: S3Server, s3_bucket: str) -> None:
    storage = make_storage(s3_server, s3_bucket, access_key_id="nobody", secret_access_key=WRONG_SECRET)
    with pytest.raises(StorageError, match="InvalidAccessKeyId") as caught:
        await storage.save_bytes("k.json", b"[]")
    assert not caught.value.retryable
    assert s3_bucket in str(caught.value)
    assert WRONG_SECRET not in str(caught.value)


async def test_missing_bucket_fails_fast_with_a_clear_line(s3_server: S3Server) -> None:
    storage = make_storage(s3_server, "no-such-bucket-here", "p")
    with pytest.raises(StorageError) as preflight:
        await storage.preflight()
    with pytest.raises(StorageError) as save:
        await storage.save_bytes("k.json", b"[]")
    for error in (preflight.value, save.value):
        assert not error.retryable
        assert "bucket 'no-such-bucket-here' does not exist" in str(error)
        assert "\n" not in str(error)
    # The bucket was not created as a side effect.
    assert "no-such-bucket-here" not in [bucket["Name"] for bucket in s3_server.client().list_buckets()["Buckets"]]


async def test_unreachable_endpoint_is_retryable(s3_server: S3Server, s3_bucket: str) -> None:
    # Nothing listens on port 9 (discard) of the loopback.
    storage = make_storage(s3_server, s3_bucket, endpoint="http://127.0.0.1:9", retry_config=NO_INTERNAL_RETRY)
    with pytest.raises(StorageError, match="connection refused") as caught:
        await storage.save_bytes("k.json", b"[]")
    assert caught.value.retryable
    assert "127.0.0.1:9" in str(caught.value)


# -- through the batcher -------------------------------------------------------


async def test_batcher_writes_zstd_batches_readable_by_boto3_and_the_zstd_cli(
    s3_server: S3Server, s3_bucket: str
) -> None:
    lines = ack_lines()
    storage = make_storage(s3_server, s3_bucket, "archive")
    batcher = await run_batcher(storage, lines)
    assert batcher.stats.acks_delivered == len(lines)
    keys = batch_keys(s3_server, s3_bucket)
    assert keys == [f"archive/20250101/07/ack_batch_{seq:06d}.json.zst" for seq in range(10)]
    stored, seqs = stored_acks(s3_server, s3_bucket)
    assert stored == lines
    assert seqs == list(range(10))
    # Byte for byte: each object is the minified array of its 1000 lines.
    first = zstd_cli_decompress(read_object(s3_server, s3_bucket, keys[0]))
    assert first == b"[" + b",".join(lines[:1000]) + b"]"
    head = s3_server.client().head_object(Bucket=s3_bucket, Key=keys[0])
    assert head["Metadata"] == {"ack-count": "1000", "codec": "zstd"}
    assert head["ContentEncoding"] == "zstd"
    assert head["ContentType"] == "application/json"


async def test_restart_continues_the_seq_and_overwrites_nothing(s3_server: S3Server, s3_bucket: str) -> None:
    lines = ack_lines(5000)
    await run_batcher(make_storage(s3_server, s3_bucket, "archive"), lines[:3000])
    await run_batcher(make_storage(s3_server, s3_bucket, "archive"), lines[3000:])
    stored, seqs = stored_acks(s3_server, s3_bucket)
    assert seqs == list(range(5))
    assert stored == lines


async def test_two_writers_into_one_prefix_overwrite_nothing(s3_server: S3Server, s3_bucket: str) -> None:
    lines = ack_lines(4000)
    first, second = lines[:2000], lines[2000:]
    await asyncio.gather(
        run_batcher(make_storage(s3_server, s3_bucket, "archive"), first, max_items=200),
        run_batcher(make_storage(s3_server, s3_bucket, "archive"), second, max_items=200),
    )
    stored, seqs = stored_acks(s3_server, s3_bucket)
    assert seqs == list(range(20))
    assert sorted(stored) == sorted(lines)
    assert len(stored) == len(set(stored)) == 4000


# -- failures that heal ---------------------------------------------------------


async def test_retryable_failures_at_the_storage_seam_are_retried_and_lose_nothing(
    s3_server: S3Server, s3_bucket: str
) -> None:
    lines = ack_lines(3000)
    flaky = FlakyStorage(make_storage(s3_server, s3_bucket, "archive"), failures=5)
    batcher = await run_batcher(flaky, lines)
    assert batcher.stats.retries == 5
    stored, seqs = stored_acks(s3_server, s3_bucket)
    assert (stored, seqs) == (lines, [0, 1, 2])


@pytest.mark.parametrize("fault", [SLOW_DOWN, DROP])
async def test_503s_and_dropped_connections_from_a_proxy_are_retried(
    s3_server: S3Server, s3_bucket: str, fault: str
) -> None:
    lines = ack_lines(3000)
    async with FaultProxy(s3_server.base_port, fail_first(4, fault)) as proxy:
        storage = make_storage(s3_server, s3_bucket, "archive", endpoint=proxy.endpoint, retry_config=NO_INTERNAL_RETRY)
        batcher = await run_batcher(storage, lines)
    assert len(proxy.faults()) == 4
    assert batcher.stats.retries == 4  # no internal retries: every fault reached the batcher
    stored, seqs = stored_acks(s3_server, s3_bucket)
    assert (stored, seqs) == (lines, [0, 1, 2])


async def test_obstores_own_retry_absorbs_a_single_503(s3_server: S3Server, s3_bucket: str) -> None:
    async with FaultProxy(s3_server.base_port, fail_first(1, SLOW_DOWN)) as proxy:
        storage = make_storage(s3_server, s3_bucket, "p", endpoint=proxy.endpoint)  # default retry_config
        await storage.save_bytes("k.json", b"[1]")
    assert [request.action for request in proxy.requests if request.method == "PUT"] == [SLOW_DOWN, "pass"]
    assert read_object(s3_server, s3_bucket, "p/k.json") == b"[1]"


async def test_a_lost_answer_to_a_stored_put_is_not_stored_twice(s3_server: S3Server, s3_bucket: str) -> None:
    lines = ack_lines(2000)
    async with FaultProxy(s3_server.base_port, fail_first(2, DROP_RESPONSE)) as proxy:
        storage = make_storage(s3_server, s3_bucket, "archive", endpoint=proxy.endpoint, retry_config=NO_INTERNAL_RETRY)
        batcher = await run_batcher(storage, lines)
    assert len(proxy.faults()) == 2
    assert batcher.stats.acks_delivered == 2000
    stored, seqs = stored_acks(s3_server, s3_bucket)
    assert seqs == [0, 1]  # the retry found its own object: no second copy under seq 2, 3
    assert stored == lines


async def test_a_body_corrupted_in_transit_is_rejected_by_the_server_and_retried(
    s3_server: S3Server, s3_bucket: str
) -> None:
    payload = b"[" + b",".join(ack_lines(50)) + b"]"
    async with FaultProxy(s3_server.base_port, fail_first(1, CORRUPT)) as proxy:
        storage = make_storage(s3_server, s3_bucket, "p", endpoint=proxy.endpoint, retry_config=NO_INTERNAL_RETRY)
        with pytest.raises(StorageError) as caught:
            await storage.save_bytes("k.json", payload)
        assert caught.value.retryable, str(caught.value)
        assert not await storage.exists("k.json")  # nothing corrupt was stored
        await storage.save_bytes("k.json", payload)
    assert read_object(s3_server, s3_bucket, "p/k.json") == payload


async def test_permanent_errors_are_not_retried_by_the_batcher(s3_server: S3Server) -> None:
    storage = make_storage(s3_server, "no-such-bucket-here", "archive")
    batcher = AsyncBatcher(max_items=10, timeout=30.0, sink=storage, clock=FixedHourClock(), retry=FAST_RETRY)
    with pytest.raises(DeliveryError, match="does not exist"):
        async with batcher:
            await batcher.enqueue_many(ack_lines(10))
    assert batcher.stats.retries == 0
    assert batcher.stats.acks_failed == 10


# -- the server helper -----------------------------------------------------------


def test_the_server_can_go_down_and_come_back_on_the_same_folder_and_ports() -> None:
    with S3Server() as server:
        bucket = server.create_bucket()
        server.client().put_object(Bucket=bucket, Key="kept", Body=b"still here")
        endpoint = server.endpoint
        server.stop()
        assert not server.running
        server.start()
        assert server.endpoint == endpoint
        assert read_object(server, bucket, "kept") == b"still here"
    assert not server.directory.exists()
