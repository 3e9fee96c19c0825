"""Prometheus metrics of an archive run (``--metrics-port``).

Counters that the batcher already keeps (ACKs accepted, batches and bytes
written, upload attempts) are read from its live ``stats`` at scrape time, so
a scrape and the final summary can never disagree; what only the hooks see
(rejects by reason, retries by cause, store latency) is counted as it happens.
Everything lives in a private :class:`CollectorRegistry`: two runs in one
process, or a host application's own metrics, never mix.

Names follow the Prometheus conventions: ``poh_batcher_`` prefix, ``_total``
for counters, base units (bytes, seconds).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import ConfigurationError
from .observer import ArchiveObserver

if TYPE_CHECKING:
    from .batcher import AsyncBatcher, BatchReceipt
    from .sources.base import Chunk

PREFIX = "poh_batcher"
STORE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Reject reasons carry details (field names, byte counts); the label keeps only the kind.
_REASONS: tuple[tuple[str, str], ...] = (
    ("line is ", "too_long"),
    ("not valid UTF-8", "not_utf8"),
    ("JSON nested too deeply", "too_deep"),
    ("not valid JSON", "not_json"),
    ("not a JSON object", "not_object"),
    ("duplicate field", "duplicate_field"),
    ("missing field", "missing_field"),
    ("field 'timestamp' is not", "bad_timestamp"),
)
_FIELD_REASON = re.compile(r"field '[^']*' (must be a string|is empty)")
_SLUG = re.compile(r"[^a-z0-9]+")


def reason_label(reason: str) -> str:
    """The bounded ``reason`` label of a reject reason (``"missing field 'id'"`` → ``missing_field``)."""
    for prefix, label in _REASONS:
        if reason.startswith(prefix):
            return label
    match = _FIELD_REASON.match(reason)
    if match:
        return "not_string" if match.group(1).startswith("must") else "empty_field"
    # Extra checks (signature, age, duplicates): the words before any detail, as a slug.
    head = re.split(r"[:(\[{'\"0-9]", reason, maxsplit=1)[0]
    return _SLUG.sub("_", head.lower()).strip("_")[:40] or "other"


class Metrics(ArchiveObserver):
    """The metrics of one run, as an observer of it; serve them with :meth:`serve`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._batcher: AsyncBatcher | None = None
        self._received = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.rejected = Counter(
            f"{PREFIX}_acks_rejected", "Input lines rejected as invalid, by reason", ["reason"], registry=self.registry
        )
        self.retries = Counter(
            f"{PREFIX}_upload_retries",
            "Failed store attempts that were retried, by cause",
            ["cause"],
            registry=self.registry,
        )
        self.store_duration = Histogram(
            f"{PREFIX}_batch_store_duration_seconds",
            "Time from a packed batch to its durable store, retries included",
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.spool_bytes = Gauge(f"{PREFIX}_spool_bytes", "Bytes held by the write-ahead spool", registry=self.registry)
        self.registry.register(_LiveCollector(self))

    # -- observer hooks --------------------------------------------------------

    def on_start(self, batcher: AsyncBatcher, summary: object) -> None:
        self._batcher = batcher

    def on_chunk(self, chunk: Chunk) -> None:
        self._received += len(chunk.acks) + len(chunk.rejects)
        for reject in chunk.rejects:
            self.rejected.labels(reason=reason_label(reject.reason)).inc()

    def on_delivered(self, receipt: BatchReceipt) -> None:
        self.store_duration.observe(receipt.store_seconds)

    def on_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        self.retries.labels(cause=type(exc).__name__).inc()

    def on_spool(self, spool_bytes: int) -> None:
        self.set_spool_bytes(spool_bytes)

    def set_spool_bytes(self, spool_bytes: int) -> None:
        """Report the spool's size (the spool calls this, directly or through ``on_spool``)."""
        self.spool_bytes.set(spool_bytes)

    # -- serving ---------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1") -> tuple[str, int]:
        """Serve ``/metrics`` over HTTP from a daemon thread; returns the bound address and port."""
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}; choose another --metrics-port"
            ) from None
        host, bound = self._server.server_address[:2]
        return str(host), int(bound)

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def scrape(self) -> bytes:
        """The text exposition format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Reads the batcher's running totals at scrape time (plain int reads: safe from the server thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        batcher = self._metrics._batcher
        stats = batcher.stats if batcher is not None else None

        def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)

        yield counter("acks_received", "Non-blank input lines read (accepted + rejected)", self._metrics._received)
        yield counter("acks_accepted", "Valid ACKs accepted into a batch", stats.acks_enqueued if stats else 0)
        yield counter("acks_stored", "ACKs durably stored", stats.acks_delivered if stats else 0)
        yield counter("acks_failed", "ACKs whose batch could not be stored", stats.acks_failed if stats else 0)
        yield counter("batches_written", "Batches durably stored", stats.batches_delivered if stats else 0)
        yield counter("batches_failed", "Batches that could not be stored", stats.batches_failed if stats else 0)
        yield counter("bytes_in", "Uncompressed bytes of the stored batches", stats.raw_bytes if stats else 0)
        yield counter("bytes_written", "Compressed bytes stored", stats.stored_bytes if stats else 0)
        yield counter(
            "upload_attempts", "Store attempts, first tries and retries", stats.upload_attempts if stats else 0
        )
        yield gauge("batches_in_flight", "Batches sealed and not yet stored", stats.batches_in_flight if stats else 0)
        yield gauge(
            "oldest_pending_ack_age_seconds",
            "Age of the oldest accepted ACK not yet stored (data freshness); 0 when none is pending",
            batcher.oldest_pending_age() if batcher is not None else 0.0,
        )
