"""The floor: the least work any archiver with the CLI's durability must do, and nothing else.

    python bench/floor.py OUT_DIR [--batch 500] [--codec zstd]

Reads JSON lines from stdin, joins every BATCH lines into a ``[...]`` array,
compresses it (level 3, 2 threads) and writes it with the product's own
``create_durably`` (temporary file, fsync, link, folder fsync; 2 other
threads) as OUT_DIR/ack_batch_NNNNNN.json.zst (.gz for gzip). There is no
validation, no ordering of acknowledgements, no spool and no bookkeeping: its
wall time is the lower bound for this machine, and what the CLI takes above it
is the price of those.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from poh_batcher.compression import CODECS, EXTENSIONS, compress, resolve_codec
from poh_batcher.storage.durable import create_durably

BLOCK = 1 << 20
IN_FLIGHT = 16  # batches compressed or written at once; the oldest is waited for beyond this


def batches(fd: int, size: int) -> Iterator[list[bytes]]:
    """The lines read from ``fd``, ``size`` at a time (the last batch may be shorter)."""
    lines: list[bytes] = []
    partial = b""
    while block := os.read(fd, BLOCK):
        lines += (partial + block).split(b"\n")
        partial = lines.pop()
        while len(lines) >= size:
            yield lines[:size]
            del lines[:size]
    if partial:
        lines.append(partial)
    if lines:
        yield lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--codec", choices=CODECS, default="zstd")
    args = parser.parse_args()
    codec = resolve_codec(args.codec)
    args.out.mkdir(parents=True, exist_ok=True)
    pending: deque[Future[Future[None]]] = deque()
    with ThreadPoolExecutor(2) as writers, ThreadPoolExecutor(2) as compressors:

        def store(path: Path, data: bytes) -> Future[None]:
            """Compress (on a compressor thread) and hand the frame to a writer thread."""
            return writers.submit(create_durably, path, compress(data, level=3, codec=codec)[1], 0o644)

        for i, lines in enumerate(batches(sys.stdin.fileno(), args.batch)):
            path = args.out / f"ack_batch_{i:06d}.json{EXTENSIONS[codec]}"
            pending.append(compressors.submit(store, path, b"[" + b",".join(lines) + b"]"))
            if len(pending) > IN_FLIGHT:
                pending.popleft().result().result()
        for written in pending:
            written.result().result()


if __name__ == "__main__":
    main()
