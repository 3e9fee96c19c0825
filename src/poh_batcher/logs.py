"""Logging for the command: the ``poh_batcher`` logger, text or JSON lines, no secrets.

The library only logs through ``logging.getLogger("poh_batcher...")`` and never
configures anything; :func:`setup_logging` is what the command calls. Every
record goes through :class:`RedactingFilter` on its way out, so a URL with a
password, a presigned query string or an AWS secret key never reaches stderr,
``--debug`` tracebacks included.

Text lines look like the command's other messages (``poh-batcher: warning:
...``); invalid input lines keep their ``line N: reason`` form. With
``--log-format json`` each record is one JSON object on one line, extra fields
included, for log collectors.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from .observer import ArchiveObserver

LOGGER = "poh_batcher"
REJECTS_LOGGER = "poh_batcher.rejects"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
_REDACTED = "***"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]*:)[^\s@]+(?=@)"), r"\g<head>" + _REDACTED),
    # presigned URLs and query strings: X-Amz-Signature=..., X-Amz-Credential=..., Signature=..., token=...
    (
        re.compile(
            r"(?P<head>[?&;](?:x-amz-(?:signature|credential|security-token)|signature|awsaccesskeyid|"
            r"access_token|token|password|secret)=)[^&\s\"'#]+",
            re.IGNORECASE,
        ),
        r"\g<head>" + _REDACTED,
    ),
    # key = value / key: value / "key": "value" for secret-looking names
    (
        re.compile(
            r"(?P<head>\b(?:aws_secret_access_key|secret_access_key|secretaccesskey|aws_session_token|session_token|"
            r"sessiontoken|secret_key|password|passwd)\b[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&}]+",
            re.IGNORECASE,
        ),
        r"\g<head>" + _REDACTED,
    ),
    # Authorization headers (AWS SigV4 or bearer tokens)
    (re.compile(r"(?P<head>\bauthorization\b[\"']?\s*[:=]\s*[\"']?)[^\"'\n]+", re.IGNORECASE), r"\g<head>" + _REDACTED),
    # AWS access key ids (AKIA... long-term, ASIA... temporary)
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), _REDACTED),
)


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``***``."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Redacts the message, string extras and the traceback of every record (attach to handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name, value in list(vars(record).items()):
            if name not in _STANDARD and isinstance(value, str):
                setattr(record, name, redact(value))
        return True


class TextFormatter(logging.Formatter):
    """``poh-batcher: level: message``; invalid lines as plain ``line N: reason``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name != REJECTS_LOGGER:
            message = f"poh-batcher: {record.levelname.lower()}: {message}"
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        return message


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, RFC 3339), level, logger, message, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in entry:
                entry[name] = value
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":"))


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time (rich's live display swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging(level: str = "warning", fmt: str = "text", *, quiet: bool = False) -> logging.Logger:
    """Configure the ``poh_batcher`` logger for the command; calling it again replaces the setup.

    ``quiet`` keeps errors only (no warnings, no invalid-line messages).
    """
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    logger = logging.getLogger(LOGGER)
    for old in [h for h in logger.handlers if getattr(h, "_poh_batcher", False)]:
        logger.removeHandler(old)
    handler = _StderrHandler()
    handler._poh_batcher = True  # type: ignore[attr-defined]
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    numeric = getattr(logging, level.upper())
    logger.setLevel(max(numeric, logging.ERROR) if quiet else numeric)
    logger.propagate = False
    return logger


def log_always(message: str, **fields: Any) -> None:
    """Emit an INFO record whatever the level (the final summary is always shown)."""
    logger = logging.getLogger(LOGGER)
    record = logger.makeRecord(LOGGER, logging.INFO, __file__, 0, message, (), None, extra=fields)
    logger.handle(record)


def log_rejects(rejects: Iterable[Any]) -> None:
    """One WARNING per invalid line, ``line N: reason`` (objects with ``line`` and ``reason``)."""
    logger = logging.getLogger(REJECTS_LOGGER)
    if not logger.isEnabledFor(logging.WARNING):
        return
    for reject in rejects:
        logger.warning("line %d: %s", reject.line, reject.reason, extra={"line": reject.line, "reason": reject.reason})


def json_logging() -> bool:
    """Whether the command's logs are JSON lines (then nothing else may go to stderr)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger(LOGGER).handlers)


class LogObserver(ArchiveObserver):
    """Logs retries (WARNING), stored batches (DEBUG) and the end of the run (INFO)."""

    RETRY_WARNING_INTERVAL = 5.0
    """During an outage every batch retries; one WARNING per this many seconds says so (all at DEBUG)."""

    def __init__(self) -> None:
        self._log = logging.getLogger(LOGGER)
        self._retry_warned_at: float | None = None
        self._retries_unreported = 0

    def on_delivered(self, receipt: Any) -> None:
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug(
                "stored batch %d: %d ACKs, %d -> %d bytes, %d attempt(s), %.3f s, key %s",
                receipt.index,
                receipt.count,
                receipt.raw_bytes,
                receipt.stored_bytes,
                receipt.attempts,
                receipt.store_seconds,
                receipt.key,
                extra={
                    "batch": receipt.index,
                    "acks": receipt.count,
                    "bytes_in": receipt.raw_bytes,
                    "bytes_out": receipt.stored_bytes,
                    "attempts": receipt.attempts,
                    "seconds": round(receipt.store_seconds, 6),
                    "key": receipt.key,
                },
            )

    def on_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        now = time.monotonic()
        quiet = self._retry_warned_at is not None and now - self._retry_warned_at < self.RETRY_WARNING_INTERVAL
        if quiet and not self._log.isEnabledFor(logging.DEBUG):
            self._retries_unreported += 1
            return
        more = f" ({self._retries_unreported} more retries since the last warning)" if self._retries_unreported else ""
        if not quiet:
            self._retry_warned_at, self._retries_unreported = now, 0
        self._log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "store attempt %d failed (%s: %s); retrying in %.2f s%s",
            attempt,
            type(exc).__name__,
            exc,
            delay,
            "" if quiet else more,
            extra={"attempt": attempt, "cause": type(exc).__name__, "delay": round(delay, 3)},
        )


def report_summary(summary: Any, stats_json: str | None = None) -> None:
    """The final summary: text on stderr (or one JSON record with JSON logs), and ``--stats-json``."""
    figures = summary.as_dict()
    if json_logging():
        log_always("summary", summary=figures)
    else:
        print(redact(summary.render()), file=sys.stderr, flush=True)
    if stats_json:
        text = json.dumps(figures, indent=2, sort_keys=True) + "\n"
        try:
            if stats_json == "-":
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                with open(stats_json, "w", encoding="utf-8") as file:
                    file.write(text)
        except OSError as exc:  # the ACKs are stored: say so, but do not fail the run for a report file
            logging.getLogger(LOGGER).error("cannot write --stats-json %s: %s", stats_json, exc.strerror or exc)
