"""Prometheus metrics: names, labels, and a real endpoint scraped during a run."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from faultkit import FlakyStorage
from poh_batcher.metrics import Metrics, reason_label
from poh_batcher.parsing import LineValidator
from poh_batcher.pipeline import ArchiveSettings, run_archive
from poh_batcher.retry import RetryPolicy
from poh_batcher.sources.lines import LineSource
from poh_batcher.storage import LocalStorage

ACK = '{"id":"a%d","timestamp":"2024-05-01T12:00:00Z","signature":"sig","pubkey":"key"}'


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in found.items() if n == name)


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("missing field 'id'", "missing_field"),
        ("field 'pubkey' must be a string, got number", "not_string"),
        ("field 'id' is empty", "empty_field"),
        ("not valid JSON: JSON is malformed: invalid character (byte 0)", "not_json"),
        ("not valid UTF-8 (byte 0xff at offset 3)", "not_utf8"),
        ("line is 2000000 bytes, over the limit of 1048576 (--max-line-bytes)", "too_long"),
        ("field 'timestamp' is not an RFC 3339 time with 'Z' or an offset: 'x'", "bad_timestamp"),
        ("duplicate field 'id'", "duplicate_field"),
        ("not a JSON object (got array)", "not_object"),
        ("bad signature: does not verify for pubkey 'abc'", "bad_signature"),
        ("older than 3600 s", "older_than"),
        ("", "other"),
    ],
)
def test_reject_reasons_become_bounded_labels(reason: str, label: str) -> None:
    assert reason_label(reason) == label


async def test_counters_match_the_summary_with_retries(tmp_path: Path) -> None:
    lines = [ACK % i for i in range(250)] + ["nope", '{"id":"x"}', '{"id":"y"}', ""]
    stream = io.BytesIO("\n".join(lines).encode() + b"\n")
    metrics = Metrics()
    settings = ArchiveSettings(batch_size=100, retry=RetryPolicy(attempts=5, initial_delay=0.0, max_delay=0.0))
    summary = await run_archive(
        settings,
        LineSource(stream, LineValidator()),
        FlakyStorage(LocalStorage(tmp_path), failures=2),
        report_rejects=_ignore,
        stop=asyncio.Event(),
        observers=[metrics],
    )
    found = samples(metrics.scrape().decode())
    assert summary.acks_stored == 250
    assert summary.retries == 2
    assert value(found, "poh_batcher_acks_received_total") == 253
    assert value(found, "poh_batcher_acks_accepted_total") == summary.acks_accepted == 250
    assert value(found, "poh_batcher_acks_rejected_total", reason="missing_field") == 2
    assert value(found, "poh_batcher_acks_rejected_total", reason="not_json") == 1
    assert value(found, "poh_batcher_batches_written_total") == summary.batches == 3
    assert value(found, "poh_batcher_bytes_in_total") == summary.bytes_in
    assert value(found, "poh_batcher_bytes_written_total") == summary.bytes_out
    assert value(found, "poh_batcher_upload_retries_total", cause="StorageError") == 2
    assert value(found, "poh_batcher_upload_attempts_total") == summary.batches + summary.retries
    assert value(found, "poh_batcher_batch_store_duration_seconds_count") == 3
    assert value(found, "poh_batcher_batches_in_flight") == 0
    assert value(found, "poh_batcher_oldest_pending_ack_age_seconds") == 0
    metrics.set_spool_bytes(1234)
    assert value(samples(metrics.scrape().decode()), "poh_batcher_spool_bytes") == 1234


async def _ignore(rejects: object) -> None:
    return None


def test_registry_is_private() -> None:
    from prometheus_client import REGISTRY

    Metrics()
    Metrics()  # a second one in the same process does not clash
    assert REGISTRY.get_sample_value("poh_batcher_acks_received_total") is None


# -- a real endpoint, scraped while the command runs ---------------------------


class _Run:
    """The command in a subprocess, fed through a pipe; stderr collected by a thread."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        self.stats = tmp_path / "stats.json"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "poh_batcher.cli",
                "-o",
                str(tmp_path / "out"),
                "--metrics-port",
                "0",
                "--log-level",
                "info",
                "--log-format",
                "json",
                "--stats-json",
                str(self.stats),
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
        )
        self.records: list[dict[str, Any]] = []
        self.port: int | None = None
        self._found_port = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self._found_port.wait(30), f"no metrics port logged: {self.records}"

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            record = json.loads(line)
            self.records.append(record)
            if "metrics_port" in record:
                self.port = record["metrics_port"]
                self._found_port.set()

    def send(self, lines: list[str]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("".join(line + "\n" for line in lines).encode())
        self.process.stdin.flush()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            return samples(response.read().decode())

    def scrape_until(self, name: str, expected: float, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = self.scrape()
            if value(found, name) == expected or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def finish(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(60) == 0, self.records
        self._reader.join(10)
        assert self.process.stdout is not None
        assert self.process.stdout.read() == b""
        return dict(json.loads(self.stats.read_text()))


def test_endpoint_scraped_during_a_run_matches_the_summary(tmp_path: Path) -> None:
    run = _Run(tmp_path, "-n", "100", "-t", "1.5")
    try:
        # A part batch waits for its timeout: its ACKs are pending, and age.
        run.send([ACK % i for i in range(40)])
        assert value(run.scrape_until("poh_batcher_acks_accepted_total", 40), "poh_batcher_acks_accepted_total") == 40
        time.sleep(0.3)
        early = run.scrape()
        assert value(early, "poh_batcher_batches_written_total") == 0
        assert value(early, "poh_batcher_oldest_pending_ack_age_seconds") > 0.1
        # Then full batches and some bad lines.
        run.send([ACK % i for i in range(40, 1040)] + ["not json", '{"id":"x"}', "", "[1]"])
        found = run.scrape_until("poh_batcher_acks_stored_total", 1040)
        assert value(found, "poh_batcher_oldest_pending_ack_age_seconds") == 0
        assert value(found, "poh_batcher_batches_in_flight") == 0
        summary = run.finish()
    finally:
        if run.process.poll() is None:
            run.process.kill()
    assert summary["acks_stored"] == 1040
    assert value(found, "poh_batcher_acks_received_total") == summary["acks_accepted"] + summary["lines_rejected"]
    assert value(found, "poh_batcher_acks_accepted_total") == summary["acks_accepted"]
    assert value(found, "poh_batcher_acks_stored_total") == summary["acks_stored"]
    assert total(found, "poh_batcher_acks_rejected_total") == summary["lines_rejected"] == 3
    assert value(found, "poh_batcher_acks_rejected_total", reason="not_object") == 1
    assert value(found, "poh_batcher_batches_written_total") == summary["batches"]
    assert value(found, "poh_batcher_bytes_in_total") == summary["bytes_in"]
    assert value(found, "poh_batcher_bytes_written_total") == summary["bytes_out"]
    assert value(found, "poh_batcher_upload_attempts_total") == summary["batches"] + summary["retries"]
    assert total(found, "poh_batcher_upload_retries_total") == summary["retries"]
    assert value(found, "poh_batcher_batch_store_duration_seconds_count") == summary["batches"]
    assert value(found, "poh_batcher_batch_store_duration_seconds_sum") > 0


def test_a_taken_port_is_a_usage_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "poh_batcher.cli", "-o", str(tmp_path / "out"), "--metrics-port", str(port)],
            input=b"",
            capture_output=True,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr.decode()
