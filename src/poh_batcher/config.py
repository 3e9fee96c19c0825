"""Options from the command line, the environment and a TOML file, in that order.

Every long option of the archive command can also be given as an environment
variable ``POH_BATCHER_<OPTION>`` (``--batch-size`` → ``POH_BATCHER_BATCH_SIZE``)
or as a key of a TOML file named by ``--config FILE`` (or ``POH_BATCHER_CONFIG``),
spelled ``batch-size`` or ``batch_size``. A flag beats the environment, the
environment beats the file, the file beats the built-in default.

It works over the argparse parser itself, so an option added to the command is
configurable everywhere with no other change: values from the file, then from
the environment, become the parser's defaults, and the command line is parsed
over them. Values go through each option's own ``type`` and ``choices``, so
they are checked exactly as on the command line; a bad one is an error naming
the variable or the file and key.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

ENV_PREFIX = "POH_BATCHER_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NOT_CONFIGURABLE = frozenset({"help", "version", "config"})
# Options that store one value or a switch; others (append, count) would need their own syntax.
_SUPPORTED = (argparse._StoreAction, argparse._StoreTrueAction, argparse._StoreFalseAction)


def add_operations_options(parser: argparse.ArgumentParser) -> None:
    """The operator options: configuration, output, logs and metrics."""
    ops = parser.add_argument_group("configuration, logs and metrics")
    ops.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"read options from this TOML file (keys are long option names); every option is also read from "
        f"{ENV_PREFIX}<OPTION> variables; precedence: flag > environment > file > default (env {CONFIG_ENV})",
    )
    ops.add_argument(
        "-q", "--quiet", action="store_true", help="no progress display and no warnings; errors and summary only"
    )
    ops.add_argument(
        "--stats-json", metavar="FILE", default=None, help="also write the final summary as JSON to FILE (- for stdout)"
    )
    ops.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on this port at /metrics (0: any free port, logged at info level)",
    )
    ops.add_argument(
        "--metrics-addr", default="127.0.0.1", metavar="ADDR", help="metrics listen address (default 127.0.0.1)"
    )
    ops.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="warning",
        help="what to log on stderr (default warning)",
    )
    ops.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text (default) or json: one JSON object per line, summary included",
    )


def env_var(option: str) -> str:
    """The environment variable of a long option: ``--batch-size`` → ``POH_BATCHER_BATCH_SIZE``."""
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """Parse ``argv`` over the environment over the config file; exits with status 2 on any bad value."""
    try:
        layered_defaults(parser, argv, os.environ if environ is None else environ)
    except ConfigurationError as exc:
        parser.error(str(exc))
    return parser.parse_args(argv)


def layered_defaults(
    parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Set ``parser``'s defaults from the config file, then the environment; returns what was set.

    Raises :class:`ConfigurationError` naming the variable or file key of a bad value.
    """
    options = _configurable(parser)
    values: dict[str, Any] = {}
    path = _config_path(argv, environ)
    if path is not None:
        values.update(_from_file(path, options))
    values.update(_from_env(environ, options))
    parser.set_defaults(**values)
    return values


def _configurable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name (without dashes) → action, for every option that takes part."""
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if not long or action.dest in _NOT_CONFIGURABLE or action.dest == argparse.SUPPRESS:
            continue
        if not isinstance(action, _SUPPORTED):
            continue
        options[long[0][2:]] = action
    return options


def _config_path(argv: Sequence[str], environ: Mapping[str, str]) -> Path | None:
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", default=None)
    known, _ = finder.parse_known_args(list(argv))
    path = known.config or environ.get(CONFIG_ENV) or None
    return Path(path) if path else None


def _from_file(path: Path, options: Mapping[str, argparse.Action]) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            table = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigurationError(f"config file {str(path)!r} not found (--config / {CONFIG_ENV})") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, raw in table.items():
        name = key.replace("_", "-")
        where = f"config file {str(path)!r}, key {key!r}"
        if name not in options:
            hint = difflib.get_close_matches(name, list(options), n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(sorted(options))}"
            raise ConfigurationError(f"{where}: no such option{suggestion}")
        action = options[name]
        values[action.dest] = _convert(action, raw, where)
    return values


def _from_env(environ: Mapping[str, str], options: Mapping[str, argparse.Action]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, action in options.items():
        var = env_var(name)
        raw = environ.get(var)
        if raw is None or raw == "":
            continue  # unset and empty both mean "not given"
        values[action.dest] = _convert(action, raw, f"environment variable {var}={raw!r}")
    return values


def _convert(action: argparse.Action, raw: object, where: str) -> Any:
    """``raw`` (a string from the environment, any TOML value from the file) as ``action`` would store it."""
    option = next(s for s in action.option_strings if s.startswith("--"))
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(raw, bool):
            flag = raw
        elif isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            flag = raw.strip().lower() in _TRUE
        else:
            raise ConfigurationError(f"{where}: {option} is a switch; use true or false (1/0, yes/no, on/off)")
        return flag if isinstance(action, argparse._StoreTrueAction) else not flag
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ConfigurationError(f"{where}: {option} takes one value, not {type(raw).__name__} {raw!r}")
    text = str(raw)
    value: Any = text
    if action.type is not None:
        convert: Any = action.type
        try:
            value = convert(text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigurationError(f"{where}: {option} {exc}") from None
        except (TypeError, ValueError):
            kind = getattr(convert, "__name__", "").strip("_").replace("_", " ") or "the expected"
            raise ConfigurationError(f"{where}: {option} needs a {kind} value, got {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigurationError(f"{where}: {option} must be one of {choices}, got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text}")
    return value
