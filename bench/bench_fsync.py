"""What durable files cost on this disk, without the rest of the pipeline.

    python bench/bench_fsync.py [--files N] [--size BYTES]

Writes N files of SIZE bytes (a zstd batch of 500 ACKs is about 62 KB) with
the same ``create_durably`` the local storage uses (temporary file, fsync,
link, folder fsync), from 1, 2 and 8 threads (8 is the default
``--max-in-flight``), and prints the wall time and the process's CPU time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from _common import fresh_dir
from poh_batcher.storage.durable import create_durably


def run(files: int, size: int, threads: int) -> None:
    folder = fresh_dir(f"fsync-{threads}")
    data = os.urandom(size)
    before = os.times()
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: create_durably(folder / f"f{i:06d}", data, 0o644), range(files)))
    wall = time.perf_counter() - started
    after = os.times()
    user, system = after.user - before.user, after.system - before.system
    print(
        f"{files:,} fsync'd files of {size:,} B, {threads} thread(s): "
        f"{wall:.2f} s wall, user {user:.2f} s, sys {system:.2f} s"
    )
    shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=62_000)
    args = parser.parse_args()
    for threads in (1, 2, 8):
        run(args.files, args.size, threads)


if __name__ == "__main__":
    main()
