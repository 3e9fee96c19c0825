"""``poh-batcher cat | ls | verify``: reading the archive back, listing it, auditing it.

Each ``*_main`` takes the arguments after the subcommand and returns the exit
status: 0 all well, 1 a batch could not be read (``cat``, ``ls``) or the audit
found a problem (``verify``), 2 a usage error, 3 the storage could not be
listed, 141 stdout was closed early (``cat … | head``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import msgspec

from .errors import ConfigurationError, PohBatcherError, StorageError
from .naming import make_key
from .parsing import LineValidator
from .reader import ArchiveReader, Batch, BatchError, BatchRef, BatchStat

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130

_MAX_LISTED = 5  # per batch: how many bad ACKs a report names before summarising


class _Id(msgspec.Struct):
    id: str


_ids = msgspec.json.Decoder(list[_Id])
_id = msgspec.json.Decoder(_Id)


# -- parsers ----------------------------------------------------------------------


def _parser(name: str, description: str, *, many: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"poh-batcher {name}", description=description)
    parser.add_argument(
        "sources" if many else "source",
        nargs="+" if many else None,
        metavar="SOURCE",
        help="a batch file or object, a folder or hour/day folder, or a prefix: path, file:// or s3://",
    )
    parser.add_argument("--since", default=None, metavar="HOUR", help="first UTC hour to read, e.g. 2025-01-01T03")
    parser.add_argument("--until", default=None, metavar="HOUR", help="last UTC hour to read (included)")
    # The archive command's S3 settings from the environment apply here too, so that reading
    # back goes to the server the archive was written to.
    parser.add_argument(
        "--s3-endpoint",
        default=os.environ.get("POH_BATCHER_S3_ENDPOINT") or None,
        help="S3-compatible endpoint URL (default: POH_BATCHER_S3_ENDPOINT, then AWS_ENDPOINT_URL)",
    )
    parser.add_argument(
        "--s3-region",
        default=os.environ.get("POH_BATCHER_S3_REGION") or None,
        help="S3 region (default: POH_BATCHER_S3_REGION, then AWS_REGION)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of fatal errors")
    return parser


def _cat_parser() -> argparse.ArgumentParser:
    return _parser("cat", "Print the ACKs of the archive as JSON Lines, in key order, exactly as stored.", many=True)


def _ls_parser() -> argparse.ArgumentParser:
    parser = _parser("ls", "List the batches of the archive with their ACK counts, codecs and sizes.")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    return parser


def _verify_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "verify",
        "Check that every batch reads back, holds what its metadata claims, that no seq is missing and "
        "(with --signatures) that every ACK's Ed25519 signature verifies. Exit status 0 only if all is well.",
    )
    parser.add_argument("--signatures", action="store_true", help="verify the Ed25519 signature of every ACK")
    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=min(2, os.cpu_count() or 1),
        help="processes that verify signatures (default: 2, or 1 on one CPU)",
    )
    parser.add_argument("--fail-on-duplicates", action="store_true", help="a duplicate ACK id is a failure too")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")
    return parser


# -- entry points -----------------------------------------------------------------


def cat_main(argv: list[str]) -> int:
    """``poh-batcher cat SOURCE... [--since H] [--until H]``."""
    args = _cat_parser().parse_args(argv)
    return _run(args, _cat(args))


def ls_main(argv: list[str]) -> int:
    """``poh-batcher ls SOURCE [--json]``."""
    args = _ls_parser().parse_args(argv)
    return _run(args, _ls(args))


def verify_main(argv: list[str]) -> int:
    """``poh-batcher verify SOURCE [--signatures]``."""
    args = _verify_parser().parse_args(argv)
    return _run(args, _verify(args))


def _run(args: argparse.Namespace, job: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(job)
    except BrokenPipeError:
        # The reader of stdout went away (``| head``): stop quietly, like cat.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (ConfigurationError, ValueError, OSError) as exc:
        return _fail(args, exc, EXIT_USAGE)
    except (StorageError, PohBatcherError) as exc:
        return _fail(args, exc, EXIT_STORAGE)


def _fail(args: argparse.Namespace, exc: BaseException, status: int) -> int:
    if args.debug:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"poh-batcher: error: {exc}", file=sys.stderr)
    return status


def _reader(args: argparse.Namespace, source: str) -> ArchiveReader:
    options = {"endpoint": args.s3_endpoint or None, "region": args.s3_region or None}  # None: from the environment
    return ArchiveReader(source, since=args.since, until=args.until, storage_options=options)


def _warn(error: BatchError) -> None:
    print(f"poh-batcher: {error.ref.url}: {error.reason}", file=sys.stderr)


# -- cat --------------------------------------------------------------------------


async def _cat(args: argparse.Namespace) -> int:
    readers = [_reader(args, source) for source in args.sources]  # every source checked before any output
    out = sys.stdout.buffer
    failed: list[BatchError] = []

    def skip(error: BatchError) -> None:
        failed.append(error)
        _warn(error)

    try:
        for reader in readers:
            async for batch in reader.batches(on_error=skip):
                if batch.acks:
                    out.write(b"\n".join(batch.acks) + b"\n")
        out.flush()
    finally:
        for reader in readers:
            await reader.close()
    if failed:
        print(f"poh-batcher: {len(failed)} batch(es) could not be read; their ACKs are missing above", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


# -- ls ---------------------------------------------------------------------------


async def _ls(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    failed_rows: list[dict[str, Any]] = []
    listing: list[dict[str, Any]] = []  # both, in key order, for the table

    def unreadable(error: BatchError) -> None:
        failed_rows.append(
            {"key": error.ref.key, "url": error.ref.url, "codec": error.ref.codec, "error": error.reason}
        )
        listing.append(failed_rows[-1])

    async with _reader(args, args.source) as reader:
        async for stat in reader.stats(on_error=unreadable):
            rows.append(_row(stat))
            listing.append(rows[-1])
    known_raw = [row["raw_bytes"] for row in rows if row["raw_bytes"] is not None]
    total: dict[str, Any] = {
        "batches": len(rows),
        "acks": sum(row["acks"] for row in rows),
        "stored_bytes": sum(row["stored_bytes"] for row in rows),
        "raw_bytes": sum(known_raw) if len(known_raw) == len(rows) else None,
        "unreadable": len(failed_rows),
    }
    total["ratio"] = _ratio(total["raw_bytes"], total["stored_bytes"])
    if args.json:
        document = {"source": args.source, "batches": rows, "unreadable": failed_rows, "total": total}
        sys.stdout.write(json.dumps(document, indent=1) + "\n")
    else:
        _print_table(listing, total, sys.stdout)
    return EXIT_PROBLEM if failed_rows else EXIT_OK


def _row(stat: BatchStat) -> dict[str, Any]:
    return {
        "key": stat.ref.key,
        "url": stat.ref.url,
        "acks": stat.ack_count or 0,
        "codec": stat.codec or stat.ref.codec,
        "stored_bytes": stat.stored_bytes,
        "raw_bytes": stat.raw_bytes,
        "ratio": _ratio(stat.raw_bytes, stat.stored_bytes),
    }


def _ratio(raw: int | None, stored: int) -> float | None:
    return round(raw / stored, 2) if raw is not None and stored else None


def _print_table(rows: list[dict[str, Any]], total: dict[str, Any], out: TextIO) -> None:
    width = max([len("KEY")] + [len(row["key"]) for row in rows])
    out.write(f"{'KEY':<{width}}  {'ACKS':>8}  {'CODEC':<5}  {'STORED':>12}  {'RAW':>12}  {'RATIO':>6}\n")
    for row in rows:
        if "error" in row:
            out.write(f"{row['key']:<{width}}  UNREADABLE: {row['error']}\n")
            continue
        raw = f"{row['raw_bytes']:,}" if row["raw_bytes"] is not None else "-"
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        out.write(
            f"{row['key']:<{width}}  {row['acks']:>8,}  {row['codec']:<5}  {row['stored_bytes']:>12,}  "
            f"{raw:>12}  {ratio:>6}\n"
        )
    raw_total = f", {total['raw_bytes']:,} bytes raw (ratio {total['ratio']:.2f})" if total["ratio"] else ""
    out.write(
        f"total: {total['batches']:,} batches, {total['acks']:,} ACKs, {total['stored_bytes']:,} bytes stored"
        f"{raw_total}" + (f"; {total['unreadable']} unreadable" if total["unreadable"] else "") + "\n"
    )


# -- verify -----------------------------------------------------------------------


@dataclass(slots=True)
class _Audit:
    """What ``verify`` found."""

    batches: int = 0
    acks: int = 0
    bad: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    urls: dict[str, str] = field(default_factory=dict)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def problem(self, ref: BatchRef, reason: str) -> None:
        self.bad[ref.key].append(reason)
        self.urls[ref.key] = ref.url


async def _verify(args: argparse.Namespace) -> int:
    started = time.monotonic()
    audit = _Audit()
    seen: dict[str, str] = {}  # ACK id -> key of its first batch
    seqs: dict[tuple[str, datetime, str | None], dict[int, BatchRef]] = defaultdict(dict)
    checks: list[asyncio.Future[None]] = []
    pool: concurrent.futures.Executor | None = None
    outstanding = asyncio.Semaphore(max(4, 4 * args.jobs))
    validator = LineValidator()
    loop = asyncio.get_running_loop()
    try:
        async with _reader(args, args.source) as reader:
            refs = await reader.refs()
            audit.ignored = reader.ignored
            if args.signatures and len(refs) > 2:  # a pool costs a process start: not for a batch or two
                pool = _signature_pool(args.jobs)

            async def check_signatures(batch: Batch) -> None:
                try:
                    from .signatures import verify_lines

                    if pool is not None:
                        failures = await loop.run_in_executor(pool, verify_lines, batch.acks)
                    else:
                        failures = await asyncio.to_thread(verify_lines, batch.acks)
                finally:
                    outstanding.release()
                if failures:
                    _report_acks(audit, batch, failures, "bad signature")

            def unreadable(error: BatchError) -> None:
                audit.batches += 1
                audit.problem(error.ref, error.reason)
                _note_seq(seqs, error.ref)

            async for batch in reader.batches(on_error=unreadable, with_metadata=True):
                audit.batches += 1
                audit.acks += len(batch.acks)
                _note_seq(seqs, batch.ref)
                ids, problems = await asyncio.to_thread(_inspect, batch, validator)
                for reason in problems:
                    audit.problem(batch.ref, reason)
                for ack_id in ids:
                    first = seen.get(ack_id)
                    if first is None:
                        seen[ack_id] = batch.ref.key
                    else:
                        audit.duplicates.setdefault(ack_id, [first]).append(batch.ref.key)
                if args.signatures and batch.acks:
                    await outstanding.acquire()
                    checks.append(asyncio.ensure_future(check_signatures(batch)))
            await asyncio.gather(*checks)
    finally:
        for check in checks:
            check.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if not reader.single:
        audit.gaps = _gaps(seqs)
    elapsed = time.monotonic() - started
    ok = not audit.bad and not audit.gaps and (not args.fail_on_duplicates or not audit.duplicates)
    ok = ok and bool(refs)
    if args.json:
        _print_audit_json(audit, args, ok, elapsed, reader)
    else:
        _print_audit(audit, args, ok, elapsed, reader, sys.stdout)
    return EXIT_OK if ok else EXIT_PROBLEM


def _signature_pool(jobs: int) -> concurrent.futures.Executor | None:
    if jobs < 2:
        return None
    # spawn: the event loop's threads (and an S3 client's runtime) must not be forked.
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def _inspect(batch: Batch, validator: LineValidator) -> tuple[list[str], list[str]]:
    """Check one batch's count, codec and ACKs (on a worker thread): its ids, and what is wrong."""
    problems: list[str] = []
    declared = batch.declared_count
    if declared is not None and declared != len(batch.acks):
        problems.append(f"metadata says {declared} ACKs, the batch holds {len(batch.acks)}")
    recorded_codec = batch.metadata.get("codec")
    if recorded_codec is not None and recorded_codec != batch.ref.codec:
        problems.append(f"metadata says codec {recorded_codec}, the key and data say {batch.ref.codec}")
    if not batch.acks:
        return [], problems
    block = validator.validate_block(batch.acks)
    if block.rejects:
        problems.append(_describe(batch, [(reject.line - 1, reject.reason) for reject in block.rejects], "invalid ACK"))
        bad = {reject.line - 1 for reject in block.rejects}
        return [_id.decode(ack).id for index, ack in enumerate(batch.acks) if index not in bad], problems
    return [item.id for item in _ids.decode(b"[" + b",".join(batch.acks) + b"]")], problems


def _report_acks(audit: _Audit, batch: Batch, failures: list[tuple[int, str]], what: str) -> None:
    audit.problem(batch.ref, _describe(batch, failures, what))


def _describe(batch: Batch, failures: list[tuple[int, str]], what: str) -> str:
    named = []
    for index, reason in failures[:_MAX_LISTED]:
        try:
            ack_id = repr(_id.decode(batch.acks[index]).id)
        except msgspec.DecodeError:
            ack_id = "?"
        named.append(f"#{index + 1} id {ack_id}: {reason}")
    more = f"; and {len(failures) - _MAX_LISTED} more" if len(failures) > _MAX_LISTED else ""
    return f"{len(failures)} {what}{'s' if len(failures) > 1 else ''}: " + "; ".join(named) + more


def _note_seq(seqs: dict[tuple[str, datetime, str | None], dict[int, BatchRef]], ref: BatchRef) -> None:
    if ref.hour is not None and ref.seq is not None:
        seqs[(ref.prefix, ref.hour, ref.writer_id)][ref.seq] = ref


def _gaps(seqs: dict[tuple[str, datetime, str | None], dict[int, BatchRef]]) -> list[dict[str, Any]]:
    """Per prefix, hour and writer: the seqs missing below the highest present (seqs start at 0)."""
    gaps = []
    for (prefix, hour, writer), present in sorted(
        seqs.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or "")
    ):
        missing = [seq for seq in range(max(present)) if seq not in present]
        if missing:
            codec = next(iter(present.values())).codec
            gaps.append(
                {
                    "prefix": prefix,
                    "hour": hour.strftime("%Y-%m-%dT%H"),
                    "writer_id": writer,
                    "missing": missing,
                    "missing_keys": [make_key(hour, seq, codec, prefix=prefix, writer_id=writer) for seq in missing],
                }
            )
    return gaps


def _ranges(numbers: list[int]) -> str:
    parts: list[str] = []
    start = previous = numbers[0]
    for number in [*numbers[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ", ".join(parts)


def _print_audit(
    audit: _Audit, args: argparse.Namespace, ok: bool, elapsed: float, reader: ArchiveReader, out: TextIO
) -> None:
    checked = "signatures checked" if args.signatures else "signatures not checked (--signatures)"
    out.write(f"verify {args.source}: {audit.batches:,} batches, {audit.acks:,} ACKs, {checked}\n")
    for key in sorted(audit.bad, key=lambda k: reader.ref(k).order):
        for reason in audit.bad[key]:
            out.write(f"BAD {key}: {reason}\n")
    for gap in audit.gaps:
        writer = f" writer {gap['writer_id']}" if gap["writer_id"] else ""
        where = f"{gap['prefix']}/" if gap["prefix"] else ""
        keys = ", ".join(gap["missing_keys"][:_MAX_LISTED]) + (", …" if len(gap["missing_keys"]) > _MAX_LISTED else "")
        out.write(
            f"GAP {where}{gap['hour']}{writer}: {len(gap['missing'])} missing seq {_ranges(gap['missing'])} ({keys})\n"
        )
    for ack_id, places in list(audit.duplicates.items())[:100]:
        out.write(f"DUP id {ack_id!r} in {len(places)} places: {', '.join(places)}\n")
    if len(audit.duplicates) > 100:
        out.write(f"DUP … and {len(audit.duplicates) - 100:,} more duplicate ids\n")
    if audit.ignored:
        out.write(f"note: {len(audit.ignored)} file(s) that are not batches ignored, e.g. {audit.ignored[0]}\n")
    if not audit.batches:
        out.write("FAILED: no batches found in the source (check the path, --since and --until)\n")
        return
    missing = sum(len(gap["missing"]) for gap in audit.gaps)
    verdict = "OK" if ok else "FAILED"
    out.write(
        f"{verdict}: {len(audit.bad)} bad batch(es), {missing} missing batch(es), "
        f"{len(audit.duplicates)} duplicate id(s); {audit.acks:,} ACKs in {elapsed:.2f} s"
        f" ({audit.acks / elapsed if elapsed > 0 else 0:,.0f} ACKs/s)\n"
    )


def _print_audit_json(audit: _Audit, args: argparse.Namespace, ok: bool, elapsed: float, reader: ArchiveReader) -> None:
    document = {
        "ok": ok,
        "source": args.source,
        "batches": audit.batches,
        "acks": audit.acks,
        "signatures_checked": bool(args.signatures),
        "bad": [{"key": key, "url": audit.urls[key], "reasons": reasons} for key, reasons in sorted(audit.bad.items())],
        "gaps": audit.gaps,
        "duplicates": [{"id": ack_id, "keys": keys} for ack_id, keys in audit.duplicates.items()],
        "ignored": audit.ignored,
        "elapsed_seconds": round(elapsed, 3),
    }
    sys.stdout.write(json.dumps(document, indent=1) + "\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
