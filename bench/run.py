"""Every benchmark of issue 6 in one run: ``python bench/run.py [--quick]``.

1. yardstick ``zstd -3 -T2`` and ``zstd -3``, the floor (``floor.py``: compression
   and durable files only), and the CLI end to end (stdin → validated → zstd-3 /
   gzip / none files, fsync'd, batch 500), interleaved;
2. the library: per-ACK ``await enqueue`` and bulk ``enqueue_many``;
3. peak RSS of the CLI for 1M and 10M ACKs;
4. latency from enqueue to durable delivery at 1,000 ACKs/s, ``-t 0.5``.

The input is generated once by ``../shared/gen_acks.py`` into ``bench/.cache``.
``--quick`` uses 200k ACKs (2M for the memory run) and one repetition.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cli
import bench_latency
import bench_library
from _common import input_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs, one repetition")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of the CLI/yardstick runs (default 3)")
    args = parser.parse_args()
    started = time.perf_counter()
    input_file(200_000 if args.quick else 1_000_000)
    load = os.getloadavg()
    print(
        f"poh-batcher benchmarks, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC"
        f"{' (quick)' if args.quick else ''}"
    )
    print(
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print("\n## CLI end to end vs the yardstick")
    cli = bench_cli.run(args.quick, args.reps)
    zstd = cli["zstd"]
    assert isinstance(zstd, dict)
    cli_rate = float(cli["acks"]) / zstd["wall"]  # type: ignore[arg-type]
    print("\n## Library")
    bench_library.run(args.quick, cli_rate)
    print("\n## Memory")
    bench_cli.memory(args.quick)
    print("\n## Latency")
    bench_latency.run(args.quick)
    load = os.getloadavg()
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


if __name__ == "__main__":
    main()
