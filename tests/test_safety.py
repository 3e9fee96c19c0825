"""Safety: keys stay inside the destination, file modes, and no credential ever printed."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from faultkit import POH, child_env, run, wait_for, write_acks
from poh_batcher.errors import ConfigurationError, StorageError
from poh_batcher.naming import KeyNamer, make_key, normalize_prefix, validate_writer_id
from poh_batcher.storage import LocalStorage
from poh_batcher.storage.base import check_key
from s3server import S3Server

ESCAPING_PREFIXES = ["../x", "a/../../b", "./a", "a/./b", "a//b/..", "..", "a/..", "x/../../../../etc"]
BAD_WRITER_IDS = ["../x", "a/../../b", "/abs", "a/b", "..", ".hidden", "a_b", "a\\b", "a b", "x" * 65, "é"]


# -- keys ------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ESCAPING_PREFIXES)
def test_prefix_cannot_escape(prefix: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        normalize_prefix(prefix)
    with pytest.raises(ConfigurationError):
        KeyNamer(LocalStorage(tmp_path), "zstd", prefix=prefix)


@pytest.mark.parametrize("writer_id", BAD_WRITER_IDS)
def test_writer_id_cannot_change_the_key_shape(writer_id: str) -> None:
    with pytest.raises(ConfigurationError):
        validate_writer_id(writer_id)


def test_leading_slash_prefix_is_relative() -> None:
    assert normalize_prefix("/abs/") == "abs"
    from datetime import UTC, datetime

    key = make_key(datetime(2025, 1, 1, tzinfo=UTC), 0, "zstd", prefix=normalize_prefix("/abs"), writer_id="w.1-a")
    assert key == "abs/20250101/00/ack_batch_w.1-a_000000.json.zst"
    assert check_key(key) == key


@pytest.mark.parametrize(
    "key", ["../x", "a/../../b", "/abs", "a//b", "a/./b", "", "a\\..\\b", "a\x00b", "20250101/00/../../../etc/passwd"]
)
def test_storage_refuses_escaping_keys(key: str, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(StorageError) as info:
        storage.path_of(key)
    assert not info.value.retryable
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("writer_id", ["../x", "a/../../b", "/abs", "a/b", "../../../tmp/evil"])
def test_cli_refuses_escaping_writer_id(tmp_path: Path, writer_id: str) -> None:
    source = tmp_path / "acks.jsonl"
    write_acks(source, 10)
    out = tmp_path / "dest" / "out"
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    done = run(["-i", str(source), "-o", str(out), "--writer-id", writer_id, "--spool-dir", str(tmp_path / "sp")])
    assert done.returncode == 2, done.stderr
    assert "writer id" in done.stderr
    assert "invalid" in done.stderr
    after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert after == before, "nothing written anywhere"


@pytest.mark.parametrize("prefix", ["../x", "a/../../b", "a/./b", "x/../../../../tmp"])
def test_cli_refuses_escaping_s3_prefix(s3_server: S3Server, s3_bucket: str, tmp_path: Path, prefix: str) -> None:
    source = tmp_path / "acks.jsonl"
    write_acks(source, 10)
    env = child_env(**s3_server.env())
    done = run(["-i", str(source), "-o", f"s3://{s3_bucket}/{prefix}", "--spool-dir", str(tmp_path / "sp")], env=env)
    assert done.returncode == 2, done.stderr
    assert "prefix" in done.stderr
    assert "invalid" in done.stderr
    client = s3_server.client()
    for bucket in client.list_buckets()["Buckets"]:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", [])]
        assert not any("ack_batch" in k for k in keys if bucket["Name"] == s3_bucket), keys


def test_s3_leading_slashes_stay_in_the_bucket(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "acks.jsonl"
    write_acks(source, 10)
    env = child_env(**s3_server.env())
    done = run(
        ["-i", str(source), "-o", f"s3://{s3_bucket}//abs", "--writer-id", "w1", "--spool-dir", str(tmp_path / "sp")],
        env=env,
    )
    assert done.returncode == 0, done.stderr
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert len(keys) == 1, keys
    assert keys[0].startswith("abs/"), keys
    assert "/ack_batch_w1_" in keys[0], keys


# -- modes ------------------------------------------------------------------------


def test_batch_files_0644_spool_0600_under_umask_077(tmp_path: Path) -> None:
    source = tmp_path / "acks.jsonl"
    write_acks(source, 1000)
    out, spool = tmp_path / "out", tmp_path / "spool"
    args = ["-i", str(source), "-o", str(out), "-n", "300", "--spool-dir", str(spool)]
    # Keep the spool's files: a run killed mid-way leaves its segments behind.
    process = subprocess.Popen(
        [*POH, *args], env=child_env(), stderr=subprocess.PIPE, preexec_fn=lambda: os.umask(0o077)
    )
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 4
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert len(folders) == 3  # out, YYYYMMDD, HH
    for folder in folders:  # readable by others, or the 0644 files would not be
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    for path in spool.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # A run that is killed leaves segments: they are 0600 too.
    # From a pipe left open, with a long batch timeout, the ACKs wait in the spool.
    killed = subprocess.Popen(
        [*POH, "-o", str(out), "--spool-dir", str(spool), "-t", "60"], env=child_env(), stderr=subprocess.DEVNULL,
        stdin=subprocess.PIPE, preexec_fn=lambda: os.umask(0),
    )  # fmt: skip
    assert killed.stdin is not None
    killed.stdin.write(source.read_bytes())
    killed.stdin.flush()
    assert wait_for(lambda: any(p.stat().st_size > 1000 for p in spool.glob("seg-*.wal")), 30)
    killed.kill()
    killed.wait()
    killed.stdin.close()
    segments = list(spool.glob("seg-*.wal"))
    assert segments
    for path in [*segments, spool / "spool.json", spool / "LOCK"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# -- credentials --------------------------------------------------------------------

WRONG_SECRET = "Wr0ngSecretKEY/abcdefghijklmnopqrstuvwxyz12"
URL_PASSWORD = "urlPassw0rd-XYZ"


def assert_secret_free(done: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        assert secret not in done.stdout, f"{secret!r} leaked on stdout"
        assert secret not in done.stderr, f"{secret!r} leaked on stderr:\n{done.stderr}"


@pytest.mark.parametrize("extra", [[], ["--debug"], ["--debug", "--log-level", "debug"], ["--log-format", "json"]])
def test_wrong_secret_never_printed(s3_server: S3Server, s3_bucket: str, tmp_path: Path, extra: list[str]) -> None:
    source = tmp_path / "acks.jsonl"
    write_acks(source, 10)
    env = child_env(**{**s3_server.env(), "AWS_SECRET_ACCESS_KEY": WRONG_SECRET})
    done = run(
        ["-i", str(source), "-o", f"s3://{s3_bucket}/p", "--spool-dir", str(tmp_path / "sp"), *extra], env=env
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip(), "a clear error is printed"
    assert_secret_free(done, WRONG_SECRET, WRONG_SECRET.split("/")[0])


@pytest.mark.parametrize("extra", [[], ["--debug", "--log-level", "debug"]])
def test_right_secret_never_printed(s3_server: S3Server, s3_bucket: str, tmp_path: Path, extra: list[str]) -> None:
    source = tmp_path / "acks.jsonl"
    write_acks(source, 50)
    env = child_env(**s3_server.env())
    done = run(
        ["-i", str(source), "-o", f"s3://{s3_bucket}/p", "-n", "10", "--stats-json", "-",
         "--spool-dir", str(tmp_path / "sp"), *extra],
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_secret_free(done, s3_server.secret_key)


@pytest.mark.parametrize("where", ["option", "environment"])
@pytest.mark.parametrize("extra", [[], ["--debug", "--log-level", "debug"]])
def test_credentials_in_endpoint_url_never_printed(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, where: str, extra: list[str]
) -> None:
    source = tmp_path / "acks.jsonl"
    write_acks(source, 10)
    endpoint = s3_server.endpoint.replace("http://", f"http://someuser:{URL_PASSWORD}@")
    env = child_env(**{**s3_server.env(), "AWS_SECRET_ACCESS_KEY": WRONG_SECRET})
    args = ["-i", str(source), "-o", f"s3://{s3_bucket}/p", "--spool-dir", str(tmp_path / "sp"), *extra]
    if where == "option":
        args += ["--s3-endpoint", endpoint]
    else:
        env["AWS_ENDPOINT_URL"] = endpoint
    done = run(args, env=env)
    assert done.returncode in (2, 3), done.stderr
    assert_secret_free(done, URL_PASSWORD, WRONG_SECRET)


def _unreachable_endpoint_run(tmp_path: Path, *options: str) -> list[str]:
    source = tmp_path / "acks.jsonl"
    write_acks(source, 10)
    return ["-i", str(source), "-o", "s3://bucket/p", "--s3-endpoint", f"http://u:{URL_PASSWORD}@127.0.0.1:9",
            "--debug", *options]  # fmt: skip


_UNREACHABLE_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAABCDEFGHIJKLMNOP", "AWS_SECRET_ACCESS_KEY": WRONG_SECRET, "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
}  # fmt: skip


def test_unreachable_endpoint_with_credentials_fails_fast_without_a_spool(tmp_path: Path) -> None:
    """Connection refused, endpoint with a password, --debug: the message names the endpoint, not the password."""
    done = run(_unreachable_endpoint_run(tmp_path, "--no-spool"), env=child_env(**_UNREACHABLE_ENV))
    assert done.returncode == 3, done.stderr
    assert "127.0.0.1:9" in done.stderr
    assert_secret_free(done, URL_PASSWORD, WRONG_SECRET, "AKIAABCDEFGHIJKLMNOP")


def test_unreachable_endpoint_with_credentials_retried_into_the_spool(tmp_path: Path) -> None:
    """With a spool the run waits for the endpoint, warning without the password, until stopped."""
    args = _unreachable_endpoint_run(tmp_path, "--spool-dir", str(tmp_path / "sp"), "--shutdown-timeout", "1")
    log = tmp_path / "stderr"
    env = child_env(**_UNREACHABLE_ENV)
    with log.open("wb") as stderr:
        process = subprocess.Popen([*POH, *args], stdout=subprocess.PIPE, stderr=stderr, env=env)
    try:
        assert wait_for(lambda: "retrying" in log.read_text(), 30), log.read_text()
        assert process.poll() is None, log.read_text()
        process.terminate()
        stdout, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    done = subprocess.CompletedProcess(args, process.returncode, stdout.decode(), log.read_text())
    assert done.returncode == 4, done.stderr  # interrupted, the 10 ACKs kept in the spool
    assert "starting anyway" in done.stderr
    assert "never retrieved" not in done.stderr  # a failed batch is reported once, not as asyncio noise
    assert "127.0.0.1:9" in done.stderr
    assert_secret_free(done, URL_PASSWORD, WRONG_SECRET, "AKIAABCDEFGHIJKLMNOP")
