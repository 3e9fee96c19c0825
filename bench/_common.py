"""Shared helpers of the benchmarks: the cached input, timed child processes, formatting."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
GEN_ACKS = ROOT.parent / "shared" / "gen_acks.py"
FULL_LINES = 1_000_000
OUT_ROOT = CACHE / "out"  # where runs write; bench_cli --out-root moves it (tmpfs: no disk cost)


def input_file(lines: int = FULL_LINES) -> Path:
    """A cached file of ``lines`` generated ACKs (generated once, 1M at a time)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    full = CACHE / "acks_1m.jsonl"
    if not full.exists():
        print(f"generating {full} with {GEN_ACKS} (about 20 s on 2 cores)...", file=sys.stderr, flush=True)
        temp = full.with_suffix(".tmp")
        subprocess.run(
            [sys.executable, str(GEN_ACKS), "-n", str(FULL_LINES), "--workers", "2", "-o", str(temp)], check=True
        )
        temp.rename(full)
    if lines == FULL_LINES:
        return full
    if lines > FULL_LINES:
        raise ValueError("inputs larger than 1M lines are streamed: see repeated_input()")
    part = CACHE / f"acks_{lines}.jsonl"
    if not part.exists():
        with full.open("rb") as src, part.with_suffix(".tmp").open("wb") as dst:
            for _, line in zip(range(lines), src, strict=False):
                dst.write(line)
        part.with_suffix(".tmp").rename(part)
    return part


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


@dataclass
class ChildRun:
    wall: float
    max_rss_kb: int
    user: float
    sys: float
    returncode: int
    stderr: str


def run_child(
    argv: list[str], *, stdin_path: Path | None = None, stdin_repeat: int = 1, env: dict[str, str] | None = None
) -> ChildRun:
    """Run ``argv`` with stdin from a file (repeated ``stdin_repeat`` times through a pipe if > 1).

    Wall time covers the whole child, start-up included; peak RSS and CPU come
    from ``wait4`` of that child alone (the feeding ``cat`` is not counted).
    """
    feeder: subprocess.Popen[bytes] | None = None
    started = time.perf_counter()
    if stdin_path is not None and stdin_repeat > 1:
        feeder = subprocess.Popen(["cat", *[str(stdin_path)] * stdin_repeat], stdout=subprocess.PIPE)
        stdin = feeder.stdout
    elif stdin_path is not None:
        stdin = stdin_path.open("rb")
    else:
        stdin = subprocess.DEVNULL
    proc = subprocess.Popen(
        argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    if feeder is not None:
        assert feeder.stdout is not None
        feeder.stdout.close()
    elif stdin_path is not None:
        stdin.close()  # type: ignore[union-attr]
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    if feeder is not None:
        feeder.wait()
    return ChildRun(
        wall, usage.ru_maxrss, usage.ru_utime, usage.ru_stime, proc.returncode, err.decode(errors="replace")
    )


def fresh_dir(name: str) -> Path:
    path = OUT_ROOT / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def count_files(root: Path) -> int:
    return sum(1 for _, _, files in os.walk(root) for f in files if not f.startswith("."))


def rate(n: float, seconds: float) -> str:
    if n / seconds >= 1e6:
        return f"{n / seconds / 1e6:.2f}M"
    return f"{n / seconds / 1e3:.0f}k"


def mb(n_bytes: float) -> float:
    return n_bytes / 1e6
