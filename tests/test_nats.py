"""The NATS JetStream source and ``poh-batcher publish``, against a real nats-server.

One server for the session (``nats_server``, from tests/natsserver.py); every
test uses its own stream, subject and durable consumer, so tests never see
each other's messages. The scale-out test runs the real command in three
processes into one S3 prefix and kills one of them with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest
from nats.js.api import ConsumerInfo

from natsserver import NatsServer, NatsServerError, running_nats_server
from poh_batcher.cli_publish import publish_main
from poh_batcher.compression import decompress
from poh_batcher.naming import parse_key, validate_writer_id
from poh_batcher.parsing import LineValidator
from poh_batcher.sources.base import Chunk
from poh_batcher.sources.nats import NatsSettings, NatsSource, default_writer_id, ensure_stream, stream_sequence

SAMPLE = Path(__file__).parent / "data" / "acks_10k.jsonl"
CLI = [sys.executable, "-m", "poh_batcher.cli"]


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One ``nats-server -js`` on loopback for the session; never skips: a failed start fails with its log."""
    try:
        with running_nats_server() as server:
            yield server
    except NatsServerError as exc:
        pytest.fail(f"the NATS test server could not start:\n{exc}", pytrace=False)


@pytest.fixture
def names() -> SimpleNamespace:
    """A stream, subject and durable of this test's own."""
    tag = uuid.uuid4().hex[:10]
    return SimpleNamespace(stream=f"T{tag}", subject=f"acks{tag}.node", durable=f"d{tag}")


def consumer_options(url: str, names: SimpleNamespace, ack_wait: float) -> list[str]:
    """The command's options that make it one batcher on this test's stream and durable."""
    return ["--source", url, "--stream", names.stream, "--subject", names.subject, "--durable", names.durable,
            "--ack-wait", f"{ack_wait:g}"]  # fmt: skip


def sample_lines(count: int) -> list[bytes]:
    """``count`` valid ACK lines with unique ids (the 10k sample, ids rewritten beyond it)."""
    base = SAMPLE.read_bytes().splitlines()
    out = []
    for index in range(count):
        line = base[index % len(base)]
        out.append(line[:10] + b"%032x" % index + line[42:])  # {"id":"tx-<32 hex>"
    return out


@pytest.fixture(scope="session")
def acks_300k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nats-data") / "acks_300k.jsonl"
    path.write_bytes(b"\n".join(sample_lines(300_000)) + b"\n")
    return path


def ack_id(line: bytes) -> str:
    value: str = msgspec.json.decode(line)["id"]
    return value


async def publish(url: str, names: SimpleNamespace, lines: list[bytes]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, names.stream, names.subject)
        subject = names.subject
        for start in range(0, len(lines), 1000):
            futures = [await js.publish_async(subject, line) for line in lines[start : start + 1000]]
            await asyncio.gather(*futures)
    finally:
        await nc.close()


async def consumer_info(url: str, stream: str, durable: str) -> ConsumerInfo:
    nc = await nats.connect(url)
    try:
        return await nc.jetstream().consumer_info(stream, durable)
    finally:
        await nc.close()


def wait_until_delivered(
    url: str, names: SimpleNamespace, count: int, batchers: list[subprocess.Popen[Any]], timeout: float
) -> None:
    """Poll until the consumer has handed out ``count`` messages, while every batcher still runs."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(nats.js.errors.NotFoundError):  # not created by a batcher yet
            info = asyncio.run(consumer_info(url, names.stream, names.durable))
            if info.delivered.stream_seq >= count:
                return
        assert time.monotonic() < deadline, f"fewer than {count} messages delivered in {timeout} s"
        assert all(b.poll() is None for b in batchers), "a batcher ended early"
        time.sleep(0.05)


def publish_cli(server: NatsServer, path: Path, names: SimpleNamespace, *extra: str) -> int:
    argv = [str(path), "--to", server.url, "--subject", names.subject, "--stream", names.stream, *extra]
    return publish_main(argv)


@pytest.fixture
async def source_of(nats_server: NatsServer, names: SimpleNamespace) -> AsyncIterator[Any]:
    """Open NatsSources on this test's stream; each is closed at the end."""
    opened: list[NatsSource] = []

    async def open_source(**options: Any) -> NatsSource:
        settings = NatsSettings(
            nats_server.url, stream=names.stream, subject=names.subject, durable=names.durable, **options
        )
        source = NatsSource(settings, LineValidator())
        await source.open()
        opened.append(source)
        return source

    yield open_source
    for source in opened:
        await source.aclose()


async def settle(condition: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


# -- units ---------------------------------------------------------------------


def test_default_writer_id_is_host_and_pid_in_the_writer_id_alphabet() -> None:
    assert default_writer_id("node-7", 4242) == "node-7-4242"
    assert default_writer_id("my_host.example.com", 1) == "my-host.example.com-1"
    assert default_writer_id("_weird__name_", 12) == "weird-name-12"
    assert default_writer_id("", 5) == "batcher-5"
    long = default_writer_id("h" * 100, 123456)
    assert len(long) <= 64
    assert long.endswith("-123456")
    for host in ("node-7", "my_host.example.com", "_weird__name_", "", "h" * 100, "ünïcode"):
        assert validate_writer_id(default_writer_id(host, 99999)) is not None
    assert default_writer_id().endswith(f"-{os.getpid()}")


def test_stream_sequence_reads_both_reply_formats() -> None:
    assert stream_sequence("$JS.ACK.ACKS.poh.1.2001.17.1795934579859145691.0") == 2001
    assert stream_sequence("$JS.ACK.hub.ACCHASH.ACKS.poh.3.77.12.1795934579859145691.5.tok") == 77


def test_settings_refuse_bad_names() -> None:
    with pytest.raises(ValueError, match="not a NATS URL"):
        NatsSettings("http://x")
    with pytest.raises(ValueError, match="--durable"):
        NatsSettings("nats://x:4222", durable="a.b")
    with pytest.raises(ValueError, match="--ack-wait"):
        NatsSettings("nats://x:4222", ack_wait=0)


async def test_a_redelivery_of_a_message_still_held_is_acked_with_it_not_archived_twice() -> None:
    source = NatsSource(NatsSettings("nats://127.0.0.1:1"), LineValidator())
    line = sample_lines(1)[0]

    def msg(delivered: int) -> Any:
        return SimpleNamespace(reply=f"$JS.ACK.ACKS.poh.{delivered}.5.{delivered}.0.0", data=line, subject="acks.x")

    first = await source._make_chunk([msg(1)])
    assert first is not None
    assert first.acks == [line]
    assert await source._make_chunk([msg(2)]) is None  # the same stream sequence, still in flight here
    assert source.stats.duplicates == 1
    (delivery,) = source._in_flight.values()
    assert delivery.replies == ["$JS.ACK.ACKS.poh.1.5.1.0.0", "$JS.ACK.ACKS.poh.2.5.2.0.0"]  # both acked when stored


async def test_extra_checks_of_messages_run_off_the_event_loop() -> None:
    """Signature checks cost ~70 µs a message: a chunk of them must not stall the loop."""
    lines = sample_lines(50)
    rejected = lines[::3]
    checked_on: set[str] = set()

    def check(line: bytes) -> str | None:
        checked_on.add(threading.current_thread().name)
        return "rejected by the test" if line in rejected else None

    source = NatsSource(NatsSettings("nats://127.0.0.1:1"), LineValidator(checks=[check]))
    msgs = [
        SimpleNamespace(reply=f"$JS.ACK.ACKS.poh.1.{seq}.{seq}.0.0", data=line, subject="acks.x")
        for seq, line in enumerate(lines, 1)
    ]
    chunk = await source._make_chunk(msgs)
    assert chunk is not None
    assert threading.current_thread().name not in checked_on
    assert len(checked_on) == 1
    assert [reject.raw for reject in chunk.rejects] == rejected
    assert chunk.acks == [line for line in lines if line not in rejected]


# -- the source against the server ---------------------------------------------


async def test_messages_are_acked_only_once_stored_and_pulls_follow_the_batch_size(
    nats_server: NatsServer, names: SimpleNamespace, source_of: Any
) -> None:
    await publish(nats_server.url, names, sample_lines(1000))
    source = await source_of(fetch_size=100)
    chunks = source.chunks()
    chunk: Chunk = await anext(chunks)
    assert 0 < len(chunk.acks) <= 100
    assert chunk.on_stored is not None
    await asyncio.sleep(0.3)  # the pipeline does not ask for more: nothing more is pulled
    info = await consumer_info(nats_server.url, names.stream, names.durable)
    assert info.num_ack_pending <= 200  # this chunk and at most one pull request ahead
    assert info.num_pending >= 800
    assert info.ack_floor.stream_seq == 0  # nothing acknowledged before it is stored
    chunk.on_stored()

    async def first_chunk_acked() -> bool:
        info = await consumer_info(nats_server.url, names.stream, names.durable)
        return info.ack_floor.stream_seq >= len(chunk.acks)

    await settle(first_chunk_acked)
    await chunks.aclose()


async def test_what_was_not_stored_is_handed_back_at_once_on_close(
    nats_server: NatsServer, names: SimpleNamespace, source_of: Any
) -> None:
    lines = sample_lines(300)
    await publish(nats_server.url, names, lines)
    first = await source_of(fetch_size=100, ack_wait=60)
    chunks = first.chunks()
    held = await anext(chunks)  # never stored: a storage failure, or an interrupted run
    await chunks.aclose()
    await first.aclose()
    assert first.stats.returned >= len(held.acks)
    second = await source_of(fetch_size=500, ack_wait=60, until_empty=True)
    seen: list[bytes] = []
    started = time.monotonic()
    async for chunk in second.chunks():
        seen += chunk.acks
        assert chunk.on_stored is not None
        chunk.on_stored()
    assert sorted(seen) == sorted(lines)  # well before the 60 s ack wait
    assert time.monotonic() - started < 10


async def test_a_slow_batch_is_kept_in_progress_instead_of_redelivered(
    nats_server: NatsServer, names: SimpleNamespace, source_of: Any
) -> None:
    await publish(nats_server.url, names, sample_lines(50))
    slow = await source_of(fetch_size=50, ack_wait=1.0)
    chunks = slow.chunks()
    chunk = await anext(chunks)
    assert len(chunk.acks) == 50
    await asyncio.sleep(2.5)  # storage takes 2.5 ack waits
    info = await consumer_info(nats_server.url, names.stream, names.durable)
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 50
    assert chunk.on_stored is not None
    chunk.on_stored()
    await chunks.aclose()
    await slow.aclose()
    info = await consumer_info(nats_server.url, names.stream, names.durable)
    assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)


# -- the command -----------------------------------------------------------------


def test_publish_creates_the_stream_and_prints_its_throughput(
    nats_server: NatsServer, names: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "acks.jsonl"
    path.write_bytes(b"\n".join(sample_lines(2000)) + b"\n\n")
    assert publish_cli(nats_server, path, names) == 0
    err = capsys.readouterr().err
    assert "created JetStream stream" in err
    assert "2,000 messages" in err
    assert "msgs/s" in err
    assert "2,000 stored" in err

    async def state() -> Any:
        nc = await nats.connect(nats_server.url)
        try:
            return await nc.jetstream().stream_info(names.stream)
        finally:
            await nc.close()

    info = asyncio.run(state())
    assert info.state.messages == 2000
    assert info.config.retention == "workqueue"
    assert info.config.subjects == [names.subject.split(".")[0] + ".>"]  # every node's acks.<node>
    # With --msg-id, publishing the same file again within the duplicate window adds nothing.
    assert publish_cli(nats_server, path, names, "--msg-id") == 0
    assert publish_cli(nats_server, path, names, "--msg-id") == 0
    assert "2,000 dropped as duplicates" in capsys.readouterr().err
    assert asyncio.run(state()).state.messages == 4000


def test_publish_to_a_subject_no_stream_listens_on_fails(
    nats_server: NatsServer, names: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "acks.jsonl"
    path.write_bytes(b"\n".join(sample_lines(3)) + b"\n")
    assert publish_cli(nats_server, path, names) == 0
    other = SimpleNamespace(stream=names.stream, subject="elsewhere" + names.subject)  # outside acks<tag>.>
    assert publish_cli(nats_server, path, other) == 1
    assert "no stream listens on subject" in capsys.readouterr().err


def test_an_unknown_source_or_an_unreachable_server_is_a_usage_error(tmp_path: Path) -> None:
    out = subprocess.run([*CLI, "--source", "kafka://x", "-o", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "nats://HOST:PORT" in out.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = subprocess.run(
        [*CLI, "--source", f"nats://127.0.0.1:{port}", "-o", str(tmp_path)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "cannot connect to NATS" in out.stderr


def test_a_poisoned_message_is_rejected_once_and_never_redelivered(
    nats_server: NatsServer, names: SimpleNamespace, tmp_path: Path
) -> None:
    good = sample_lines(1000)
    poison = [b'{"id":"tx-poison","timestamp":"yesterday","signature":"s","pubkey":"p"}', b"\xff not json"]
    lines = good[:400] + poison[:1] + good[400:] + poison[1:]
    asyncio.run(publish(nats_server.url, names, lines))
    rejects = tmp_path / "rejects.jsonl"
    run = [
        *CLI,
        *consumer_options(nats_server.url, names, ack_wait=1),
        "--until-empty",
        "-t",
        "0.2",
        "--rejects",
        str(rejects),
        "-o",
        str(tmp_path / "archive"),
    ]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "field 'timestamp' is not an RFC 3339 time" in first.stderr
    assert f"stream {names.stream} seq 401" in first.stderr
    assert "2 terminated" in first.stderr
    assert rejects.read_bytes() == b"".join(p + b"\n" for p in poison)
    time.sleep(1.5)  # longer than the ack wait: a message that was not terminated would be redelivered now
    info = asyncio.run(consumer_info(nats_server.url, names.stream, names.durable))
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    second = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert "0 messages received" in second.stderr
    assert rejects.read_bytes() == b"".join(p + b"\n" for p in poison)
    archived = sorted(ack for _, ack in read_archive_dir(tmp_path / "archive"))
    assert archived == sorted(good)


def test_sigterm_mid_stream_acks_what_was_stored_and_hands_back_the_rest(
    nats_server: NatsServer, names: SimpleNamespace, tmp_path: Path
) -> None:
    lines = sample_lines(30_000)
    asyncio.run(publish(nats_server.url, names, lines))
    run = [*CLI, *consumer_options(nats_server.url, names, ack_wait=60), "-o", str(tmp_path / "archive")]
    batcher = subprocess.Popen(run, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_delivered(nats_server.url, names, 5000, [batcher], timeout=30)
        batcher.send_signal(signal.SIGTERM)
        _, err = batcher.communicate(timeout=30)
    finally:
        if batcher.poll() is None:
            batcher.kill()
    assert batcher.returncode == 0, err
    assert "acknowledged after storage" in err
    # What it did not store was handed back: the next batcher gets it at once, not after the 60 s ack wait.
    started = time.monotonic()
    rest = subprocess.run([*run, "--until-empty"], capture_output=True, text=True, timeout=40)
    assert rest.returncode == 0, rest.stderr
    assert time.monotonic() - started < 30
    archived = [ack for _, ack in read_archive_dir(tmp_path / "archive")]
    assert sorted(archived) == sorted(lines)  # all there, and none twice: a clean stop acks all it stored
    info = asyncio.run(consumer_info(nats_server.url, names.stream, names.durable))
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


def test_a_server_restart_mid_stream_loses_nothing(names: SimpleNamespace, tmp_path: Path) -> None:
    server = NatsServer()
    try:
        server.start()
        lines = sample_lines(20_000)
        asyncio.run(publish(server.url, names, lines))
        run = [*CLI, *consumer_options(server.url, names, ack_wait=3), "--until-empty", "-o", str(tmp_path / "archive")]
        batcher = subprocess.Popen(run, stderr=subprocess.PIPE, text=True)
        try:
            wait_until_delivered(server.url, names, 3000, [batcher], timeout=30)
            server.stop()
            time.sleep(1.5)
            server.start()
            _, err = batcher.communicate(timeout=60)
        finally:
            if batcher.poll() is None:
                batcher.kill()
        assert batcher.returncode == 0, err
        assert "disconnected" in err
        assert "reconnected" in err
        archived = Counter(ack for _, ack in read_archive_dir(tmp_path / "archive"))
        assert set(archived) == set(lines), err
    finally:
        server.remove()


def read_archive_dir(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(root.rglob("ack_batch_*")):
        yield from batch_acks(str(path.relative_to(root)), path.read_bytes())


def batch_acks(key: str, body: bytes) -> Iterator[tuple[str, bytes]]:
    parsed = parse_key(key)
    assert parsed is not None, key
    for item in msgspec.json.decode(decompress(parsed.codec, body)):
        yield key, msgspec.json.encode(item)


# -- scale-out: three processes, one prefix, one of them killed -------------------


BATCH = 500
MAX_IN_FLIGHT = 4


def test_three_batchers_drain_300k_into_one_s3_prefix_and_survive_a_kill_9(
    nats_server: NatsServer, names: SimpleNamespace, acks_300k: Path, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    assert publish_cli(nats_server, acks_300k, names) == 0
    prefix = "scale/out"
    env = {**os.environ, **s3_server.env()}
    common = [
        *consumer_options(nats_server.url, names, ack_wait=3),
        "--until-empty",
        "-n",
        str(BATCH),
        "--max-in-flight",
        str(MAX_IN_FLIGHT),
        "-o",
        f"s3://{s3_bucket}/{prefix}",
    ]
    logs = [open(tmp_path / f"batcher{i}.log", "w+") for i in range(3)]  # noqa: SIM115 - closed below
    batchers = [subprocess.Popen([*CLI, *common], stderr=logs[i], env=env) for i in range(3)]
    try:
        # Kill one while the stream is being drained, with messages in its hands.
        wait_until_delivered(nats_server.url, names, 100_000, batchers, timeout=60)
        batchers[0].send_signal(signal.SIGKILL)
        for batcher in batchers[1:]:
            batcher.wait(timeout=120)
        batchers[0].wait(timeout=10)
    finally:
        for batcher in batchers:
            if batcher.poll() is None:
                batcher.kill()
                batcher.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    assert batchers[0].returncode == -signal.SIGKILL
    for batcher, output in zip(batchers[1:], outputs[1:], strict=True):
        assert batcher.returncode == 0, output
        assert "refusing to overwrite" not in output
    info = asyncio.run(consumer_info(nats_server.url, names.stream, names.durable))
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    redelivered = info.delivered.consumer_seq - info.delivered.stream_seq  # each delivery takes a consumer seq
    assert redelivered > 0  # the killed batcher held messages, and the others took them over

    client = s3_server.client()
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix=prefix + "/")
        for item in page.get("Contents", [])
    ]
    writers = Counter(parse_key(key).writer_id for key in keys)  # type: ignore[union-attr]
    expected_writers = {default_writer_id(pid=batcher.pid) for batcher in batchers}
    assert set(writers) <= expected_writers, writers
    assert len(writers) >= 2, writers
    assert set(writers) >= {default_writer_id(pid=b.pid) for b in batchers[1:]}
    ids: Counter[str] = Counter()
    killed = default_writer_id(pid=batchers[0].pid)
    stored_by_killed: set[str] = set()
    for key in keys:
        body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        key_ids = [ack_id(ack) for _, ack in batch_acks(key, body)]
        ids.update(key_ids)
        if parse_key(key).writer_id == killed:  # type: ignore[union-attr]
            stored_by_killed.update(key_ids)
    expected = {ack_id(line) for line in acks_300k.read_bytes().splitlines()}
    assert set(ids) == expected  # every ACK archived
    duplicated = {ack for ack, seen in ids.items() if seen > 1}
    duplicates = sum(ids.values()) - len(ids)
    # Only what the killed batcher had stored but not yet acknowledged can appear twice (once
    # from it, once redelivered to a survivor), so at most what one batcher holds: its pending
    # ACKs (batch size x (max in flight + 2)), the chunk in hand and one pull ahead: the
    # README's batch size x (max in flight + 4).
    assert duplicated <= stored_by_killed
    assert all(ids[ack] == 2 for ack in duplicated)
    assert duplicates <= BATCH * (MAX_IN_FLIGHT + 4), duplicates
    # `verify` shows them: the same duplicate ids (a SIGKILL may also leave a seq gap for the killed writer).
    audit = subprocess.run(
        [*CLI, "verify", f"s3://{s3_bucket}/{prefix}", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    report = json.loads(audit.stdout)
    assert report["acks"] == sum(ids.values())
    assert {dup["id"] for dup in report["duplicates"]} == {ack for ack, seen in ids.items() if seen > 1}
    print(f"\n{len(keys)} objects from {len(writers)} writers; {redelivered} redelivered, {duplicates} duplicates")
