"""``cat``, ``ls``, ``verify`` over archives the command wrote (local and S3), and the ingest checks.

The archives are written by the real command in a subprocess; the read
commands run in-process through ``poh_batcher.cli.main`` (the same routing as
the console script).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from poh_batcher.batcher import pack_lines
from poh_batcher.cli import main
from poh_batcher.naming import parse_key

DATA = Path(__file__).parent / "data" / "acks_10k.jsonl"
WRITE_TIMEOUT = 180


def write(
    destination: str, data: bytes, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Archive ``data`` with the real command; 500 ACKs per batch."""
    command = [sys.executable, "-m", "poh_batcher.cli", "-n", "500", "-t", "60", "--no-spool", "-o", destination]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("POH_BATCHER_")}
    environment.update(env or {})
    result = subprocess.run(
        [*command, *options], input=data, capture_output=True, env=environment, timeout=WRITE_TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    return result


class Run:
    def __init__(self, capsys: pytest.CaptureFixture[bytes]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, bytes, str]:
        code = main(list(argv))
        out, err = self.capsys.readouterr()
        return code, out, err.decode()


@pytest.fixture
def run(capsysbinary: pytest.CaptureFixture[bytes]) -> Run:
    return Run(capsysbinary)


@pytest.fixture(scope="module")
def stream() -> bytes:
    return DATA.read_bytes()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, stream: bytes) -> Path:
    root = tmp_path_factory.mktemp("written") / "archive"
    write(str(root), stream)
    return root


@pytest.fixture
def archive(written: Path, tmp_path: Path) -> Path:
    """A private copy of the written archive, to damage."""
    return Path(shutil.copytree(written, tmp_path / "archive"))


def batch_files(root: Path) -> list[Path]:
    paths = [p for p in root.rglob("ack_batch_*") if p.is_file()]
    return sorted(paths, key=lambda p: (p.parent.as_posix(), parse_key(p.relative_to(root).as_posix()).seq))  # type: ignore[union-attr]


def middle_batch(root: Path) -> Path:
    """A batch whose successor is in the same hour folder: deleting it leaves a gap."""
    files = batch_files(root)
    return next(p for p, q in itertools.pairwise(files[3:]) if p.parent == q.parent)


def forge(line: bytes) -> bytes:
    ack = json.loads(line)
    ack["timestamp"] = ack["timestamp"].replace("2025-01-01", "2025-01-02")
    return json.dumps(ack, separators=(",", ":")).encode()


# -- cat ------------------------------------------------------------------------


def test_cat_of_an_archive_is_its_input_stream(run: Run, written: Path, stream: bytes) -> None:
    code, out, err = run("cat", str(written))
    assert (code, err) == (0, "")
    assert out == stream


def test_cat_several_sources_and_hours(run: Run, written: Path, stream: bytes) -> None:
    first, second = batch_files(written)[:2]
    code, out, _ = run("cat", str(second), first.as_uri())
    assert code == 0
    assert out == b"".join(line + b"\n" for line in stream.splitlines()[500:1000] + stream.splitlines()[:500])
    code, out, _ = run("cat", str(written), "--since", "2999-01-01T00")
    assert (code, out) == (0, b"")


def test_cat_skips_a_bad_batch_names_it_and_fails(run: Run, archive: Path, stream: bytes) -> None:
    bad = batch_files(archive)[1]
    bad.write_bytes(bad.read_bytes()[:-10])
    code, out, err = run("cat", str(archive))
    assert code == 1
    assert out.splitlines() == stream.splitlines()[:500] + stream.splitlines()[1000:]
    assert f"{bad.name}: truncated" in err
    assert "1 batch(es) could not be read" in err


def test_cat_usage_errors(run: Run, tmp_path: Path) -> None:
    code, _, err = run("cat", str(tmp_path / "nowhere"))
    assert code == 2
    assert "no such batch file or folder" in err
    code, _, err = run("cat", str(tmp_path), "--since", "soon")
    assert code == 2
    assert "cannot read 'soon' as a UTC hour" in err


# -- ls -------------------------------------------------------------------------


def test_ls_table_and_json(run: Run, written: Path) -> None:
    code, out, _ = run("ls", str(written))
    lines = out.decode().splitlines()
    assert code == 0
    assert lines[0].split() == ["KEY", "ACKS", "CODEC", "STORED", "RAW", "RATIO"]
    assert len(lines) == 1 + 20 + 1
    assert lines[-1].startswith("total: 20 batches, 10,000 ACKs,")
    code, out, _ = run("ls", str(written), "--json")
    document = json.loads(out)
    assert code == 0
    assert document["total"]["acks"] == 10_000
    assert document["total"]["batches"] == 20
    first = document["batches"][0]
    path = written / first["key"]
    assert (first["acks"], first["codec"], first["stored_bytes"]) == (500, "zstd", path.stat().st_size)
    assert first["raw_bytes"] > first["stored_bytes"]
    assert first["ratio"] == round(first["raw_bytes"] / first["stored_bytes"], 2)


def test_ls_reports_an_unreadable_batch(run: Run, archive: Path) -> None:
    bad = batch_files(archive)[0]
    bad.write_bytes(b"")
    code, out, _ = run("ls", str(archive))
    assert code == 1
    assert f"{bad.relative_to(archive).as_posix()}  UNREADABLE: empty file" in out.decode()


# -- verify ---------------------------------------------------------------------


def test_verify_a_good_archive_with_signatures(run: Run, written: Path) -> None:
    code, out, _ = run("verify", str(written), "--signatures")
    text = out.decode()
    assert code == 0, text
    assert "20 batches, 10,000 ACKs, signatures checked" in text
    assert "OK: 0 bad batch(es), 0 missing batch(es), 0 duplicate id(s)" in text


def test_verify_reports_a_corrupted_batch(run: Run, archive: Path) -> None:
    bad = batch_files(archive)[4]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    code, out, _ = run("verify", str(archive))
    assert code == 1
    assert f"BAD {bad.relative_to(archive).as_posix()}: corrupted zstd data" in out.decode()


def test_verify_reports_a_truncated_batch(run: Run, archive: Path) -> None:
    bad = batch_files(archive)[7]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    code, out, _ = run("verify", str(archive))
    assert code == 1
    assert f"BAD {bad.relative_to(archive).as_posix()}: truncated" in out.decode()


def test_verify_reports_a_deleted_batch_as_a_seq_gap(run: Run, archive: Path) -> None:
    gone = middle_batch(archive)
    gone.unlink()
    seq = parse_key(gone.relative_to(archive).as_posix()).seq  # type: ignore[union-attr]
    code, out, _ = run("verify", str(archive))
    text = out.decode()
    assert code == 1
    assert f"1 missing seq {seq} ({gone.relative_to(archive).as_posix()})" in text
    assert "FAILED: 0 bad batch(es), 1 missing batch(es)" in text
    code, out, _ = run("verify", str(archive), "--json")
    gap = json.loads(out)["gaps"][0]
    assert (code, gap["missing"], gap["writer_id"]) == (1, [seq], None)


def test_verify_reports_a_forged_signature(run: Run, tmp_path: Path, stream: bytes) -> None:
    lines = stream.splitlines()[:1200]
    lines[777] = forge(lines[777])
    write(str(tmp_path / "a"), b"\n".join(lines) + b"\n")
    code, out, _ = run("verify", str(tmp_path / "a"))
    assert code == 0  # without --signatures nothing is wrong
    code, out, _ = run("verify", str(tmp_path / "a"), "--signatures", "--jobs", "1")
    text = out.decode()
    forged_id = json.loads(lines[777])["id"]
    second = batch_files(tmp_path / "a")[1].relative_to(tmp_path / "a").as_posix()
    assert code == 1
    assert f"BAD {second}: 1 bad signature: #278 id '{forged_id}': signature does not verify" in text
    code, out, _ = run("verify", str(tmp_path / "a"), "--signatures", "--jobs", "2", "--json")
    report = json.loads(out)
    assert (code, report["ok"], [bad["key"] for bad in report["bad"]]) == (1, False, [second])


def test_verify_reports_duplicates_and_invalid_acks(run: Run, tmp_path: Path, stream: bytes) -> None:
    lines = stream.splitlines()[:600]
    write(str(tmp_path / "a"), b"\n".join([*lines, lines[3], lines[550]]) + b"\n")
    code, out, _ = run("verify", str(tmp_path / "a"))
    text = out.decode()
    assert code == 0  # duplicates are reported, not failures, unless asked
    assert "2 duplicate id(s)" in text
    first_id = json.loads(lines[3])["id"]
    assert f"DUP id '{first_id}' in 2 places" in text
    code, _, _ = run("verify", str(tmp_path / "a"), "--fail-on-duplicates")
    assert code == 1
    # A batch holding something that is not an ACK (written by another tool).
    key = "20250101/00/ack_batch_000000.json"
    (tmp_path / "b" / "20250101" / "00").mkdir(parents=True)
    (tmp_path / "b" / key).write_bytes(pack_lines([lines[0], b'{"id":"x"}'], codec="none").payload)
    code, out, _ = run("verify", str(tmp_path / "b"))
    assert code == 1
    assert f"BAD {key}: 1 invalid ACK: #2 id 'x': missing field 'timestamp'" in out.decode()


def test_verify_of_nothing_fails(run: Run, tmp_path: Path) -> None:
    code, out, _ = run("verify", str(tmp_path))
    assert code == 1
    assert "no batches found" in out.decode()


def test_verify_a_single_batch_has_no_gap_check(run: Run, written: Path) -> None:
    code, out, _ = run("verify", str(batch_files(written)[3]), "--signatures")
    assert code == 0
    assert "1 batches, 500 ACKs" in out.decode()


# -- the writer's checks --------------------------------------------------------


def test_writer_verify_signatures_rejects_exactly_the_forged(run: Run, tmp_path: Path, stream: bytes) -> None:
    lines = stream.splitlines()[:3000]
    forged_at = set(range(5, 3000, 97))
    mixed = [forge(line) if index in forged_at else line for index, line in enumerate(lines)]
    result = write(
        str(tmp_path / "a"), b"\n".join(mixed) + b"\n", "--verify-signatures", "--rejects", str(tmp_path / "rej")
    )
    rejected = (tmp_path / "rej").read_bytes().splitlines()
    assert rejected == [mixed[i] for i in sorted(forged_at)]
    assert result.stderr.decode().count("signature does not verify") == len(forged_at)
    code, out, _ = run("cat", str(tmp_path / "a"))
    assert code == 0
    assert out.splitlines() == [line for index, line in enumerate(lines) if index not in forged_at]
    code, _, _ = run("verify", str(tmp_path / "a"), "--signatures")
    assert code == 0


def test_writer_dedupe_and_ttl(run: Run, tmp_path: Path, stream: bytes) -> None:
    lines = stream.splitlines()[:100]
    repeated = [*lines, lines[0], lines[99], *lines[:5]]
    result = write(str(tmp_path / "a"), b"\n".join(repeated) + b"\n", "--dedupe-window", "50")
    assert run("cat", str(tmp_path / "a"))[1].splitlines() == [*lines, lines[0], *lines[1:5]]  # 0-4 left the window
    assert "line 102: duplicate id" in result.stderr.decode()
    result = write(str(tmp_path / "b"), b"\n".join(repeated) + b"\n", "--dedupe")
    assert run("cat", str(tmp_path / "b"))[1].splitlines() == lines
    assert result.stderr.decode().count("(--dedupe)") == 7
    assert "107 lines read, 100 ACKs accepted, 7 rejected (7 duplicates dropped by --dedupe)" in result.stderr.decode()


def test_writer_strict_with_dedupe_keeps_the_acks_before_the_bad_line(run: Run, tmp_path: Path, stream: bytes) -> None:
    lines = stream.splitlines()[:100]
    command = [sys.executable, "-m", "poh_batcher.cli", "--no-spool", "--strict", "--dedupe", "-o", str(tmp_path / "a")]
    result = subprocess.run(
        command, input=b"\n".join([*lines[:60], b"{oops", *lines[60:]]), capture_output=True, timeout=WRITE_TIMEOUT
    )
    assert result.returncode == 1
    assert "line 61: not valid JSON" in result.stderr.decode()
    assert run("cat", str(tmp_path / "a"))[1].splitlines() == lines[:60]
    result = write(str(tmp_path / "c"), b"\n".join(lines) + b"\n", "--ttl", "60")
    assert result.stderr.decode().count("too old") == 100


# -- S3 -------------------------------------------------------------------------


@pytest.fixture
def s3_archive(s3_server: Any, s3_bucket: str, s3_env: dict[str, str], stream: bytes) -> str:
    url = f"s3://{s3_bucket}/acks"
    write(url, b"\n".join(stream.splitlines()[:3000]) + b"\n", env=s3_env)
    return url


def s3_keys(s3_server: Any, url: str) -> list[str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return sorted(item["Key"] for item in listed.get("Contents", []))


def test_s3_cat_ls_verify(run: Run, s3_archive: str, s3_server: Any, stream: bytes) -> None:
    code, out, _ = run("cat", s3_archive)
    lines = out.splitlines()
    assert code == 0
    assert lines == stream.splitlines()[:3000]
    code, out, _ = run("ls", s3_archive, "--json")
    document = json.loads(out)
    assert code == 0
    assert document["total"]["acks"] == len(lines)
    assert all(row["raw_bytes"] is None and row["codec"] == "zstd" for row in document["batches"])  # from HEAD
    code, out, _ = run("verify", s3_archive, "--signatures")
    assert code == 0, out.decode()
    first = s3_keys(s3_server, s3_archive)[0]
    code, out, _ = run("cat", f"{s3_archive.split('/acks')[0]}/{first}")
    assert (code, out.splitlines()) == (0, lines[:500])


def test_s3_reading_back_takes_the_archive_commands_s3_settings_from_the_environment(
    run: Run, s3_archive: str, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator who set POH_BATCHER_S3_ENDPOINT / _REGION for the writer reads back from the same server."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("POH_BATCHER_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("POH_BATCHER_S3_REGION", s3_server.region)
    code, out, err = run("ls", s3_archive, "--json")
    assert code == 0, err
    assert json.loads(out)["total"]["acks"] == 3000


def test_s3_verify_reports_damage(run: Run, s3_archive: str, s3_server: Any, stream: bytes) -> None:
    bucket = s3_archive.removeprefix("s3://").partition("/")[0]
    client = s3_server.client()
    keys = s3_keys(s3_server, s3_archive)
    corrupted, truncated, recounted, deleted, forged = keys[0], keys[1], keys[2], keys[3], keys[4]
    body = client.get_object(Bucket=bucket, Key=corrupted)["Body"].read()
    flipped = bytearray(body)
    flipped[len(body) // 2] ^= 0xFF
    metadata = {"ack-count": "500", "codec": "zstd"}
    client.put_object(Bucket=bucket, Key=corrupted, Body=bytes(flipped), Metadata=metadata)
    body = client.get_object(Bucket=bucket, Key=truncated)["Body"].read()
    client.put_object(Bucket=bucket, Key=truncated, Body=body[:-20], Metadata=metadata)
    body = client.get_object(Bucket=bucket, Key=recounted)["Body"].read()
    client.put_object(Bucket=bucket, Key=recounted, Body=body, Metadata={"ack-count": "499", "codec": "zstd"})
    client.delete_object(Bucket=bucket, Key=deleted)
    lines = stream.splitlines()[2000:2500]
    lines[10] = forge(lines[10])
    client.put_object(Bucket=bucket, Key=forged, Body=pack_lines(lines, codec="zstd").payload, Metadata=metadata)
    code, out, _ = run("verify", s3_archive, "--signatures")
    text = out.decode()
    relative = [key.removeprefix("acks/") for key in keys]
    assert code == 1
    assert f"BAD {relative[0]}: corrupted zstd data" in text
    assert f"BAD {relative[1]}: truncated" in text
    assert f"BAD {relative[2]}: metadata says 499 ACKs, the batch holds 500" in text
    assert f"missing seq 3 ({relative[3]})" in text
    assert f"BAD {relative[4]}: 1 bad signature: #11 id '{json.loads(lines[10])['id']}'" in text
    code, out, _ = run("ls", s3_archive)
    assert code == 0  # ls trusts the metadata; it does not download
    assert out.decode().splitlines()[-1].startswith(f"total: {len(keys) - 1} batches")
