"""The ``poh-batcher`` command, run for real in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SAMPLE = Path(__file__).parent / "data" / "acks_10k.jsonl"
LINES = SAMPLE.read_bytes().splitlines()
COMMAND = [sys.executable, "-m", "poh_batcher.cli"]
KEY = re.compile(r"\d{8}/\d{2}/ack_batch_(?:[A-Za-z0-9.-]+_)?\d{6,}\.json(\.zst|\.gz)?")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of the command: no POH_BATCHER_* settings leaking in, a private state folder."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POH_BATCHER_")}
    clean["XDG_STATE_HOME"] = str(tmp_path / "state")
    return clean


def run(
    args: list[str], env: dict[str, str], stdin: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*COMMAND, *args], input=stdin, capture_output=True, env=env, timeout=timeout)


def batch_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        assert KEY.fullmatch(path.relative_to(root).as_posix()), path
    return files


def decompress_with_tool(path: Path) -> bytes:
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-d", "-c", "-q", str(path)], capture_output=True, check=True).stdout
    if path.suffix == ".gz":
        return subprocess.run(["gzip", "-d", "-c", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


def stored_acks(root: Path) -> list[dict[str, object]]:
    """Every ACK stored under ``root``, in key order, read with the command-line tools."""
    acks: list[dict[str, object]] = []
    for path in batch_files(root):
        batch = json.loads(decompress_with_tool(path))
        assert isinstance(batch, list)
        assert batch
        acks.extend(batch)
    return acks


def parsed(lines: list[bytes]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines]


def summary_figures(stderr: bytes) -> dict[str, int]:
    text = stderr.decode()
    figures = {}
    for name, pattern in [
        ("read", r"([\d,]+) lines read"),
        ("accepted", r"([\d,]+) ACKs accepted"),
        ("rejected", r"([\d,]+) rejected"),
        ("stored", r"([\d,]+) ACKs stored"),
        ("batches", r"in ([\d,]+) batch"),
    ]:
        match = re.search(pattern, text)
        assert match, f"no {name!r} in summary: {text}"
        figures[name] = int(match[1].replace(",", ""))
    return figures


# -- the main job -------------------------------------------------------------------


def test_cat_pipe_zstd_files_equal_input(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "acks"
    command = f"cat {shlex.quote(str(SAMPLE))} | {shlex.join(COMMAND)} -n 500 -t 2.0 -o file://{out}"
    result = subprocess.run(command, shell=True, capture_output=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""  # stdout carries data only; the archive job prints none
    files = batch_files(out)
    assert len(files) == 20
    assert all(p.name.endswith(".json.zst") for p in files)
    assert [p.name for p in files if p.parent == files[0].parent][:2] == [
        "ack_batch_000000.json.zst",
        "ack_batch_000001.json.zst",
    ]
    assert stored_acks(out) == parsed(LINES)
    # minified as received: the stored arrays are the input lines joined by commas
    assert b",".join(decompress_with_tool(p)[1:-1] for p in files) == b",".join(LINES)
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in files)
    figures = summary_figures(result.stderr)
    assert figures == {"read": 10_000, "accepted": 10_000, "rejected": 0, "stored": 10_000, "batches": 20}
    for word in ("in,", "out", "ratio", " s,", "ACKs/s"):
        assert word in result.stderr.decode()


def test_gzip_files_read_by_gzip_tool(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "gz"
    result = run(["-n", "300", "--compression", "gzip", "-o", f"file://{out}"], env, b"\n".join(LINES[:1000]) + b"\n")
    assert result.returncode == 0, result.stderr
    files = batch_files(out)
    assert len(files) == 4
    assert all(p.name.endswith(".json.gz") for p in files)
    assert stored_acks(out) == parsed(LINES[:1000])


def test_compression_none(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "plain"
    result = run(["-n", "400", "--compression", "none", "-o", str(out)], env, b"\n".join(LINES[:1000]))
    assert result.returncode == 0, result.stderr
    files = batch_files(out)
    assert [p.suffix for p in files] == [".json"] * 3
    assert [len(json.loads(p.read_bytes())) for p in files] == [400, 400, 200]
    assert stored_acks(out) == parsed(LINES[:1000])


def test_extra_fields_non_ascii_and_whitespace_kept(tmp_path: Path, env: dict[str, str]) -> None:
    lines = [
        LINES[0],
        b'{"id":"tx-\xc3\xa9\xe6\x97\xa5","timestamp":"2025-01-01T00:00:00+02:00","signature":"s","pubkey":"p",'
        b'"slot":42,"meta":{"leader":"x","votes":[1,2.5,null]}}',
        b'  {"id" : "tx-3", "timestamp":"2025-01-01T00:00:00Z",\t"signature":"a  b","pubkey":"p","z":"\\u00e9"}  ',
    ]
    out = tmp_path / "out"
    result = run(["-o", str(out)], env, b"\n".join(lines) + b"\n")
    assert result.returncode == 0, result.stderr
    [path] = batch_files(out)
    raw = decompress_with_tool(path)
    assert raw == (
        b"[" + lines[0] + b"," + lines[1] + b","
        b'{"id":"tx-3","timestamp":"2025-01-01T00:00:00Z","signature":"a  b","pubkey":"p","z":"\\u00e9"}]'
    )
    assert json.loads(raw) == parsed(lines)


def test_input_file_option(tmp_path: Path, env: dict[str, str]) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(LINES[:700]) + b"\n")
    out = tmp_path / "out"
    result = run(["-i", str(source), "-n", "500", "-o", str(out)], env)
    assert result.returncode == 0, result.stderr
    assert stored_acks(out) == parsed(LINES[:700])
    assert summary_figures(result.stderr)["read"] == 700


def test_two_runs_overwrite_nothing_and_continue_seq(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "acks"
    first = run(["-n", "300", "-o", f"file://{out}"], env, b"\n".join(LINES[:1000]))
    assert first.returncode == 0, first.stderr
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in batch_files(out)}
    assert len(before) == 4
    second = run(["-n", "300", "-o", f"file://{out}"], env, b"\n".join(LINES[1000:2000]))
    assert second.returncode == 0, second.stderr
    after = batch_files(out)
    assert len(after) == 8
    for path, digest in before.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # untouched
    folders = {p.parent for p in after}
    if len(folders) == 1:  # both runs in the same UTC hour: seq continues
        assert [p.name for p in after] == [f"ack_batch_{i:06d}.json.zst" for i in range(8)]
    assert stored_acks(out) == parsed(LINES[:2000])


def test_writer_id_and_max_bytes(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    result = run(["--writer-id", "node-7", "--max-bytes", "4096", "-o", str(out)], env, b"\n".join(LINES[:200]))
    assert result.returncode == 0, result.stderr
    files = batch_files(out)
    assert len(files) > 5
    assert all(re.fullmatch(r"ack_batch_node-7_\d{6}\.json\.zst", p.name) for p in files)
    assert all(len(decompress_with_tool(p)) <= 4096 for p in files)
    assert stored_acks(out) == parsed(LINES[:200])


# -- invalid input ----------------------------------------------------------------


BAD = {
    3: b"{not json",
    5: b'{"id":"a","timestamp":"2025-01-01T00:00:00Z","signature":"s"}',
    6: b"",  # blank: skipped, not rejected
    9: b'{"id":"a","timestamp":"2025-01-01T00:00:00","signature":"s","pubkey":"p"}',
    10: b'{"id":"\xff","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}',
    12: b"[1,2]",
    13: b'{"id":"","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}',
    14: b'{"id":7,"timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}',
}
EXPECTED_REASONS = {
    3: "not valid JSON",
    5: "missing field 'pubkey'",
    9: "timestamp",
    10: "not valid UTF-8",
    12: "not a JSON object",
    13: "field 'id' is empty",
    14: "field 'id' must be a string",
}


def _mixed() -> tuple[list[bytes], list[bytes]]:
    good = iter(LINES)
    lines = [BAD[n] if n in BAD else next(good) for n in range(1, 21)]
    return lines, [line for n, line in enumerate(lines, 1) if n not in BAD]


def test_bad_lines_reported_rejected_and_rest_stored(tmp_path: Path, env: dict[str, str]) -> None:
    lines, good = _mixed()
    out, rejects = tmp_path / "out", tmp_path / "rejects.jsonl"
    rejects.write_bytes(b"earlier\n")  # appended to, not replaced
    result = run(["-o", str(out), "--rejects", str(rejects)], env, b"\n".join(lines) + b"\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    stderr = result.stderr.decode(errors="replace")
    reported = dict(re.findall(r"^line (\d+): (.+)$", stderr, re.M))
    assert sorted(map(int, reported)) == sorted(EXPECTED_REASONS)
    for number, reason in EXPECTED_REASONS.items():
        assert reason in reported[str(number)], (number, reported[str(number)])
    assert rejects.read_bytes() == b"earlier\n" + b"".join(BAD[n] + b"\n" for n in sorted(EXPECTED_REASONS))
    # FILE.reasons pairs with FILE line for line: the same reasons as on stderr, in order.
    reasons = (tmp_path / "rejects.jsonl.reasons").read_text().splitlines()
    assert [line.split(":")[0] for line in reasons] == [f"line {n}" for n in sorted(EXPECTED_REASONS)]
    assert reasons == [f"line {n}: {reported[str(n)]}" for n in sorted(EXPECTED_REASONS)]
    assert stored_acks(out) == parsed(good)
    figures = summary_figures(result.stderr)
    assert figures["rejected"] == 7
    assert figures["accepted"] == len(good) == 12
    assert figures["read"] == 20


def test_strict_stops_at_first_invalid_line(tmp_path: Path, env: dict[str, str]) -> None:
    lines, _ = _mixed()
    out = tmp_path / "out"
    result = run(["--strict", "-o", str(out)], env, b"\n".join(lines) + b"\n")
    assert result.returncode == 1, result.stderr
    stderr = result.stderr.decode()
    assert re.search(r"^line 3: not valid JSON", stderr, re.M)
    assert "line 5:" not in stderr
    assert stored_acks(out) == parsed(lines[:2])


# -- failures and options -----------------------------------------------------------


def test_unwritable_destination_one_line_no_traceback(tmp_path: Path, env: dict[str, str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    result = run(["-o", str(blocker / "sub")], env, LINES[0] + b"\n")
    assert result.returncode not in (0, 1)
    assert b"Traceback" not in result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("poh-batcher: error:")
    assert str(blocker) in lines[0]
    debug = run(["--debug", "-o", str(blocker / "sub")], env, LINES[0] + b"\n")
    assert debug.returncode == result.returncode
    assert b"Traceback" in debug.stderr


@pytest.mark.parametrize(
    "args",
    [["-n", "0"], ["-n", "x"], ["-t", "-1"], ["--compression", "lz4"], ["--no-such-option"], ["--max-bytes", "0"]],
)
def test_bad_option_exits_2(args: list[str], tmp_path: Path, env: dict[str, str]) -> None:
    result = run([*args, "-o", str(tmp_path / "out")], env, LINES[0])
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_destination_scheme_and_writer_id(tmp_path: Path, env: dict[str, str]) -> None:
    for args in (["-o", "ftp://host/x"], ["--writer-id", "a/b", "-o", str(tmp_path)]):
        result = run(args, env, LINES[0])
        assert result.returncode == 2, result.stderr
        assert b"Traceback" not in result.stderr
        assert len(result.stderr.decode().strip().splitlines()) == 1


# -- live pipes ------------------------------------------------------------------------


def _wait_for_files(root: Path, count: int, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [p for p in root.rglob("*.json*") if p.is_file() and not p.name.startswith(".")]
        if len(files) >= count:
            return files
        time.sleep(0.02)
    return []


def _wait_until_started(proc: subprocess.Popen[bytes], out: Path, timeout: float = 30.0) -> None:
    """The command creates its destination folder (preflight) before it reads any input."""
    deadline = time.monotonic() + timeout
    while not out.is_dir():
        assert proc.poll() is None, "the command exited early"
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.02)
    time.sleep(0.1)


def test_lone_ack_written_within_timeout_while_stdin_stays_open(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*COMMAND, "-t", "0.3", "-o", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdin is not None
        _wait_until_started(proc, out)  # so that the clock below measures the batcher, not the imports
        proc.stdin.write(LINES[0] + b"\n")
        proc.stdin.flush()
        written_at = time.monotonic()
        # -t 0.3: well within 5 s even on a loaded machine; without the timer it would wait for EOF.
        files = _wait_for_files(out, 1, timeout=5.0)
        elapsed = time.monotonic() - written_at
        assert files, "the lone ACK was not written within 5 s while stdin stayed open"
        assert proc.poll() is None  # still running: stdin is open
        assert elapsed < 5.0
        assert json.loads(decompress_with_tool(files[0])) == parsed(LINES[:1])
    finally:
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert stdout == b""
    assert len(batch_files(out)) == 1  # EOF found nothing more to write


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_flushes_and_exits_zero(signum: int, tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*COMMAND, "-n", "500", "-t", "60", "-o", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdin is not None
        _wait_until_started(proc, out)  # signal handlers are installed by then
        proc.stdin.write(b"\n".join(LINES[:1200]) + b"\n")
        proc.stdin.flush()
        _wait_for_files(out, 2, timeout=10.0)  # two full batches; the other 200 wait for the 60 s timer
        time.sleep(0.5)  # and let the last 200 be read
        proc.send_signal(signum)
        # Keep stdin open while it exits: the reader is then blocked reading an idle
        # pipe, which once made the interpreter abort at exit (status 134).
        proc.wait(timeout=30)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert stdout == b""
    assert b"Traceback" not in stderr
    assert stored_acks(out) == parsed(LINES[:1200])
    figures = summary_figures(stderr)
    assert figures["stored"] == figures["accepted"] == 1200


def test_default_destination_is_batches_in_cwd(tmp_path: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        COMMAND, input=b"\n".join(LINES[:3]), capture_output=True, env=env, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert stored_acks(tmp_path / "batches") == parsed(LINES[:3])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--level", "99"], "level"),
        (["-i", "/nonexistent/acks.jsonl"], "cannot read --input /nonexistent/acks.jsonl: No such file"),
        (["--rejects", "/nonexistent/r.jsonl"], "cannot write --rejects /nonexistent/r.jsonl: No such file"),
        (["--stats-json", "/nonexistent/s.json"], "cannot write --stats-json /nonexistent/s.json: /nonexistent is"),
    ],
)
def test_fatal_errors_are_one_line(args: list[str], needle: str, tmp_path: Path, env: dict[str, str]) -> None:
    result = run([*args, "-o", str(tmp_path / "out")], env, LINES[0])
    assert result.returncode not in (0, 1)
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("poh-batcher: error:")
    assert needle in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json*"))


def test_over_long_lines_rejected_and_reading_continues(tmp_path: Path, env: dict[str, str]) -> None:
    huge = b'{"id":"' + b"x" * 300_000 + b'","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}'
    lines = [LINES[0], huge, LINES[1], b"{bad", LINES[2], b"y" * 5000, LINES[3]]
    out, rejects = tmp_path / "out", tmp_path / "rejects"
    result = run(
        ["--max-line-bytes", "1000", "-o", str(out), "--rejects", str(rejects)], env, b"\n".join(lines) + b"\n"
    )
    assert result.returncode == 0, result.stderr
    reported = re.findall(rb"^line (\d+): ", result.stderr, re.M)
    assert reported == [b"2", b"4", b"6"]
    assert stored_acks(out) == parsed(LINES[:4])
    kept = rejects.read_bytes().split(b"\n")
    # An over-long line is cut at the limit, so memory stays bounded, whether it spanned reads or not.
    assert kept[0] == huge[:1000]
    assert kept[1:3] == [b"{bad", b"y" * 1000]
