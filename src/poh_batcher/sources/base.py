"""The source interface."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..parsing import Reject


@dataclass(slots=True)
class Chunk:
    """Consecutive input, validated.

    ``lines`` counts every input line in the chunk (valid, rejected and blank),
    so that ``lines == len(acks) + len(rejects) + blank``. ``end_offset`` is the
    input byte offset just past the chunk's last line, for resumable inputs.
    ``on_stored`` is called once every ACK of the chunk is durably stored
    (a stream engine acknowledges its messages there). ``joined``, when a
    source has it at no cost, is ``acks`` joined by newlines (bytes or a view of
    the input): the spool journals it without joining the lines again.
    """

    acks: list[bytes]
    rejects: list[Reject] = field(default_factory=list)
    blank: int = 0
    lines: int = 0
    end_offset: int | None = None
    on_stored: Callable[[], None] | None = None
    joined: bytes | memoryview | None = None


class Source(Protocol):
    """Produces chunks until its input ends or it is closed."""

    def chunks(self) -> AsyncIterator[Chunk]:
        """Yield chunks in input order."""

    def close(self) -> None:
        """Stop producing; pending reads are abandoned."""
