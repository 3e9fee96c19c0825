"""The library: ``await batcher.enqueue(ack)`` per ACK, and the bulk ``enqueue_many``.

    python bench/bench_library.py [--quick]

ACK lines are read from the cached input file (reading is ~12M lines/s, so it
costs little) and enqueued into an ``AsyncBatcher`` that stores zstd batches
of 500 in fsync'd local files, exactly like the CLI. The clock stops when
``stop()`` returns, i.e. when every ACK is durably stored.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from _common import count_files, fresh_dir, input_file, rate
from poh_batcher import AsyncBatcher, LocalStorage

BATCH = 500


async def per_item(path: Path, out: Path) -> int:
    batcher = AsyncBatcher(BATCH, 1.5, LocalStorage(out))
    n = 0
    async with batcher:
        with path.open("rb") as f:
            for line in f:
                await batcher.enqueue(line[:-1])
                n += 1
    return n


async def bulk(path: Path, out: Path) -> int:
    batcher = AsyncBatcher(BATCH, 1.5, LocalStorage(out))
    n = 0
    async with batcher:
        with path.open("rb") as f:
            carry = b""
            while block := f.read(1 << 20):
                lines = (carry + block).split(b"\n")
                carry = lines.pop()
                await batcher.enqueue_many(lines)
                n += len(lines)
            if carry:
                await batcher.enqueue_many([carry])
                n += 1
    return n


def timed(
    name: str, body: Callable[[Path, Path], Coroutine[Any, Any, int]], path: Path, cli_rate: float | None = None
) -> float:
    out = fresh_dir(f"lib-{body.__name__}")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    n = asyncio.run(body(path, out))
    wall = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    files = count_files(out)
    shutil.rmtree(out, ignore_errors=True)
    if files != -(-n // BATCH):
        raise SystemExit(f"{name}: {files} files for {n} ACKs")
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    extra = f", {n / wall / cli_rate:.2f}x the CLI" if cli_rate else ""
    print(f"{name:44s} {wall:6.2f} s  {rate(n, wall):>6s} ACKs/s  (cpu {cpu:.2f} s{extra})")
    return n / wall


def run(quick: bool = False, cli_rate: float | None = None) -> dict[str, float]:
    path = input_file(200_000 if quick else 1_000_000)
    single = timed("library: await enqueue(line) per ACK", per_item, path)
    verdict = "target met" if single >= 300_000 else "BELOW TARGET"
    print(f"  per-ACK enqueue {rate(single, 1)} ACKs/s (target >= 300k): {verdict}")
    many = timed("library: await enqueue_many(1 MB of lines)", bulk, path, cli_rate)
    return {"per_item": single, "bulk": many}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200k ACKs")
    run(parser.parse_args().quick)
