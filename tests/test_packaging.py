"""The wheel and sdist build with ``python -m build`` and install in a fresh virtual environment."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from poh_batcher import __version__

ROOT = Path(__file__).resolve().parents[1]
ACK = '{"id":"a%d","timestamp":"2024-05-01T12:00:00Z","signature":"sig","pubkey":"key"}'


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheel and sdist, built once from the work tree (no isolation: hatchling is a test dependency)."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def _junk(name: str) -> bool:
    parts = name.split("/")
    return (
        "__pycache__" in parts
        or name.endswith((".pyc", ".pyo"))
        or any(part in (".pytest_cache", ".mypy_cache", ".ruff_cache", ".venv", ".hypothesis") for part in parts)
    )


def test_wheel_holds_the_package_and_nothing_else(dist: Path) -> None:
    wheel = _one(dist, "poh_batcher-*-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "poh_batcher/__init__.py" in names
    assert "poh_batcher/py.typed" in names
    assert "poh_batcher/cli.py" in names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n or n.startswith(("bench/", "examples/"))]
    assert not [n for n in names if _junk(n)]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    for requirement in ("zstandard", "rich", "prometheus-client"):
        assert f"Requires-Dist: {requirement}" in text
    assert "Provides-Extra: all" in text
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "poh-batcher = poh_batcher.cli:main" in entry_points


def test_sdist_holds_sources_without_caches(dist: Path) -> None:
    sdist = _one(dist, "poh_batcher-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    for needed in ("pyproject.toml", "README.md", "LICENSE", "src/poh_batcher/__init__.py"):
        assert needed in names
    assert not [n for n in names if _junk(n)]


def test_wheel_installs_in_a_fresh_venv_and_runs(dist: Path, tmp_path: Path) -> None:
    """A fresh venv, the wheel with its dependencies (from the configured index), then the command."""
    wheel = _one(dist, "poh_batcher-*-py3-none-any.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean_env["XDG_STATE_HOME"] = str(tmp_path / "state")

    def in_venv(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run from outside the work tree, with nothing of this environment on the path."""
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, cwd=tmp_path, env=clean_env, timeout=60, check=False
        )

    version = in_venv(str(env_dir / "bin" / "poh-batcher"), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"poh-batcher {__version__}"
    # It imports from the venv, not from the work tree, and archives with zstd.
    where = in_venv(str(python), "-c", "import poh_batcher; print(poh_batcher.__file__)")
    assert where.returncode == 0, where.stderr
    assert str(env_dir) in where.stdout
    run = in_venv(
        str(env_dir / "bin" / "poh-batcher"), "-o", str(tmp_path / "out"), "--quiet",
        stdin="".join(ACK % i + "\n" for i in range(10)),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    stored = [p.name for p in (tmp_path / "out").rglob("ack_batch_*")]
    assert len(stored) == 1
    assert stored[0].endswith(".json.zst")
