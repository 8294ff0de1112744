"""A real PostgreSQL server for the shared job store's tests (Debian's ``postgresql`` package).

One server per test session, started from a fresh ``initdb`` in a temporary directory on a free
port (nothing else on the machine is touched), and a new database per test, so that each test sees
an empty store and ids from 1 as a new installation would. As root (CI), the server runs as the
``postgres`` user: PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

SERVER_USER = "postgres"  # the OS user and the database superuser
SERVER_PASSWORD = "job-store-test-pw"  # over TCP the server asks for it (SCRAM), as a real one would
START_TIMEOUT_S = 30.0


def postgres_bin_dir() -> Path | None:
    """The newest installed server's programs (/usr/lib/postgresql/<major>/bin), or $DICOM_NODE_TEST_PG_BIN."""
    if os.environ.get("DICOM_NODE_TEST_PG_BIN"):
        return Path(os.environ["DICOM_NODE_TEST_PG_BIN"])
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command


@dataclass
class PostgresServer:
    port: int
    root: Path  # data directory, sockets and the server's log below it
    password: str = SERVER_PASSWORD  # the superuser's

    def url(self, dbname: str = "postgres", password: str | None = SERVER_PASSWORD) -> str:
        """A URL as an administrator would write it; ``password`` None: none in it (libpq's
        environment, PGPASSWORD, must then give it)."""
        user = SERVER_USER if password is None else f"{SERVER_USER}:{password}"
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        """A superuser connection in autocommit (CREATE DATABASE, looking behind a store's back)."""
        return psycopg.connect(self.url(dbname), autocommit=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None or not (bin_dir / "postgres").is_file():
        pytest.fail("the job store tests need a PostgreSQL server: scripts/setup.sh --test installs Debian's "
                    "postgresql (or set DICOM_NODE_TEST_PG_BIN to a directory with initdb, postgres, pg_ctl)",
                    pytrace=False)
    # Not pytest's tmp_path: its directories are private to the user running the tests.
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        for path in (root, sockets):
            shutil.chown(path, SERVER_USER, SERVER_USER)
    server = PostgresServer(port=free_port(), root=root)
    log_path = root / "server.log"
    password_file = root / "password"
    password_file.write_text(SERVER_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(password_file, SERVER_USER, SERVER_USER)
    process: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", SERVER_USER,
                                        "--auth-local=trust", "--auth-host=scram-sha-256",
                                        f"--pwfile={password_file}", "-E", "UTF8", "--no-locale", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        with open(log_path, "wb") as log:
            # fsync off: a test never outlives the server, and a commit is still one for other connections
            process = subprocess.Popen(
                _as_server_user([str(bin_dir / "postgres"), "-D", str(data), "-p", str(server.port),
                                 "-k", str(sockets), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                 "-c", "full_page_writes=off", "-c", "max_connections=200"]),
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                server.admin().close()
                break
            except psycopg.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"PostgreSQL did not start on port {server.port}:\n{log_path.read_text()[-3000:]}",
                                pytrace=False)
                time.sleep(0.1)
        yield server
    finally:
        if process is not None:
            subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"]),
                           capture_output=True, timeout=60)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(root, ignore_errors=True)


_database_numbers = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database of the session's server (left for the server's end to remove:
    dropping one waits for every connection a test left open)."""
    name = f"test_{next(_database_numbers)}"
    with postgres_server.admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return postgres_server.url(name)
