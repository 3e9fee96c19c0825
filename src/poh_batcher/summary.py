"""The figures of a run, reported on stderr at the end (and as JSON on request)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class Summary:
    """Counts of one archive run. ``lines_read == acks_accepted + lines_rejected + blank_lines``."""

    lines_read: int = 0
    acks_accepted: int = 0
    lines_rejected: int = 0
    duplicates_dropped: int = 0
    """Of ``lines_rejected``, the ACKs dropped by ``--dedupe`` (reason ``duplicate id …``)."""
    blank_lines: int = 0
    acks_journaled: int = 0
    acks_recovered: int = 0
    batches_recovered: int = 0
    acks_stored: int = 0
    acks_not_stored: int = 0
    batches: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    retries: int = 0
    elapsed_seconds: float = 0.0
    stopped_by: str = "end of input"
    failure: str | None = None
    spool_dir: str | None = None

    @property
    def ratio(self) -> float:
        """Uncompressed over stored bytes (higher is better)."""
        return self.bytes_in / self.bytes_out if self.bytes_out else 0.0

    @property
    def rate(self) -> float:
        """ACKs stored per second of the run."""
        return self.acks_stored / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """All figures, derived ones included (for ``--stats-json``)."""
        figures = asdict(self)
        figures.update(ratio=round(self.ratio, 3), acks_per_second=round(self.rate, 1))
        return figures

    def render(self) -> str:
        """Human-readable lines for stderr."""
        return (
            f"poh-batcher: {self.stopped_by}: {self.lines_read:,} lines read, "
            f"{self.acks_accepted:,} ACKs accepted, {self.lines_rejected:,} rejected"
            + (f" ({self.duplicates_dropped:,} duplicates dropped by --dedupe)" if self.duplicates_dropped else "")
            + f", {self.blank_lines:,} blank\n"
            f"poh-batcher: {self.acks_stored:,} ACKs stored in {self.batches:,} batches"
            + (f" ({self.acks_recovered:,} recovered from the spool)" if self.acks_recovered else "")
            + (f", {self.acks_not_stored:,} NOT stored" if self.acks_not_stored else "")
            + f"; {_size(self.bytes_in)} in, {_size(self.bytes_out)} out (ratio {self.ratio:.2f}); "
            f"{self.retries} retries; {self.elapsed_seconds:.2f} s, {self.rate:,.0f} ACKs/s"
            + (f"\npoh-batcher: error: {self.failure}" if self.failure else "")
            + (
                f"\npoh-batcher: {self.acks_not_stored:,} ACKs are kept in the spool {self.spool_dir}; "
                "the next run with the same destination delivers them"
                if self.acks_not_stored and self.spool_dir
                else ""
            )
        )


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
