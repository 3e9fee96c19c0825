"""The ``poh-batcher`` command.

``poh-batcher [options]`` archives JSON Lines from stdin (or ``-i FILE``).
This module only parses options, builds the objects and prints; the job
itself is :func:`poh_batcher.pipeline.run_archive`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import BinaryIO

from . import __version__
from .errors import ConfigurationError, PohBatcherError, StorageError
from .naming import validate_writer_id
from .parsing import DEFAULT_MAX_LINE_BYTES, LineValidator, Reject
from .pipeline import ArchiveSettings, run_archive
from .sources.lines import LineSource
from .storage import storage_from_url
from .summary import Summary

EXIT_OK = 0
EXIT_INVALID_INPUT = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
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
    io.add_argument("--max-in-flight", type=_positive_int, default=4, help="batches stored at once (default 4)")
    io.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    validation = parser.add_argument_group("validation")
    validation.add_argument("--rejects", default=None, help="append every invalid line, verbatim, to this file")
    validation.add_argument("--strict", action="store_true", help="stop at the first invalid line (exit status 1)")
    validation.add_argument(
        "--max-line-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_LINE_BYTES,
        help=f"reject longer lines (default {DEFAULT_MAX_LINE_BYTES})",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of fatal errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in SUBCOMMANDS:
        module_name, _, function_name = SUBCOMMANDS[arguments[0]].partition(":")
        subcommand: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function_name)
        return subcommand(arguments[1:])
    args = build_parser().parse_args(arguments)
    try:
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
        )
        options = {"endpoint": args.s3_endpoint} if args.s3_endpoint else {}
        storage = storage_from_url(args.output_dir, **options)
        with ExitStack() as files:
            stream: BinaryIO = sys.stdin.buffer if args.input == "-" else files.enter_context(open(args.input, "rb"))
            rejects_file = files.enter_context(open(args.rejects, "ab")) if args.rejects else None
            summary = asyncio.run(_archive(settings, storage, stream, rejects_file))
    except (ConfigurationError, ValueError, RuntimeError) as exc:
        return _fail(args, exc, EXIT_USAGE)
    except OSError as exc:
        return _fail(args, exc, EXIT_USAGE)
    except StorageError as exc:
        return _fail(args, exc, EXIT_STORAGE)
    except PohBatcherError as exc:
        return _fail(args, exc, EXIT_STORAGE)
    print(summary.render(), file=sys.stderr)
    if summary.acks_not_stored:
        return EXIT_STORAGE
    if args.strict and summary.lines_rejected:
        return EXIT_INVALID_INPUT
    return EXIT_OK


async def _archive(
    settings: ArchiveSettings, storage: object, stream: BinaryIO, rejects_file: BinaryIO | None
) -> Summary:
    from .storage.base import StorageBackend

    assert isinstance(storage, StorageBackend)
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    await storage.preflight()
    validator = LineValidator(settings.max_line_bytes)
    source = LineSource(stream, validator, strict=settings.strict)

    async def report(rejects: list[Reject]) -> None:
        await asyncio.to_thread(_write_rejects, rejects, rejects_file)

    try:
        return await run_archive(settings, source, storage, report_rejects=report, stop=stop)
    finally:
        await storage.close()


def _write_rejects(rejects: list[Reject], rejects_file: BinaryIO | None) -> None:
    sys.stderr.write("".join(f"line {r.line}: {r.reason}\n" for r in rejects))
    if rejects_file is not None:
        rejects_file.write(b"".join(r.raw + b"\n" for r in rejects))
        rejects_file.flush()


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
    if args.debug:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"poh-batcher: error: {exc}", file=sys.stderr)
    return status


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
