#!/usr/bin/env python3
"""Signature verification throughput, and ``poh-batcher verify`` over 100k generated ACKs.

Prints:

1. base58 decoding: ours against the ``base58`` package (when installed);
2. Ed25519 verification of ACK lines on one core (the CPU cost per ACK), and
   the writer's block check, which spreads a block over one thread per CPU;
3. the archive command on the same input with and without ``--verify-signatures``;
4. ``poh-batcher verify DIR`` and ``verify DIR --signatures`` (``--jobs 1`` and
   the default pool) over the archive, with their wall time.

The input is made once with ``gen_acks.py -n 100000 --workers 2`` and cached in
``bench/.cache/``. Run: ``python bench/bench_verify.py [-n 100000] [--gen PATH]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
DEFAULT_GEN = HERE.parent.parent / "shared" / "gen_acks.py"  # the shared/ folder beside the repository


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="ACKs (default 100000)")
    parser.add_argument("--gen", type=Path, default=Path(os.environ.get("POH_GEN_ACKS", DEFAULT_GEN)))
    parser.add_argument("--sample", type=int, default=20_000, help="ACKs for the single-core figures")
    args = parser.parse_args()

    data = input_file(args.n, args.gen)
    lines = data.read_bytes().splitlines()
    print(f"input: {data} ({len(lines):,} ACKs, {data.stat().st_size / 1e6:.1f} MB)")
    print(f"cpus: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} (wall times depend on it; CPU times less)")
    bench_base58(lines[: args.sample])
    bench_single_core(lines[: args.sample])
    with tempfile.TemporaryDirectory(prefix="poh-bench-verify-") as temp:
        archive = Path(temp) / "batches"
        bench_writer(data, archive, Path(temp))
        bench_verify(archive)
    return 0


def input_file(count: int, gen: Path) -> Path:
    path = CACHE / f"acks_{count // 1000}k.jsonl" if count % 1000 == 0 else CACHE / f"acks_{count}.jsonl"
    if path.exists():
        return path
    if not gen.exists():
        sys.exit(f"no {path} and no generator at {gen}; pass --gen /path/to/gen_acks.py")
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"generating {path} with {gen} ...", flush=True)
    subprocess.run([sys.executable, str(gen), "-n", str(count), "-o", str(path), "--workers", "2"], check=True)
    return path


def bench_base58(lines: list[bytes]) -> None:
    import msgspec

    from poh_batcher.signatures import b58decode

    class Fields(msgspec.Struct):
        signature: str
        pubkey: str

    signatures = [f.signature for f in msgspec.json.Decoder(list[Fields]).decode(b"[" + b",".join(lines) + b"]")]
    started = time.perf_counter()
    for text in signatures:
        b58decode(text)
    ours = time.perf_counter() - started
    print(f"base58 decode of a signature: {ours / len(signatures) * 1e6:.1f} us (poh_batcher.signatures)", end="")
    try:
        import base58
    except ImportError:
        print()
        return
    started = time.perf_counter()
    for text in signatures:
        base58.b58decode(text)
    theirs = time.perf_counter() - started
    print(f", {theirs / len(signatures) * 1e6:.1f} us (base58 package)")


def bench_single_core(lines: list[bytes]) -> None:
    from poh_batcher.ingest_checks import signature_check
    from poh_batcher.signatures import SignatureVerifier, verify_lines

    started, cpu = time.perf_counter(), time.process_time()
    failures = verify_lines(lines)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert not failures, failures[:3]
    print(
        f"signature verification, one core: {len(lines):,} ACKs in {elapsed:.2f} s wall = "
        f"{len(lines) / elapsed:,.0f} ACKs/s; {cpu / len(lines) * 1e6:.1f} us CPU/ACK "
        f"= {len(lines) / cpu:,.0f} ACKs/s per CPU second (JSON decode + base58 + Ed25519)"
    )
    check = signature_check()
    started, cpu = time.perf_counter(), time.process_time()
    for line in lines:
        check(line)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(
        f"ingest check (--verify-signatures, one thread, key cache kept): {len(lines) / elapsed:,.0f} ACKs/s wall, "
        f"{len(lines) / cpu:,.0f} ACKs/s per CPU second"
    )
    blocks = [lines[start : start + 4000] for start in range(0, len(lines), 4000)]  # the reader's ~1 MB blocks
    verifier = SignatureVerifier()
    started = time.perf_counter()
    for block in blocks:
        verifier.check_block(block)
    elapsed = time.perf_counter() - started
    print(f"ingest block check (what the writer runs, {os.cpu_count()} CPUs): {len(lines) / elapsed:,.0f} ACKs/s wall")


def cli(*argv: str, stdin: Path | None = None) -> tuple[str, subprocess.CompletedProcess[bytes]]:
    """Run the command; its wall time and CPU time (its own and its children's, e.g. the verify pool)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("POH_BATCHER_")}
    command = [sys.executable, "-m", "poh_batcher.cli", *argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(stdin or os.devnull, "rb") as source:
        result = subprocess.run(command, stdin=source, capture_output=True, env=environment, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return f"{wall:.2f} s wall, {cpu:.2f} s CPU", result


def bench_writer(data: Path, archive: Path, temp: Path) -> None:
    for label, destination, extra in (
        ("archive, no checks", temp / "plain", []),
        ("archive --verify-signatures", archive, ["--verify-signatures"]),
    ):
        times, result = cli("-n", "500", "-t", "5", "--no-spool", "-q", "-o", str(destination), *extra, stdin=data)
        if result.returncode != 0:
            sys.exit(f"{label} failed:\n{result.stderr.decode()}")
        print(f"{label}: {times} -> {result.stderr.decode().strip().splitlines()[-1]}")
    shutil.rmtree(temp / "plain", ignore_errors=True)


def bench_verify(archive: Path) -> None:
    runs = (
        ("verify", []),
        ("verify --signatures --jobs 1", ["--signatures", "--jobs", "1"]),
        ("verify --signatures (default --jobs)", ["--signatures"]),
    )
    for label, extra in runs:
        times, result = cli("verify", str(archive), *extra)
        report = result.stdout.decode().strip().splitlines()
        print(f"$ poh-batcher {label} DIR   [exit {result.returncode}, {times}]")
        for line in report:
            print(f"    {line}")
        if result.returncode != 0:
            sys.exit(f"{label} failed: {result.stderr.decode()}")


if __name__ == "__main__":
    sys.exit(main())
