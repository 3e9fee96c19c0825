"""Where ACKs come from: a pluggable stage in front of the batcher.

A source yields :class:`Chunk` objects: validated ACK lines plus what was
rejected, in input order. Adding a stream engine is a new module here that
yields chunks; nothing behind it changes.
"""

from __future__ import annotations

from .base import Chunk, Source
from .lines import LineSource

__all__ = ["Chunk", "LineSource", "Source"]
