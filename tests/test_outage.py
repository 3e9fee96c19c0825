"""Storage outages with real processes: the S3 server stopped mid-run, a full disk. Nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from faultkit import (
    POH,
    Ledger,
    ack_line,
    child_env,
    fill_disk,
    local_objects,
    peak_rss_kib,
    run,
    s3_objects,
    small_disk,
    wait_for,
    write_acks,
)
from poh_batcher.logs import LogObserver
from poh_batcher.parsing import LineValidator
from poh_batcher.pipeline import ArchiveSettings, run_archive
from poh_batcher.retry import RetryPolicy
from poh_batcher.sources.lines import LineSource
from poh_batcher.spool import Spool
from poh_batcher.storage.local import LocalStorage, _storage_error
from s3server import S3Server, S3ServerError

MEMORY_LIMIT_KIB = 150 * 1024


@pytest.fixture(scope="module")
def own_s3() -> Iterator[S3Server]:
    """A server of our own: the session's one must not be stopped."""
    server = S3Server()
    try:
        server.start()
    except S3ServerError as exc:
        server.close()
        pytest.fail(f"SeaweedFS could not start:\n{exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


class Watched:
    """A CLI process whose stderr goes to a file and whose peak memory is sampled."""

    def __init__(self, args: list[str], folder: Path, env: dict[str, str]) -> None:
        self.log = folder / f"stderr.{time.monotonic_ns()}"
        with open(self.log, "wb") as stderr:
            self.process = subprocess.Popen([*POH, *args], stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        self.peak_kib = 0

    def sample(self) -> bool:
        """Update the peak memory; True once the process has exited."""
        peak = peak_rss_kib(self.process.pid)
        if peak is not None and self.process.poll() is None:
            self.peak_kib = max(self.peak_kib, peak)
        return self.process.poll() is not None

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        assert wait_for(self.sample, timeout, 0.05), f"still running after {timeout} s:\n{self.stderr()[-3000:]}"
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@contextlib.contextmanager
def server_back_and_child_gone(server: S3Server, child: Watched) -> Iterator[None]:
    """Whatever the test body does to them, afterwards the child is gone and the module's server runs."""
    try:
        yield
    finally:
        child.kill()
        if not server.running:
            server.start()


def until_stored(child: Watched, client: Any, bucket: str, prefix: str, objects: int) -> bool:
    """Wait (60 s at most) until ``objects`` batches are under ``prefix``; False if the child exited first."""

    def stored() -> bool:
        return client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("KeyCount", 0) >= objects

    return wait_for(lambda: child.sample() or stored(), 60, 0.02) and child.process.poll() is None


def retry_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "retrying" in line]


def test_s3_server_stopped_mid_run(own_s3: S3Server, tmp_path: Path) -> None:
    """Stopped for several seconds while batches are being stored, then started again."""
    bucket = own_s3.create_bucket()
    source = tmp_path / "acks.jsonl"
    expected = write_acks(source, 100_000)
    env = child_env(**own_s3.env())
    args = ["-i", str(source), "-o", f"s3://{bucket}/outage", "-n", "200", "--spool-dir", str(tmp_path / "spool")]
    client = own_s3.client()
    ledger = Ledger()
    child = Watched(args, tmp_path, env)
    with server_back_and_child_gone(own_s3, child):
        assert until_stored(child, client, bucket, "outage", 20), f"the run ended before the outage:\n{child.stderr()}"
        ledger.observe(s3_objects(client, bucket, "outage"))
        before = ledger.objects
        stopped_at = time.monotonic()
        own_s3.stop()
        down_until = time.monotonic() + 4.0
        while time.monotonic() < down_until:  # the outage: several seconds with the server gone
            child.sample()
            time.sleep(0.05)
        assert child.process.poll() is None, f"the run gave up during the outage:\n{child.stderr()[-3000:]}"
        outage_warnings = len(retry_warnings(child.stderr()))
        own_s3.start()
        outage = time.monotonic() - stopped_at
        status = child.wait(120)
    stderr = child.stderr()
    assert status == 0, stderr[-3000:]
    ledger.observe(s3_objects(client, bucket, "outage"))
    assert ledger.overwritten == []
    ledger.assert_each_once(expected)
    assert ledger.objects > before
    # Memory bounded: input paused while storage was away (backpressure), not buffered.
    assert 0 < child.peak_kib < MEMORY_LIMIT_KIB, f"peak RSS {child.peak_kib} KiB"
    # The outage was reported on stderr, clearly and without flooding it.
    warnings = retry_warnings(stderr)
    assert outage_warnings >= 1, stderr[-3000:]
    assert all("S3" in line or "s3://" in line for line in warnings), warnings[:3]
    # Rate-limited: one warning per LogObserver.RETRY_WARNING_INTERVAL (5 s), however many batches retry.
    assert len(warnings) <= outage / 5 + 3, f"{len(warnings)} retry lines in a {outage:.0f} s outage"
    assert own_s3.secret_key not in stderr
    print(
        f"\nS3 outage of {outage:.1f} s: {len(expected)} ACKs, 0 lost, 0 duplicates, "
        f"{ledger.objects} objects, peak RSS {child.peak_kib // 1024} MiB, {len(warnings)} retry warnings"
    )


def test_s3_unreachable_at_start_with_a_spool_accepts_and_delivers_once_it_answers(
    own_s3: S3Server, tmp_path: Path
) -> None:
    bucket = own_s3.create_bucket()
    source = tmp_path / "acks.jsonl"
    expected = write_acks(source, 20_000)
    env = child_env(**own_s3.env())
    spool = tmp_path / "spool"
    args = ["-i", str(source), "-o", f"s3://{bucket}/late", "-n", "200", "--spool-dir", str(spool)]
    own_s3.stop()
    child = Watched(args, tmp_path, env)
    with server_back_and_child_gone(own_s3, child):
        assert wait_for(lambda: child.sample() or "retrying" in child.stderr(), 30), child.stderr()
        assert child.process.poll() is None, child.stderr()
        assert wait_for(lambda: child.sample() or list(spool.glob("seg-*.wal")), 10), child.stderr()
        own_s3.start()
        status = child.wait(120)
    stderr = child.stderr()
    assert status == 0, stderr[-3000:]
    assert "connection refused" in stderr
    assert "starting anyway: ACKs are accepted into the spool" in stderr
    assert own_s3.secret_key not in stderr
    ledger = Ledger()
    ledger.observe(s3_objects(own_s3.client(), bucket, "late"))
    ledger.assert_each_once(expected)


def test_s3_unreachable_at_start_without_a_spool_fails_fast(own_s3: S3Server, tmp_path: Path) -> None:
    bucket = own_s3.create_bucket()
    source = tmp_path / "acks.jsonl"
    write_acks(source, 100)
    own_s3.stop()
    try:
        done = run(["-i", str(source), "-o", f"s3://{bucket}/p", "--no-spool"], env=child_env(**own_s3.env()))
    finally:
        own_s3.start()
    assert done.returncode == 3, done.stderr
    assert f"error: cannot use s3://{bucket}/p: " in done.stderr
    assert "connection refused" in done.stderr
    assert "starting anyway" not in done.stderr


# -- a full disk -------------------------------------------------------------------


@pytest.mark.parametrize("spool_on_full_disk", [False, True], ids=["destination-full", "destination-and-spool-full"])
def test_full_disk_then_space_returns(tmp_path: Path, spool_on_full_disk: bool) -> None:
    source = tmp_path / "acks.jsonl"
    expected = write_acks(source, 20_000)
    # 4 MiB: once the filler goes, the whole run fits (journal 1.9 MB + 100 batch files of one 4 KiB page).
    # On a 2 MiB disk the spool could journal the next 1 MiB input block into the last free bytes that
    # the batches in flight need, and the run then rightly stays paused until more space is freed
    # (README, Guarantees); whether that happened depended on timing, so the test did too.
    with small_disk(tmp_path / "disk", "4m") as disk:
        out = disk / "out"
        spool = disk / "spool" if spool_on_full_disk else tmp_path / "spool"
        args = ["-i", str(source), "-o", str(out), "-n", "200", "-t", "0.2", "--spool-dir", str(spool)]
        filler = fill_disk(disk, leave=96 * 1024 if spool_on_full_disk else 0)
        child = Watched(args, tmp_path, child_env())
        try:
            expected_message = "cannot write to spool" if spool_on_full_disk else "disk full"
            assert wait_for(lambda: child.sample() or expected_message in child.stderr(), 30), child.stderr()
            assert child.process.poll() is None, child.stderr()
            time.sleep(1.5)  # stays paused, retrying, for a while
            assert child.process.poll() is None, child.stderr()
            filler.unlink()  # space returns
            status = child.wait(60)
        finally:
            child.kill()
        stderr = child.stderr()
        assert status == 0, stderr[-3000:]
        assert "No space left on device" in stderr
        if spool_on_full_disk:
            assert "input paused" in stderr
        else:
            assert "(disk full: free space and it will be retried)" in stderr
        ledger = Ledger()
        ledger.observe(local_objects(out))
        ledger.assert_each_once(expected)
        assert not list(spool.glob("seg-*.wal"))
        assert child.peak_kib < MEMORY_LIMIT_KIB
        print(f"\nfull disk ({'spool too' if spool_on_full_disk else 'destination'}): 0 lost, 0 duplicates")


def test_sigterm_during_s3_outage(own_s3: S3Server, tmp_path: Path) -> None:
    """The server is down: SIGTERM exits within --shutdown-timeout with status 4; the next run delivers."""
    bucket = own_s3.create_bucket()
    source = tmp_path / "acks.jsonl"
    expected = write_acks(source, 100_000)
    env = child_env(**own_s3.env())
    spool = tmp_path / "spool"
    args = ["-i", str(source), "-o", f"s3://{bucket}/term", "-n", "200", "--spool-dir", str(spool),
            "--shutdown-timeout", "2"]  # fmt: skip
    client = own_s3.client()
    child = Watched(args, tmp_path, env)
    with server_back_and_child_gone(own_s3, child):
        assert until_stored(child, client, bucket, "term", 5), child.stderr()
        own_s3.stop()
        assert wait_for(lambda: "retrying" in child.stderr(), 30), child.stderr()
        started = time.monotonic()
        child.process.send_signal(signal.SIGTERM)
        status = child.wait(30)
        seconds = time.monotonic() - started
    stderr = child.stderr()
    assert status == 4, stderr[-3000:]
    assert seconds < 2 + 2.5, f"{seconds:.1f} s to stop with --shutdown-timeout 2"
    assert f"kept in the spool {spool}" in stderr
    assert list(spool.glob("seg-*.wal"))
    done = run(args, env=env)
    assert done.returncode == 0, done.stderr
    ledger = Ledger()
    ledger.observe(s3_objects(client, bucket, "term"))
    ledger.assert_each_once(expected)


# -- a full disk without mounting anything: LocalStorage raising ENOSPC for a while ----------


class FullDisk(LocalStorage):
    """The real LocalStorage, whose writes fail with ENOSPC (mapped as it maps them) while ``full``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.full = True
        self.refused = 0

    def write_durably(self, key: str, data: bytes) -> None:
        if self.full:
            self.refused += 1
            error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise _storage_error(key, self.path_of(key), error) from error
        super().write_durably(key, data)


async def test_enospc_backend_then_space_returns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [ack_line(i) for i in range(5000)]
    storage = FullDisk(tmp_path / "out")
    spool = Spool(tmp_path / "spool", destination="file:///full")
    recovered = spool.open(None)
    settings = ArchiveSettings(
        batch_size=200, batch_timeout=0.05, retry=RetryPolicy(attempts=None, initial_delay=0.01, max_delay=0.1)
    )
    source = LineSource(io.BytesIO(b"\n".join(lines) + b"\n"), LineValidator())

    async def no_rejects(rejects: list[Any]) -> None:
        raise AssertionError(rejects)

    async def free_space_later() -> None:
        await asyncio.sleep(0.5)  # the disk stays full for a while: every batch is refused, and retried
        assert storage.refused >= 10
        storage.full = False

    caplog.set_level(logging.WARNING, logger="poh_batcher")
    freeing = asyncio.ensure_future(free_space_later())
    summary = await run_archive(
        settings, source, storage, report_rejects=no_rejects, stop=asyncio.Event(), spool=spool,
        recovered=recovered, observers=[LogObserver()],
    )  # fmt: skip
    await freeing
    await spool.close()
    assert (summary.acks_stored, summary.acks_not_stored, summary.failure) == (5000, 0, None)
    assert summary.retries >= 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("No space left on device (disk full: free space and it will be retried)" in w for w in warnings)
    assert len(warnings) <= 3, "retry warnings are rate-limited"
    ledger = Ledger()
    ledger.observe(local_objects(tmp_path / "out"))
    assert ledger.duplicates() == {}
    assert sum(ledger.ids.values()) == 5000
    assert not list((tmp_path / "spool").glob("seg-*.wal"))
