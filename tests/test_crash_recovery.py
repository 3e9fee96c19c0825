"""Real processes killed at random moments: no accepted ACK lost, none stored twice, no object overwritten.

Each trial archives a generated file with ``-i FILE``, SIGKILLs the command one
or more times at random moments (some while it starts up and replays the
spool, some while batches are being stored), then runs the same command until
it completes. The destination must then hold every ACK of the file exactly
once, and every object ever seen must still hold the bytes it was first seen
with.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from faultkit import POH, Ledger, child_env, fill_disk, local_objects, run, small_disk, wait_for, write_acks
from poh_batcher.batcher import pack_lines
from poh_batcher.spool import _BATCH, _read_records

LINES = 20_000
BATCH = 200
TRIALS = 20
SLOW_TRIALS = 100


@dataclass
class TrialReport:
    kills: int
    finished_before_kill: int
    runs: int
    objects: int


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("input") / "acks.jsonl"
    return path, write_acks(path, LINES)


@pytest.fixture(scope="module")
def full_run_seconds(source: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> float:
    """How long one uninterrupted run takes here (start-up included): the range of kill moments."""
    folder = tmp_path_factory.mktemp("calibrate")
    started = time.monotonic()
    done = run(archive_args(source[0], folder))
    assert done.returncode == 0, done.stderr
    return time.monotonic() - started


def archive_args(source: Path, folder: Path, *extra: str) -> list[str]:
    return [
        "-i", str(source), "-o", str(folder / "out"), "-n", str(BATCH), "-t", "0.2",
        "--spool-dir", str(folder / "spool"), *extra,
    ]  # fmt: skip


def kill_at_random(args: list[str], folder: Path, rng: random.Random, full: float) -> int:
    """Start the command, SIGKILL it at a random moment; its exit status (0: it finished first)."""
    before = len(local_objects(folder / "out"))
    with open(folder / "stderr", "ab") as stderr:
        process = subprocess.Popen([*POH, *args], stdout=subprocess.DEVNULL, stderr=stderr, env=child_env())
    try:
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.0, full))  # anywhere: start-up, spool replay, reading, storing
        else:
            # Once storing has begun again, after a short random delay: a kill mid-batch.
            wait_for(lambda: process.poll() is not None or len(local_objects(folder / "out")) > before, full * 2, 0.003)
            time.sleep(rng.uniform(0.0, 0.08))
        process.send_signal(signal.SIGKILL)
    finally:
        status = process.wait(30)
    return status


def crash_trial(source: Path, folder: Path, rng: random.Random, full: float, ledger: Ledger) -> TrialReport:
    args = archive_args(source, folder)
    kills = finished = 0
    for _ in range(rng.randint(1, 3)):
        status = kill_at_random(args, folder, rng, full)
        ledger.observe(local_objects(folder / "out"))
        if status == 0:
            finished += 1
        else:
            assert status == -signal.SIGKILL, (folder / "stderr").read_text()
            kills += 1
    runs = kills + finished
    for _ in range(3):  # "run the same command again until it completes"
        done = run(args)
        runs += 1
        ledger.observe(local_objects(folder / "out"))
        assert done.returncode in (0, 3), done.stderr
        if done.returncode == 0:
            break
    else:
        pytest.fail(f"the command did not complete after the kills:\n{done.stderr}")
    return TrialReport(kills, finished, runs, ledger.objects)


def check_archive(ledger: Ledger, expected: list[str], folder: Path) -> None:
    assert ledger.overwritten == [], f"objects overwritten or removed: {ledger.overwritten[:5]}"
    missing = ledger.missing(expected)
    assert missing == [], f"{len(missing)} ACKs lost, e.g. {missing[:5]} ({folder})"
    duplicates = ledger.duplicates()
    assert duplicates == {}, f"{len(duplicates)} ACKs stored twice, e.g. {list(duplicates.items())[:5]} ({folder})"
    assert sum(ledger.ids.values()) == len(expected)
    assert not list((folder / "spool").glob("seg-*.wal")), "a completed run leaves no segment behind"


def run_trials(count: int, source: tuple[Path, list[str]], full: float, seed: int) -> list[TrialReport]:
    rng = random.Random(seed)
    reports: list[TrialReport] = []
    for trial in range(count):
        with tempfile.TemporaryDirectory(prefix=f"poh-crash-{trial}-") as tmp:
            folder = Path(tmp)
            ledger = Ledger()
            reports.append(crash_trial(source[0], folder, rng, full, ledger))
            check_archive(ledger, source[1], folder)
    kills = sum(r.kills for r in reports)
    print(f"\n{count} trials, {kills} SIGKILLs, 0 ACKs lost, 0 duplicates, 0 overwritten (seed {seed})")
    assert kills >= count // 2, "most kills must land before the run completes"
    return reports


def test_kill9_at_random_moments(source: tuple[Path, list[str]], full_run_seconds: float) -> None:
    seed = int(os.environ.get("POH_CRASH_SEED", random.randrange(1 << 30)))
    run_trials(TRIALS, source, full_run_seconds, seed)


@pytest.mark.slow
def test_kill9_at_random_moments_many(source: tuple[Path, list[str]], full_run_seconds: float) -> None:
    seed = int(os.environ.get("POH_CRASH_SEED", random.randrange(1 << 30)))
    run_trials(SLOW_TRIALS, source, full_run_seconds, seed)


@contextlib.contextmanager
def blocked_destination(out: Path) -> Iterator[None]:
    """Make every store fail for good (a file where the day folder goes), then unblock."""
    today = time.strftime("%Y%m%d", time.gmtime())
    tomorrow = time.strftime("%Y%m%d", time.gmtime(time.time() + 3600))
    out.mkdir(parents=True, exist_ok=True)
    blockers = [out / day for day in {today, tomorrow}]
    for blocker in blockers:
        blocker.write_bytes(b"not a folder")
    try:
        yield
    finally:
        for blocker in blockers:
            blocker.unlink()


def planned_batches(spool: Path) -> dict[int, tuple[int, str, str, int]]:
    import json

    plans: dict[int, tuple[int, str, str, int]] = {}
    files = sorted(spool.glob("seg-*.wal"), key=lambda p: int(p.stem[4:]))
    for position, path in enumerate(files):
        records, _ = _read_records(path, last=position == len(files) - 1)
        for kind, payload in records:
            if kind == _BATCH:
                plan = json.loads(payload)
                plans[plan["first"]] = (plan["count"], plan["key"], plan["codec"], plan["level"])
    return plans


def test_kill9_during_batch_replay(tmp_path: Path) -> None:
    """Plans recorded by a failed run are replayed to their keys, byte for byte, across kills."""
    source = tmp_path / "acks.jsonl"
    expected = write_acks(source, 3000)
    lines = source.read_bytes().splitlines()
    args = archive_args(source, tmp_path, "-n", "10", "--max-in-flight", "32")
    with blocked_destination(tmp_path / "out"):
        first = run(args)
    assert first.returncode == 3, first.stderr
    assert "kept in the spool" in first.stderr
    plans = planned_batches(tmp_path / "spool")
    assert len(plans) >= 10, plans
    ledger = Ledger()
    rng = random.Random()
    interrupted_replays = 0
    for _ in range(6):
        before = len(local_objects(tmp_path / "out"))
        status = kill_at_random(args, tmp_path, rng, 0.9)
        after = len(local_objects(tmp_path / "out"))
        ledger.observe(local_objects(tmp_path / "out"))
        if status == -signal.SIGKILL and before < len(plans) and after > before:
            interrupted_replays += 1
        if status == 0:
            break
    done = run(args)
    assert done.returncode == 0, done.stderr
    ledger.observe(local_objects(tmp_path / "out"))
    check_archive(ledger, expected, tmp_path)
    objects = local_objects(tmp_path / "out")
    for first, (count, key, codec, level) in plans.items():
        rebuilt = pack_lines(lines[first : first + count], codec=codec, level=level).payload
        assert objects.get(key) == rebuilt, f"batch {first} was not replayed to {key} byte for byte"
    print(f"\n{len(plans)} planned batches replayed to their keys; {interrupted_replays} replays cut by SIGKILL")


def sigterm_when_retrying(args: list[str], folder: Path, timeout: float) -> tuple[int, float, str]:
    """Start the command, wait for its first retry warning, SIGTERM it: (status, seconds to exit, stderr)."""
    log = folder / "stderr.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([*POH, *args], stdout=subprocess.DEVNULL, stderr=stderr, env=child_env())
    try:
        assert wait_for(lambda: "retrying" in log.read_text(errors="replace"), 30), log.read_text()
        time.sleep(0.3)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout + 15)
        return status, time.monotonic() - started, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("phase", ["archiving", "replaying"])
def test_sigterm_during_outage(tmp_path: Path, phase: str) -> None:
    """Disk full at the destination: SIGTERM exits within --shutdown-timeout, status 4, spool intact."""
    source = tmp_path / "acks.jsonl"
    expected = write_acks(source, 5000)
    spool = tmp_path / "spool"
    with small_disk(tmp_path / "out", "1m") as out:
        args = archive_args(source, tmp_path, "--shutdown-timeout", "2", "-t", "0.1")
        filler = fill_disk(out)
        if phase == "replaying":  # leave planned batches in the spool: the next run starts by replaying them
            process = subprocess.Popen([*POH, *args], stderr=subprocess.DEVNULL, env=child_env())
            assert wait_for(lambda: len(planned_batches(spool)) >= 2, 20)
            process.kill()
            process.wait()
        status, seconds, stderr = sigterm_when_retrying(args, tmp_path, 2)
        assert status == 4, stderr
        assert seconds < 2 + 2.5, f"took {seconds:.1f} s to stop with --shutdown-timeout 2"
        assert "No space left on device" in stderr
        assert "disk full" in stderr
        assert "NOT stored" in stderr
        assert f"kept in the spool {spool}" in stderr
        assert list(spool.glob("seg-*.wal")), "the spool keeps what was not stored"
        filler.unlink()
        done = run(args)
        assert done.returncode == 0, done.stderr
        assert "recovered from the spool" in done.stderr
        ledger = Ledger()
        ledger.observe(local_objects(out))
        check_archive(ledger, expected, tmp_path)
