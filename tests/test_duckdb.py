"""DuckDB reads the archive the command writes, as it is: the README's query, run for real.

DuckDB picks the compression from the file extension (``.zst``, ``.gz``) and
detects that each file is one JSON array of records, so no option is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

duckdb = pytest.importorskip("duckdb")

DATA = Path(__file__).parent / "data" / "acks_10k.jsonl"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("duck") / "batches"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("POH_BATCHER_")}
    lines = DATA.read_bytes().splitlines()
    for codec, part in (("zstd", lines[:7000]), ("gzip", lines[7000:9000]), ("none", lines[9000:])):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "poh_batcher.cli",
                "-n",
                "1000",
                "--no-spool",
                "--compression",
                codec,
                "-o",
                str(root),
            ],
            input=b"\n".join(part) + b"\n",
            env=environment,
            capture_output=True,
            check=True,
            timeout=120,
        )
    return root


def test_readme_query_over_zstd_batches(archive: Path) -> None:
    query = f"SELECT count(*), min(timestamp) FROM read_json('{archive}/**/*.json.zst')"
    ((count, first),) = duckdb.sql(query).fetchall()
    assert count == 7000
    assert first == datetime(2025, 1, 1, 0, 0, 0, 8, tzinfo=UTC)


def test_fields_and_types(archive: Path) -> None:
    relation = duckdb.sql(f"SELECT * FROM read_json('{archive}/**/*.json.zst')")
    assert dict(zip(relation.columns, map(str, relation.types), strict=True)) == {
        "id": "VARCHAR",
        "timestamp": "TIMESTAMP WITH TIME ZONE",
        "signature": "VARCHAR",
        "pubkey": "VARCHAR",
    }
    expected = json.loads(DATA.read_bytes().splitlines()[0])
    row = duckdb.sql(
        f"SELECT id, signature, pubkey FROM read_json('{archive}/**/*.json.zst') WHERE id = '{expected['id']}'"
    ).fetchall()
    assert row == [(expected["id"], expected["signature"], expected["pubkey"])]


def test_every_codec_with_one_glob_and_explicit_options(archive: Path) -> None:
    (everything,) = duckdb.sql(
        f"SELECT count(*), count(DISTINCT id), max(timestamp) FROM read_json('{archive}/**/ack_batch_*.json*')"
    ).fetchall()
    assert everything[:2] == (10_000, 10_000)
    assert everything[2] == datetime.fromisoformat(json.loads(DATA.read_bytes().splitlines()[-1])["timestamp"])
    explicit = duckdb.sql(
        f"SELECT count(*) FROM read_json('{archive}/**/*.json.gz', format='array', compression='gzip')"
    ).fetchall()
    assert explicit == [(2000,)]
