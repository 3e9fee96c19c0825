"""compress / decompress: codecs, fallbacks, determinism, standard frames."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from poh_batcher.compression import compress, decompress, resolve_codec, sniff_codec

DATA = b'[{"id":"tx-1","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p","note":"\xc3\xa9"}]' * 50


@pytest.mark.parametrize("codec", ["zstd", "gzip", "none"])
def test_round_trip(codec: str) -> None:
    used, frame = compress(DATA, codec=codec)
    assert used == codec
    assert decompress(used, frame) == DATA


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_compresses(codec: str) -> None:
    _, frame = compress(DATA, codec=codec)
    assert len(frame) < len(DATA) // 5


def test_none_is_identity() -> None:
    assert compress(DATA, codec="none") == ("none", DATA)


def test_empty_input_round_trips() -> None:
    for codec in ("zstd", "gzip", "none"):
        used, frame = compress(b"", codec=codec)
        assert decompress(used, frame) == b""


def test_auto_picks_zstd() -> None:
    used, frame = compress(DATA)
    assert used == "zstd"
    assert frame.startswith(b"\x28\xb5\x2f\xfd")
    assert sniff_codec(frame) == "zstd"
    assert sniff_codec(compress(DATA, codec="gzip")[1]) == "gzip"
    assert sniff_codec(DATA) == "none"
    assert sniff_codec(b"garbage") is None


@pytest.mark.parametrize("codec", ["lz4", "ZSTD", "", "auto "])
def test_unknown_codec_is_value_error(codec: str) -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        compress(DATA, codec=codec)
    with pytest.raises(ValueError, match="unknown codec"):
        decompress(codec, DATA)


def test_bad_level_is_value_error() -> None:
    with pytest.raises(ValueError, match="gzip level"):
        compress(DATA, level=10, codec="gzip")
    with pytest.raises(ValueError, match="zstd level"):
        compress(DATA, level=23, codec="zstd")


@pytest.mark.parametrize("codec", ["zstd", "gzip", "none"])
@pytest.mark.parametrize("level", [1, 3, 9])
def test_deterministic(codec: str, level: int) -> None:
    assert compress(DATA, level=level, codec=codec) == compress(DATA, level=level, codec=codec)


def test_levels_differ_but_all_decompress() -> None:
    frames = {compress(DATA * 20, level=level, codec="zstd")[1] for level in (1, 19)}
    assert len(frames) == 2
    for frame in frames:
        assert decompress("zstd", frame) == DATA * 20


@pytest.mark.parametrize(("codec", "tool"), [("zstd", ["zstd", "-d", "-c"]), ("gzip", ["gzip", "-d", "-c"])])
def test_frames_readable_by_command_line_tools(codec: str, tool: list[str]) -> None:
    _, frame = compress(DATA, codec=codec)
    out = subprocess.run(tool, input=frame, capture_output=True, check=True)
    assert out.stdout == DATA


@pytest.mark.parametrize(("codec", "tool"), [("zstd", ["zstd", "-c", "-q"]), ("gzip", ["gzip", "-c"])])
def test_reads_frames_written_by_command_line_tools(codec: str, tool: list[str]) -> None:
    # streaming tools do not record the content size in the frame
    frame = subprocess.run(tool, input=DATA, capture_output=True, check=True).stdout
    assert decompress(codec, frame) == DATA


def test_corrupt_zstd_frame_is_detected() -> None:
    _, frame = compress(DATA, codec="zstd")
    broken = bytearray(frame)
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(Exception):  # noqa: B017, PT011 - zstandard.ZstdError, not ours to rename
        decompress("zstd", bytes(broken))


def _run_without_zstandard(body: str) -> subprocess.CompletedProcess[str]:
    script = "import sys\nsys.modules['zstandard'] = None\n" + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ}, timeout=60
    )


def test_without_zstandard_auto_falls_back_to_gzip_and_zstd_names_the_package() -> None:
    result = _run_without_zstandard(
        """
        from poh_batcher.compression import compress, decompress
        import gzip
        data = b'[1,2,3]' * 100
        used, frame = compress(data)
        assert used == 'gzip', used
        assert gzip.decompress(frame) == data
        assert decompress(used, frame) == data
        for call in (lambda: compress(data, codec='zstd'), lambda: decompress('zstd', b'x')):
            try:
                call()
            except RuntimeError as exc:
                assert 'zstandard' in str(exc), exc
            else:
                raise AssertionError('no RuntimeError')
        import poh_batcher
        from poh_batcher import AsyncBatcher
        b = AsyncBatcher(10, 1.0, lambda batch: None)
        assert b.codec == 'gzip', b.codec
        print('OK')
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_resolve_codec() -> None:
    assert resolve_codec("auto") == "zstd"
    assert resolve_codec("none") == "none"


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_frame_is_an_error_not_short_data(codec: str, keep: float) -> None:
    big = b"[" + b",".join(b'{"n":%d}' % i for i in range(20_000)) + b"]"
    _, frame = compress(big, codec=codec)
    with pytest.raises(EOFError):
        decompress(codec, frame[: int(len(frame) * keep)])


def test_truncated_zstd_checksum_is_an_error() -> None:
    _, frame = compress(DATA, codec="zstd")
    with pytest.raises(EOFError):
        decompress("zstd", frame[:-4])  # the frame's checksum cut off


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_concatenated_frames_like_the_tools(codec: str) -> None:
    first, second = compress(b"[1,", codec=codec)[1], compress(b"2]", codec=codec)[1]
    tool = ["zstd", "-d", "-c", "-q"] if codec == "zstd" else ["gzip", "-d", "-c"]
    expected = subprocess.run(tool, input=first + second, capture_output=True, check=True).stdout
    assert decompress(codec, first + second) == expected == b"[1,2]"


def test_garbage_after_zstd_frame_is_an_error() -> None:
    _, frame = compress(DATA, codec="zstd")
    with pytest.raises(Exception):  # noqa: B017, PT011 - zstandard.ZstdError
        decompress("zstd", frame + b"garbage!")
