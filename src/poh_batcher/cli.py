"""The ``poh-batcher`` command.

``poh-batcher [options]`` archives JSON Lines from stdin (or ``-i FILE``).
This module only parses options, builds the objects and prints; the job
itself is :func:`poh_batcher.pipeline.run_archive`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from contextlib import ExitStack
from typing import Any, BinaryIO

from . import __version__
from .config import add_operations_options, parse_args
from .errors import ConfigurationError, PohBatcherError, StorageError
from .logs import log_always, log_rejects, report_summary, setup_logging
from .naming import validate_writer_id
from .observer import ArchiveObserver, command_observers
from .parsing import DEFAULT_MAX_LINE_BYTES, AckCheck, LineValidator, Reject
from .pipeline import ArchiveSettings, run_archive
from .rejects import RejectsFile
from .retry import RetryPolicy
from .sources.base import Source
from .sources.lines import LineSource
from .sources.nats import (
    DEFAULT_ACK_WAIT,
    DEFAULT_DURABLE,
    DEFAULT_STREAM,
    DEFAULT_SUBJECT,
    NatsSettings,
    NatsSource,
    default_writer_id,
    is_nats_url,
)
from .spool import Recovered, Spool, default_spool_dir
from .storage import LocalStorage, StorageBackend, storage_from_url
from .summary import Summary

EXIT_OK = 0
EXIT_INVALID_INPUT = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_KEPT_IN_SPOOL = 4
EXIT_INTERRUPTED = 130

DEFAULT_OUTPUT = "file://./batches"

# Subcommands live in their own modules, imported only when used; without a
# subcommand the command archives, exactly as it always has.
SUBCOMMANDS: dict[str, str] = {
    "cat": "poh_batcher.cli_read:cat_main",
    "ls": "poh_batcher.cli_read:ls_main",
    "verify": "poh_batcher.cli_read:verify_main",
    "publish": "poh_batcher.cli_publish:publish_main",
}


def build_parser() -> argparse.ArgumentParser:
    """Options of the archive command."""
    parser = argparse.ArgumentParser(
        prog="poh-batcher",
        description="Archive Proof-of-History ACKs (JSON Lines) as compressed batch files on disk or S3.",
        epilog="Example: cat acks.jsonl | poh-batcher -n 500 -t 2.0 -o file:///var/lib/poh/acks",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    batching = parser.add_argument_group("batching")
    batching.add_argument("-n", "--batch-size", type=_positive_int, default=500, help="ACKs per batch (default 500)")
    batching.add_argument(
        "-t",
        "--batch-timeout",
        type=_positive_float,
        default=1.5,
        help="seconds after a batch's first ACK before it is written anyway (default 1.5)",
    )
    batching.add_argument(
        "--max-bytes", type=_positive_int, default=None, help="flush before a batch passes this many uncompressed bytes"
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("-i", "--input", default="-", help="read this file instead of stdin")
    io.add_argument(
        "--source",
        default="-",
        help="where ACKs come from: - (stdin, or -i FILE; the default) or nats://HOST:PORT (a JetStream stream)",
    )
    js = parser.add_argument_group("NATS JetStream source (--source nats://HOST:PORT)")
    js.add_argument("--stream", default=DEFAULT_STREAM, help=f"stream (default {DEFAULT_STREAM}; created if missing)")
    js.add_argument("--subject", default=DEFAULT_SUBJECT, help=f"subject filter (default '{DEFAULT_SUBJECT}')")
    js.add_argument(
        "--durable",
        default=DEFAULT_DURABLE,
        help=f"durable consumer shared by every batcher: each message goes to one of them (default {DEFAULT_DURABLE})",
    )
    js.add_argument(
        "--ack-wait",
        type=_positive_float,
        default=DEFAULT_ACK_WAIT,
        metavar="SECONDS",
        help="a dead batcher's unacknowledged messages go to the others after this long "
        f"(default {DEFAULT_ACK_WAIT:g})",
    )
    js.add_argument(
        "--until-empty",
        action="store_true",
        help="exit once the consumer has nothing waiting and nothing unacknowledged (drain, then stop)",
    )
    io.add_argument(
        "-o",
        "--output-dir",
        default=DEFAULT_OUTPUT,
        help=f"destination: file:///abs, file://./rel, a path, or s3://bucket/prefix (default {DEFAULT_OUTPUT})",
    )
    io.add_argument(
        "--compression", choices=["auto", "zstd", "gzip", "none"], default="auto", help="codec (default auto: zstd)"
    )
    io.add_argument("--level", type=int, default=3, help="compression level (default 3)")
    io.add_argument("--writer-id", default=None, help="put this id in every key (several writers, one destination)")
    io.add_argument("--max-in-flight", type=_positive_int, default=8, help="batches stored at once (default 8)")
    io.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    io.add_argument("--s3-region", default=None, help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--rejects",
        metavar="FILE",
        default=None,
        help="append every invalid line, verbatim, to FILE, and its reason to FILE.reasons",
    )
    validation.add_argument("--strict", action="store_true", help="stop at the first invalid line (exit status 1)")
    validation.add_argument(
        "--max-line-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_LINE_BYTES,
        help=f"reject longer lines (default {DEFAULT_MAX_LINE_BYTES})",
    )
    validation.add_argument(
        "--verify-signatures", action="store_true", help="reject ACKs whose Ed25519 signature does not verify"
    )
    validation.add_argument(
        "--ttl", type=_positive_float, default=None, metavar="SECONDS", help="reject ACKs older than this"
    )
    validation.add_argument(
        "--dedupe", action="store_true", help="drop (as rejects) ACKs whose id was seen in the last --dedupe-window"
    )
    validation.add_argument(
        "--dedupe-window", type=_positive_int, default=None, metavar="N", help="ids remembered (default 100000)"
    )
    safety = parser.add_argument_group("durability")
    safety.add_argument(
        "--spool-dir",
        default=None,
        help="write-ahead spool folder (default: $XDG_STATE_HOME/poh-batcher/spool/<hash of destination, writer id>)",
    )
    safety.add_argument("--no-spool", action="store_true", help="no spool: a crash loses the ACKs not yet stored")
    safety.add_argument(
        "--spool-fsync-interval",
        type=_non_negative_float,
        default=0.0,
        help="0 (default): fsync the spool before every upload; N: at most every N seconds (see Guarantees)",
    )
    safety.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        default=30.0,
        help="on SIGTERM/SIGINT, wait this long for uploads; the rest stays in the spool (default 30)",
    )
    add_operations_options(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of fatal errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in SUBCOMMANDS:
        module_name, _, function_name = SUBCOMMANDS[arguments[0]].partition(":")
        subcommand: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function_name)
        return subcommand(arguments[1:])
    parser = build_parser()
    args = parse_args(parser, arguments)  # flag > POH_BATCHER_* environment > --config file > default
    setup_logging(args.log_level, args.log_format, quiet=args.quiet)
    try:
        if is_nats_url(args.source) and not args.writer_id:
            args.writer_id = default_writer_id()  # <host>-<pid>: batchers on one destination never collide
        settings = ArchiveSettings(
            batch_size=args.batch_size,
            batch_timeout=args.batch_timeout,
            max_bytes=args.max_bytes,
            codec=args.compression,
            level=args.level,
            writer_id=validate_writer_id(args.writer_id),
            max_in_flight=args.max_in_flight,
            max_line_bytes=args.max_line_bytes,
            strict=args.strict,
            shutdown_timeout=args.shutdown_timeout,
            # With a spool, ACKs wait safely on disk: retry until storage is back or we are stopped.
            retry=RetryPolicy(attempts=None if not args.no_spool else 10, initial_delay=0.2, max_delay=30.0),
        )
        storage = storage_from_url(args.output_dir, endpoint=args.s3_endpoint or None, region=args.s3_region or None)
        with ExitStack() as files:
            stream = files.enter_context(_open_input(args.input))
            rejects_file = files.enter_context(_open_rejects(args.rejects)) if args.rejects else None
            _check_report_path(args.stats_json)
            observers = command_observers(args, files)
            summary = _run_settled(
                _archive(
                    settings,
                    storage,
                    stream,
                    rejects_file,
                    _spool_of(args, storage),
                    observers,
                    _checks_of(args),
                    _nats_of(args, settings),
                ),
                settle=not isinstance(storage, LocalStorage),
            )
    except (ConfigurationError, ValueError, RuntimeError) as exc:
        return _fail(args, exc, EXIT_USAGE)
    except OSError as exc:
        return _fail(args, exc, EXIT_USAGE)
    except StorageError as exc:
        return _fail(args, exc, EXIT_STORAGE)
    except PohBatcherError as exc:
        return _fail(args, exc, EXIT_STORAGE)
    report_summary(summary, args.stats_json)
    if summary.acks_not_stored:
        return EXIT_KEPT_IN_SPOOL if summary.spool_dir and summary.stopped_by == "interrupted" else EXIT_STORAGE
    if args.strict and summary.lines_rejected:
        return EXIT_INVALID_INPUT
    return EXIT_OK


def _spool_of(args: argparse.Namespace, storage: StorageBackend) -> Spool | None:
    if args.no_spool or is_nats_url(args.source):
        return None  # JetStream keeps every message until it is stored: it is the write-ahead log
    destination = storage.get_url("x").rpartition("/")[0]
    directory = args.spool_dir or default_spool_dir(destination, args.writer_id)
    return Spool(
        directory, destination=destination, writer_id=args.writer_id, fsync_interval=args.spool_fsync_interval
    )


def _nats_of(args: argparse.Namespace, settings: ArchiveSettings) -> NatsSettings | None:
    if args.source == "-":
        return None
    if not is_nats_url(args.source):
        raise ConfigurationError(f"--source {args.source!r}: use - (stdin or -i FILE) or nats://HOST:PORT")
    if args.input != "-":
        raise ConfigurationError("--input and a nats:// --source exclude each other")
    return NatsSettings(
        args.source,
        stream=args.stream,
        subject=args.subject,
        durable=args.durable,
        ack_wait=args.ack_wait,
        fetch_size=settings.batch_size,
        until_empty=args.until_empty,
        client_name=f"poh-batcher {settings.writer_id}",
    )


async def _archive(
    settings: ArchiveSettings,
    storage: StorageBackend,
    stream: BinaryIO,
    rejects_file: RejectsFile | None,
    spool: Spool | None,
    observers: Sequence[ArchiveObserver] = (),
    checks: Sequence[AckCheck] = (),
    nats: NatsSettings | None = None,
) -> Summary:
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    await _preflight(storage, spooled=spool is not None)
    recovered = Recovered()
    if spool is not None:
        input_name = stream.name if isinstance(stream.name, str) else None  # a file descriptor: stdin
        recovered = await asyncio.to_thread(spool.open, input_name)
        if recovered.input_offset:
            await asyncio.to_thread(_seek_input, stream, recovered.input_offset)
    validator = LineValidator(settings.max_line_bytes, checks=checks)
    source: Source
    if nats is not None:
        source = nats_source = NatsSource(nats, validator)
    else:
        nats_source = None
        source = LineSource(
            stream,
            validator,
            strict=settings.strict,
            start_offset=recovered.input_offset,
            first_line=recovered.input_line,
        )

    async def report(rejects: list[Reject]) -> None:
        await asyncio.to_thread(_write_rejects, rejects, rejects_file)

    try:
        if nats_source is not None:
            await nats_source.open()
        summary = await run_archive(
            settings,
            source,
            storage,
            report_rejects=report,
            stop=stop,
            spool=spool,
            recovered=recovered,
            observers=observers,
        )
    finally:
        if spool is not None:
            await spool.close()
        await storage.close()
        if nats_source is not None:  # after the last batches are stored: their acks go out here
            await nats_source.aclose()
            log_always(nats_source.stats.render())
    if spool is not None:
        summary.spool_dir = str(spool.directory)
    return summary


async def _preflight(storage: StorageBackend, *, spooled: bool) -> None:
    """Fail fast on what retrying cannot fix (credentials, a missing bucket, a bad path).

    Storage that does not answer yet (refused, timed out, 5xx) only stops a run
    without a spool: with one, the ACKs are accepted into it meanwhile and
    stored, with back-off, once storage answers, as during an outage mid-run.
    """
    try:
        await storage.preflight()
    except StorageError as exc:
        if not (spooled and exc.retryable):
            raise
        logging.getLogger("poh_batcher").warning(
            "%s; starting anyway: ACKs are accepted into the spool and stored once it answers",
            exc,
            extra={"cause": "storage unreachable at start"},
        )


def _run_settled(job: Coroutine[Any, Any, Summary], *, settle: bool = True) -> Summary:
    """``asyncio.run(job)``, then a short pause before the interpreter may shut down.

    The S3 client (obstore) finishes an aborted request on its own threads and
    then calls back into Python; a callback that lands while the interpreter is
    finalizing kills that thread and aborts the whole process (status 134
    instead of 3 or 4, seen after a failed preflight against a refused port).
    Letting those callbacks arrive first costs 50 ms at exit; local disk has no
    such threads (``settle=False``), so it does not pay them.
    """
    try:
        return asyncio.run(job)
    finally:
        if settle:
            time.sleep(0.05)


def _checks_of(args: argparse.Namespace) -> list[AckCheck]:
    """Signature, age and duplicate checks (imported only when asked for)."""
    if not (args.verify_signatures or args.ttl or args.dedupe or args.dedupe_window):
        return []
    from .ingest_checks import build_checks

    return build_checks(
        verify_signatures=args.verify_signatures,
        ttl_seconds=args.ttl,
        dedupe=args.dedupe,
        dedupe_window=args.dedupe_window,
    )


def _open_input(name: str) -> BinaryIO:
    """The input file, or stdin as an unbuffered file of its own.

    The reader thread may still be blocked reading an idle pipe when a signal
    ends the run. Reading through ``sys.stdin.buffer`` it would hold that
    object's lock, and the interpreter aborts at exit when it cannot take it;
    a separate unbuffered file on descriptor 0 has no such lock.
    """
    if name == "-":
        return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
    try:
        return open(os.path.abspath(name), "rb")
    except OSError as exc:
        raise ConfigurationError(f"cannot read --input {name}: {exc.strerror or exc}") from exc


def _open_rejects(path: str) -> RejectsFile:
    try:
        return RejectsFile(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot write --rejects {path}: {exc.strerror or exc}") from exc


def _check_report_path(path: str | None) -> None:
    """``--stats-json`` is written at the end: a folder that is missing or read-only is found now."""
    if path and path != "-":
        folder = os.path.dirname(os.path.abspath(path))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigurationError(f"cannot write --stats-json {path}: {folder} is missing or not writable")


def _seek_input(stream: BinaryIO, offset: int) -> None:
    """Continue a file where the spool says its accepted input ended."""
    size = os.fstat(stream.fileno()).st_size
    if size < offset:
        raise ConfigurationError(
            f"{stream.name} has {size} bytes, fewer than the {offset} already archived from it "
            "(recorded in the spool); was it replaced? Use another --spool-dir to start over"
        )
    stream.seek(offset)


def _write_rejects(rejects: list[Reject], rejects_file: RejectsFile | None) -> None:
    log_rejects(rejects)  # "line N: reason" on stderr, a JSON record each with --log-format json
    if rejects_file is not None:
        rejects_file.write(rejects)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    """First SIGINT/SIGTERM: stop reading, flush, exit. A second one: exit at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            sys.stderr.write(f"poh-batcher: {signal.Signals(signum).name} again, exiting now\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)


def _fail(args: argparse.Namespace, exc: BaseException, status: int) -> int:
    # "poh-batcher: error: ..." (or a JSON record), credentials redacted; the traceback only with --debug
    logging.getLogger("poh_batcher").error("%s", exc, exc_info=exc if args.debug else None)
    return status


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
