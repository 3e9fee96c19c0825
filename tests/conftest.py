"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from s3server import S3Server, S3ServerError, running_s3_server

# -- S3: a real SeaweedFS server on loopback (tests/s3server.py) -----------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS ``weed mini`` for the session: ``endpoint``, ``access_key``, ``secret_key``,
    ``region``, ``create_bucket()``, ``client()`` (boto3) and ``env()``.

    It never skips: if the server cannot start, every test using it fails with its log.
    Do not stop or restart it in a test; start your own ``S3Server`` for outages.
    """
    try:
        with running_s3_server() as server:
            yield server
    except S3ServerError as exc:
        pytest.fail(f"the S3 test server (SeaweedFS) could not start:\n{exc}", pytrace=False)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return s3_server.create_bucket()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """AWS_* variables pointing at the test server, set for one test only (restored afterwards)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
