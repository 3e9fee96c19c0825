"""CLI end to end (stdin → validated → compressed, fsync'd files) against the ``zstd`` yardstick.

The CLI runs with its defaults (write-ahead spool on, in a folder under bench/.cache),
plus zstd with ``--no-spool``. The floor row (bench/floor.py) does only the
compression and the fsync'd files, with no validation, ordering or bookkeeping:
it is what this machine allows any implementation with the same durability.

    python bench/bench_cli.py [--quick] [--reps N] [--out-root DIR]

``--out-root /dev/shm/pb`` writes to tmpfs, where an fsync costs nothing: the
difference to a disk run is what the disk costs, and what remains between
the floor and the CLI is the CPU the CLI spends on top (the reader thread's
read + split and its validation are timed in process and printed last).

Every repetition runs the yardstick, the floor and the command one after the
other, so all see the same machine; the best of the repetitions of each is reported
(the machine is shared, and the best run is the least disturbed one).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import _common
from _common import BENCH, ChildRun, count_files, count_lines, fresh_dir, input_file, mb, rate, run_child
from poh_batcher.parsing import LineValidator

BATCH = 500
CODECS = ("zstd", "gzip", "none")
# (label, codec, extra options): the default CLI journals every ACK in its write-ahead spool first
VARIANTS = (
    ("zstd", "zstd", ()),
    ("zstd --no-spool", "zstd", ("--no-spool",)),
    ("gzip", "gzip", ()),
    ("none", "none", ()),
)
_KEEP: list[Path] = []  # outputs are deleted at the end: deleting thousands of files slows the next run
_STORED = re.compile(r"([\d,]+) ACKs stored in ([\d,]+) batches")


@dataclass
class Best:
    runs: list[ChildRun]

    @property
    def best(self) -> ChildRun:
        return min(self.runs, key=lambda r: r.wall)

    def walls(self) -> str:
        return " ".join(f"{r.wall:.2f}" for r in self.runs)


def yardstick(path: Path, threads: int) -> ChildRun:
    argv = ["zstd", "-3", "-q", "-c", *(["-T2"] if threads == 2 else [])]
    run = run_child(argv, stdin_path=path)
    if run.returncode != 0:
        raise SystemExit(f"zstd failed: {run.stderr}")
    return run


def floor(path: Path, acks: int) -> ChildRun:
    out = fresh_dir(f"floor-{len(_KEEP)}")
    run = run_child([sys.executable, str(BENCH / "floor.py"), str(out)], stdin_path=path)
    _KEEP.append(out)
    _check_stored("floor run", run, out, acks)
    return run


def cli_argv(out: Path, codec: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "poh_batcher.cli", "-n", str(BATCH), "--compression", codec, "-o", str(out), *extra]


def cli(path: Path, codec: str, acks: int, repeat: int = 1, extra: tuple[str, ...] = ()) -> ChildRun:
    out = fresh_dir(f"cli-{codec}-{len(_KEEP)}")
    spool = out.with_name(out.name + ".spool")
    shutil.rmtree(spool, ignore_errors=True)
    run = run_child(cli_argv(out, codec, "--spool-dir", str(spool), *extra), stdin_path=path, stdin_repeat=repeat)
    match = _STORED.search(run.stderr)
    _KEEP.extend((out, spool))
    _check_stored(f"CLI run ({codec})", run, out, acks, int(match.group(1).replace(",", "")) if match else -1)
    return run


def _check_stored(label: str, run: ChildRun, out: Path, acks: int, stored: int | None = None) -> None:
    """Stop the benchmark unless the run exited 0 with one file per batch (and, if it says, every ACK stored)."""
    files = count_files(out)
    expected_files = -(-acks // BATCH)
    if run.returncode != 0 or files != expected_files or stored not in (None, acks):
        said = "" if stored is None else f"{stored} stored of {acks}, "
        raise SystemExit(
            f"{label} did not store every ACK: exit {run.returncode}, {said}{files} files "
            f"(expected {expected_files})\n{run.stderr}"
        )


def cleanup() -> None:
    for path in _KEEP:
        shutil.rmtree(path, ignore_errors=True)
    _KEEP.clear()


def run(quick: bool = False, reps: int | None = None, codecs: tuple[str, ...] = CODECS) -> dict[str, object]:
    lines = 200_000 if quick else 1_000_000
    reps = reps or (1 if quick else 3)
    path = input_file(lines)
    acks = count_lines(path)
    size = path.stat().st_size
    y2, y1, fl = Best([]), Best([]), Best([])
    variants = [v for v in VARIANTS if v[1] in codecs]
    runs = {label: Best([]) for label, _, _ in variants}
    for _ in range(reps):
        y2.runs.append(yardstick(path, 2))
        y1.runs.append(yardstick(path, 1))
        fl.runs.append(floor(path, acks))
        for label, codec, extra in variants:
            runs[label].runs.append(cli(path, codec, acks, extra=extra))
    cleanup()
    yard = y2.best.wall
    print(
        f"input: {path.name}, {acks:,} ACKs, {mb(size):.1f} MB ({size / acks:.1f} B/ACK); batch {BATCH}; "
        f"best of {reps} (all walls in brackets)"
    )
    print(f"{'':30s} {'wall s':>7s} {'ACKs/s':>8s} {'MB/s':>7s} {'x yard':>7s} {'RSS MB':>7s} {'cpu s':>6s}")
    for name, best in (("yardstick zstd -3 -T2", y2), ("yardstick zstd -3", y1), ("floor: zstd + durable files", fl)):
        r = best.best
        print(
            f"{name:30s} {r.wall:7.2f} {rate(acks, r.wall):>8s} {mb(size) / r.wall:7.0f} {yard / r.wall:7.2f} "
            f"{r.max_rss_kb / 1024:7.1f} {r.user + r.sys:6.2f}   [{best.walls()}]"
        )
    results: dict[str, object] = {
        "yardstick_T2": yard,
        "yardstick_T1": y1.best.wall,
        "floor": fl.best.wall,
        "acks": acks,
    }
    for label, _, _ in variants:
        r = runs[label].best
        name = f"CLI {label}"
        print(
            f"{name:30s} {r.wall:7.2f} {rate(acks, r.wall):>8s} {mb(size) / r.wall:7.0f} {yard / r.wall:7.2f} "
            f"{r.max_rss_kb / 1024:7.1f} {r.user + r.sys:6.2f}   [{runs[label].walls()}]"
            f"  (user {r.user:.2f} sys {r.sys:.2f})"
        )
        results[label] = {"wall": r.wall, "ratio": yard / r.wall, "rss_mb": r.max_rss_kb / 1024}
    for label in ("zstd", "zstd --no-spool"):
        if label in runs:
            ratio = yard / runs[label].best.wall
            verdict = "moonshot met" if ratio >= 0.6 else "target met" if ratio >= 0.5 else "BELOW TARGET"
            print(f"CLI {label} / yardstick zstd -3 -T2 = {ratio:.2f} (target >= 0.5, moonshot 0.6): {verdict}")
    floor_line = f"floor (compression + fsync'd files, no validation) / yardstick = {yard / fl.best.wall:.2f}"
    if "zstd --no-spool" in runs:
        floor_line += f"; CLI zstd --no-spool / floor = {fl.best.wall / runs['zstd --no-spool'].best.wall:.2f}"
    print(floor_line)
    split, validated = reader_seconds(path)
    print(
        f"CLI reader thread alone, in process, one thread: read + split into lines {split:.2f} CPU s, "
        f"+ validation {validated - split:.2f} CPU s"
    )
    return results


def reader_seconds(path: Path) -> tuple[float, float]:
    """CPU seconds (best of 3) to read and split ``path`` as the CLI's reader does, and to also validate it.

    The reader holds Python's global lock for all of it, so it bounds how fast
    one process can go, whatever the other threads do.
    """
    validator = LineValidator()
    best = {False: float("inf"), True: float("inf")}
    for _ in range(3):
        for validate in best:
            started = time.process_time()
            with path.open("rb") as f:
                carry = b""
                while block := f.read(1 << 20):
                    data = carry + block
                    lines = data.split(b"\n")
                    carry = lines.pop()
                    if validate:
                        validator.validate_block(lines, source=data)
            best[validate] = min(best[validate], time.process_time() - started)
    return best[False], best[True]


def memory(quick: bool = False) -> dict[str, float]:
    """Peak RSS of the CLI for 1M and 10M ACKs (10M streamed as ten copies of the 1M file)."""
    lines = 200_000 if quick else 1_000_000
    path = input_file(lines)
    acks = count_lines(path)
    rss: dict[str, float] = {}
    for repeat in (1, 10):
        r = cli(path, "zstd", acks * repeat, repeat=repeat)
        cleanup()
        label = f"{acks * repeat / 1e6:g}M"
        rss[label] = r.max_rss_kb / 1024
        print(
            f"peak RSS, CLI zstd, {label} ACKs: {rss[label]:6.1f} MB  ({r.wall:.1f} s, {rate(acks * repeat, r.wall)} "
            f"ACKs/s)"
        )
    small, large = rss.values()
    verdict = "flat, under 150 MB" if large < 150 and large < small * 1.2 + 5 else "NOT FLAT or over 150 MB"
    print(f"peak RSS growth {small:.1f} -> {large:.1f} MB for 10x the input: {verdict}")
    return rss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200k ACKs, one repetition")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--codec", action="append", choices=CODECS, help="only these codecs (repeatable)")
    parser.add_argument("--memory", action="store_true", help="also the 1M vs 10M peak RSS runs")
    parser.add_argument("--out-root", type=Path, help=f"write outputs here (default {_common.OUT_ROOT})")
    args = parser.parse_args()
    if args.out_root:
        _common.OUT_ROOT = args.out_root
    run(args.quick, args.reps, tuple(args.codec) if args.codec else CODECS)
    if args.memory:
        memory(args.quick)
