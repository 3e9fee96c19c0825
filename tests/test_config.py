"""Configuration layering: flag > POH_BATCHER_* environment > --config TOML file > default."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from poh_batcher.cli import build_parser
from poh_batcher.config import _configurable, env_var, layered_defaults, parse_args
from poh_batcher.errors import ConfigurationError

ACK = '{"id":"a%d","timestamp":"2024-05-01T12:00:00Z","signature":"sig","pubkey":"key"}'


def parse(argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    return parse_args(build_parser(), argv, environ or {})


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "poh.toml"
    path.write_text(text)
    return path


# -- precedence ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_file", "in_env", "on_flag", "expected"),
    [
        (False, False, False, 500),  # default
        (True, False, False, 100),  # file beats default
        (True, True, False, 200),  # environment beats file
        (False, True, False, 200),
        (True, True, True, 300),  # flag beats environment
        (True, False, True, 300),
    ],
)
def test_precedence_flag_env_file_default(
    tmp_path: Path, in_file: bool, in_env: bool, on_flag: bool, expected: int
) -> None:
    config = write_config(tmp_path, "batch-size = 100\n")
    argv = ["--config", str(config)] if in_file else []
    argv += ["-n", "300"] if on_flag else []
    environ = {"POH_BATCHER_BATCH_SIZE": "200"} if in_env else {}
    assert parse(argv, environ).batch_size == expected


def test_each_layer_can_set_a_different_option(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'batch_size = 10\nbatch-timeout = 0.5\ncompression = "gzip"\nlevel = 7\n')
    args = parse(
        ["--config", str(config), "--level", "9"],
        {"POH_BATCHER_BATCH_TIMEOUT": "2.5", "POH_BATCHER_OUTPUT_DIR": "/data/acks"},
    )
    assert (args.batch_size, args.batch_timeout, args.compression, args.level) == (10, 2.5, "gzip", 9)
    assert args.output_dir == "/data/acks"
    assert args.writer_id is None  # untouched default


def test_switches_from_file_and_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path, "strict = true\nquiet = true\n")
    args = parse(["--config", str(config)], {"POH_BATCHER_QUIET": "no"})
    assert args.strict is True
    assert args.quiet is False  # the environment beats the file
    for text, expected in [("1", True), ("yes", True), ("ON", True), ("true", True), ("0", False), ("off", False)]:
        assert parse([], {"POH_BATCHER_STRICT": text}).strict is expected
    assert parse(["--strict"], {"POH_BATCHER_STRICT": "false"}).strict is True  # the flag wins


def test_config_file_from_environment_and_empty_variables_are_unset(tmp_path: Path) -> None:
    config = write_config(tmp_path, "max-in-flight = 9\n")
    args = parse([], {"POH_BATCHER_CONFIG": str(config), "POH_BATCHER_MAX_IN_FLIGHT": ""})
    assert args.max_in_flight == 9


def test_values_go_through_the_options_own_type(tmp_path: Path) -> None:
    # TOML numbers and strings are both accepted and converted like command-line text.
    config = write_config(tmp_path, 'batch-size = "42"\nmax-bytes = 4096\nbatch-timeout = 2\n')
    args = parse(["--config", str(config)])
    assert (args.batch_size, args.max_bytes, args.batch_timeout) == (42, 4096, 2.0)
    assert isinstance(args.batch_timeout, float)


def test_every_long_option_is_configurable() -> None:
    parser = build_parser()
    options = _configurable(parser)
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and action.dest not in ("help", "version", "config"):
            assert long[0][2:] in options, f"{long[0]} cannot be set from the environment or a file"
    assert env_var("--output-dir") == "POH_BATCHER_OUTPUT_DIR"
    assert env_var("--batch-size") == "POH_BATCHER_BATCH_SIZE"


# -- errors --------------------------------------------------------------------


def test_bad_environment_value_is_a_usage_error_naming_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse([], {"POH_BATCHER_BATCH_SIZE": "lots"})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "POH_BATCHER_BATCH_SIZE='lots'" in err
    assert "--batch-size" in err


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"POH_BATCHER_BATCH_SIZE": "0"}, "must be a positive integer"),
        ({"POH_BATCHER_COMPRESSION": "lz4"}, "must be one of auto, zstd, gzip, none"),
        ({"POH_BATCHER_STRICT": "maybe"}, "is a switch"),
        ({"POH_BATCHER_METRICS_PORT": "70000"}, "port number"),
    ],
)
def test_bad_environment_values(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as error:
        layered_defaults(build_parser(), [], environ)
    assert next(iter(environ)) in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch-sise = 3\n", "key 'batch-sise': no such option; did you mean 'batch-size'"),
        ('compression = "lz4"\n', "key 'compression': --compression must be one of"),
        ("batch-size = -1\n", "key 'batch-size': --batch-size must be a positive integer"),
        ("batch-size = [1, 2]\n", "takes one value"),
        ('strict = "sometimes"\n', "is a switch"),
        ("batch-size = \n", "is not valid TOML"),
    ],
)
def test_bad_config_file_values_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    config = write_config(tmp_path, text)
    with pytest.raises(ConfigurationError, match=message) as error:
        layered_defaults(build_parser(), ["--config", str(config)], {})
    assert str(config) in str(error.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        layered_defaults(build_parser(), ["--config", str(tmp_path / "nope.toml")], {})


# -- end to end ----------------------------------------------------------------


def test_command_reads_environment_and_file(tmp_path: Path) -> None:
    """A real run: output dir from the environment, batch size from the file, level from a flag."""
    config = write_config(tmp_path, 'batch-size = 10\ncompression = "gzip"\nbatch_timeout = 0.2\n')
    out = tmp_path / "out"
    stats = tmp_path / "stats.json"
    env = {
        **os.environ,
        "POH_BATCHER_OUTPUT_DIR": str(out),
        "POH_BATCHER_CONFIG": str(config),
        "POH_BATCHER_COMPRESSION": "none",  # beats the file's gzip
        "POH_BATCHER_STATS_JSON": str(stats),
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }
    lines = "".join(ACK % i + "\n" for i in range(25))
    result = subprocess.run(
        [sys.executable, "-m", "poh_batcher.cli", "--level", "1"],
        input=lines.encode(),
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    files = sorted(p.name for p in out.rglob("ack_batch_*"))
    assert len(files) == 3  # 10 + 10 + 5
    assert all(name.endswith(".json") for name in files)  # compression none, from the environment
    assert json.loads(stats.read_text())["acks_stored"] == 25
