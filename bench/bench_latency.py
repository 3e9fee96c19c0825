"""Latency from enqueue to durable delivery at a steady 1,000 ACKs/s with a 0.5 s batch timeout.

    python bench/bench_latency.py [--quick] [--rate 1000] [--seconds 10]

Each ACK is enqueued at its scheduled time (i / rate) and stamped; its
delivery future's done-callback stamps the time the batch holding it was
fsync'd, linked into place and its folder fsync'd. With 500 ACKs a batch and
1,000 ACKs/s, batches are flushed by the timeout, so the first ACK of each
batch waits about 0.5 s plus the write.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import time
from pathlib import Path

from _common import fresh_dir, input_file
from poh_batcher import AsyncBatcher, LocalStorage

BATCH = 500
TIMEOUT = 0.5


async def measure(path: Path, out: Path, ack_rate: float, seconds: float) -> list[float]:
    total = int(ack_rate * seconds)
    with path.open("rb") as f:
        lines = [line[:-1] for _, line in zip(range(total), f, strict=False)]
    latencies: list[float] = []
    batcher = AsyncBatcher(BATCH, TIMEOUT, LocalStorage(out))
    async with batcher:
        start = time.perf_counter()
        for i, line in enumerate(lines):
            due = start + i / ack_rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            enqueued = time.perf_counter()
            future = await batcher.enqueue(line)
            future.add_done_callback(lambda _f, t=enqueued: latencies.append(time.perf_counter() - t))
    return latencies


def run(quick: bool = False, ack_rate: float = 1000.0, seconds: float | None = None) -> dict[str, float]:
    seconds = seconds or (4.0 if quick else 10.0)
    out = fresh_dir("latency")
    latencies = asyncio.run(measure(input_file(200_000), out, ack_rate, seconds))
    shutil.rmtree(out, ignore_errors=True)
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    p50, p99, worst = q[49], q[98], max(latencies)
    verdict = "target met" if p99 < 0.6 else "ABOVE TARGET"
    print(
        f"latency enqueue -> durable at {ack_rate:,.0f} ACKs/s, -t {TIMEOUT}, batch {BATCH}, {len(latencies):,} ACKs: "
        f"p50 {p50:.3f} s, p99 {p99:.3f} s, max {worst:.3f} s (target p99 < 0.6 s): {verdict}"
    )
    return {"p50": p50, "p99": p99, "max": worst}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 s instead of 10 s")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    run(args.quick, args.rate, args.seconds)
