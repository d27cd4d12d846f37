"""A throwaway PostgreSQL server on a loopback port for the suites that test the PostgreSQL path.

Skipped (with the package to install) where the server binaries or the psycopg driver are missing;
`make test` installs both on Debian/Ubuntu.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

PG_PACKAGE = "postgresql (Debian/Ubuntu: apt-get install -y postgresql)"


def pg_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


class PostgresServer:
    """A running server; ``database(name)`` creates a database and returns its SQLAlchemy URL."""

    def __init__(self, bindir: Path, port: int, as_user: list[str], root: Path) -> None:
        self.bindir, self.port, self.as_user, self.root = bindir, port, as_user, root

    def run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120, cwd=self.root)

    def database(self, name: str) -> str:
        self.run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "lorafleet", name)
        return f"postgresql+psycopg://lorafleet@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the whole run, in a temp dir; stopped and removed afterwards."""
    bindir = pg_bin()
    if bindir is None:
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) are not installed; install {PG_PACKAGE}")
    pytest.importorskip("psycopg", reason="the psycopg driver is needed: pip install 'psycopg[binary]'")
    # Not under pytest's tmp dir: that is private to our user, and the server may run as another one.
    root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    # PostgreSQL refuses to run as root: run it as the postgres user then (the package creates one).
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root and runuser is missing: cannot start PostgreSQL as another user")
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(bindir, free_port(), as_user, root)
    server.run(str(bindir / "initdb"), "-D", str(data), "-U", "lorafleet", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-h 127.0.0.1 -p {server.port} -k {sock} -c fsync=off"
    server.run(
        str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "-t", "60", "start"
    )
    try:
        yield server
    finally:
        server.run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
