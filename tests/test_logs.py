"""Logging: text and JSON lines on stderr, never a secret."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from poh_batcher.logs import LOGGER, redact, setup_logging

ACK = '{"id":"a%d","timestamp":"2024-05-01T12:00:00Z","signature":"sig","pubkey":"key"}'
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture
def restore_logger() -> Iterator[None]:
    logger = logging.getLogger(LOGGER)
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.mark.parametrize(
    "text",
    [
        f"s3://{KEY_ID}:{SECRET}@bucket/prefix",
        f"http://user:{SECRET}@127.0.0.1:9000/bucket",
        f"https://b.s3.amazonaws.com/k?X-Amz-Credential={KEY_ID}%2F20240501&X-Amz-Signature=abcdef0123&x=1",
        f"aws_secret_access_key = {SECRET}",
        f'{{"SecretAccessKey": "{SECRET}"}}',
        f"AWS_SESSION_TOKEN={SECRET}",
        f"Authorization: AWS4-HMAC-SHA256 Credential={KEY_ID}/x, Signature=deadbeef",
    ],
)
def test_redact_removes_credentials(text: str) -> None:
    clean = redact(text)
    assert SECRET not in clean
    assert KEY_ID not in clean
    assert "abcdef0123" not in clean
    assert "deadbeef" not in clean
    assert "***" in clean


def test_redact_keeps_ordinary_text() -> None:
    text = (
        "stored batch 3: 500 ACKs, key 20240501/12/ack_batch_000004.json.zst, "
        "url file:///var/lib/poh/acks, signature 5VERv8NMvzbJMEkV8xnrLkEaWRtSz9CosKDYjCJjBRnb"
    )
    assert redact(text) == text


def test_log_records_are_redacted_tracebacks_included(restore_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("debug", "text")
    log = logging.getLogger("poh_batcher.storage")  # a child logger: the handler's filter still applies
    try:
        raise RuntimeError(f"cannot reach s3://{KEY_ID}:{SECRET}@bucket")
    except RuntimeError:
        log.exception("upload to %s failed", f"http://u:{SECRET}@host/b")
    err = capsys.readouterr().err
    assert "poh-batcher: error: upload to http://u:***@host/b failed" in err
    assert "Traceback" in err
    assert SECRET not in err
    assert KEY_ID not in err


def test_levels_and_quiet(restore_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("warning", "text")
    log = logging.getLogger(LOGGER)
    log.info("hidden")
    log.warning("shown")
    setup_logging("debug", "text", quiet=True)  # --quiet keeps errors only
    log.warning("hidden too")
    log.error("an error")
    assert capsys.readouterr().err == "poh-batcher: warning: shown\npoh-batcher: error: an error\n"


def test_json_records_carry_extras(restore_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json")
    logging.getLogger(LOGGER).info("hello %s", "there", extra={"batch": 3, "url": f"s3://a:{SECRET}@b/c"})
    record = json.loads(capsys.readouterr().err)
    assert record["message"] == "hello there"
    assert record["level"] == "info"
    assert record["logger"] == LOGGER
    assert record["batch"] == 3
    assert record["url"] == "s3://a:***@b/c"
    assert record["ts"].endswith("Z")


def test_command_json_logs_are_valid_json_lines(tmp_path: Path) -> None:
    """Every stderr line of a real run with --log-format json is one JSON object."""
    lines = [ACK % i for i in range(30)]
    lines[4] = "not json"
    lines[9] = '{"id":"x"}'
    lines[12] = ""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "poh_batcher.cli",
            "-n",
            "10",
            "-o",
            str(tmp_path / "out"),
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
        input="\n".join(lines).encode() + b"\n",
        capture_output=True,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""
    records = [json.loads(line) for line in result.stderr.decode().splitlines()]
    assert all(isinstance(r, dict) and {"ts", "level", "logger", "message"} <= r.keys() for r in records)
    rejects = [r for r in records if r["logger"] == "poh_batcher.rejects"]
    assert [(r["line"], r["level"]) for r in rejects] == [(5, "warning"), (10, "warning")]
    assert rejects[1]["reason"] == "missing field 'timestamp'"
    stored = [r for r in records if r["message"].startswith("stored batch")]
    assert sum(r["acks"] for r in stored) == 27
    summary = records[-1]
    assert summary["message"] == "summary"
    assert summary["summary"]["acks_stored"] == 27
    assert summary["summary"]["lines_rejected"] == 2
    assert summary["summary"]["blank_lines"] == 1


def test_command_fatal_error_is_one_line_without_secrets(tmp_path: Path) -> None:
    bad = tmp_path / "file"
    bad.write_text("a file, not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "poh_batcher.cli", "-o", f"{bad}/sub", "--log-format", "json"],
        input=(ACK % 1 + "\n").encode(),
        capture_output=True,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    records = [json.loads(line) for line in result.stderr.decode().splitlines()]
    assert records[-1]["level"] == "error"
