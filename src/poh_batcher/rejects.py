"""The rejects file: invalid input kept verbatim, and why, line for line.

``FILE`` receives each rejected line exactly as it came (so it can be fixed and
fed back), and ``FILE.reasons`` the matching ``line N: reason``, one per line in
the same order, so that a reader can pair them by position.
"""

from __future__ import annotations

from types import TracebackType

from .parsing import Reject

REASONS_SUFFIX = ".reasons"


class RejectsFile:
    """Appends rejected lines to ``path`` and their reasons to ``path + ".reasons"``."""

    def __init__(self, path: str) -> None:
        self._raw = open(path, "ab")  # noqa: SIM115 - closed by close() / the context manager
        try:
            self._reasons = open(path + REASONS_SUFFIX, "a", encoding="utf-8")  # noqa: SIM115
        except OSError:
            self._raw.close()
            raise

    def write(self, rejects: list[Reject]) -> None:
        """Append ``rejects`` to both files and flush them (blocking: call off the event loop)."""
        self._raw.write(b"".join(reject.raw + b"\n" for reject in rejects))
        self._reasons.write("".join(f"line {reject.line}: {reject.reason}\n" for reject in rejects))
        self._raw.flush()
        self._reasons.flush()

    def close(self) -> None:
        self._raw.close()
        self._reasons.close()

    def __enter__(self) -> RejectsFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
