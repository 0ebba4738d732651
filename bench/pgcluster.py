"""A real, throw-away PostgreSQL server: Debian's `postgresql` package, run as an unprivileged
user (PostgreSQL refuses to run as root) on 127.0.0.1 and a free port, in a temporary
directory. `python -m bench --registry postgresql` runs one; so do the tests
(tests/pgcluster.py wraps this module: one cluster per session, a fresh database per test, a
primary and synchronous standby for failover).

Password authentication over TCP (the DSNs carry a password), trust on the cluster's own unix
socket directory only.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PACKAGE = "postgresql"
_databases = itertools.count(1)


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine; the message names the Debian package."""


def pg_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/NN/bin with initdb and pg_ctl; raises PostgresMissing."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if not found:
        raise PostgresMissing(
            f"PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install "
            f"the Debian package `{PACKAGE}` (apt-get install {PACKAGE}; `make test` does it "
            f"through .ci/debian-deps)")
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as() -> list[str]:
    """The prefix that runs a PostgreSQL program as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "nobody", "--"]


class PgCluster:
    """One PostgreSQL server: initdb, start, stop (any mode), promote; a DSN per database."""

    def __init__(self, root: Path, *, name: str = "primary", port: int | None = None) -> None:
        self.bin = pg_bin_dir()
        self.root = root
        self.data = root / name
        self.log = root / f"{name}.log"
        self.port = port or free_port()
        self.user = "msgd"
        self.password = secrets.token_hex(12)

    # -- lifecycle ----------------------------------------------------------------------------

    def _pg(self, program: str, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_run_as(), str(self.bin / program), *args], check=check,
                              capture_output=True, text=True, timeout=timeout)

    def init(self) -> PgCluster:
        pwfile = self.root / f"{self.data.name}.pw"
        pwfile.write_text(self.password + "\n")
        _give_away(pwfile)
        try:
            self._pg("initdb", "-D", str(self.data), "-U", self.user, "-E", "UTF8",
                     "--locale=C", "--no-sync", "--auth-local=trust",
                     "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        finally:
            pwfile.unlink()
        self.configure(
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.root}'",
            "fsync = on", "synchronous_commit = on",
            "wal_level = replica", "max_wal_senders = 4",
            "shared_buffers = 64MB", "max_connections = 60",
            "log_min_messages = warning", "log_connections = off",
        )
        (self.data / "pg_hba.conf").open("a").write(
            "host replication msgd 127.0.0.1/32 scram-sha-256\n")
        return self

    def configure(self, *lines: str) -> None:
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(lines) + "\n")

    def start(self) -> PgCluster:
        proc = self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log),
                        "-o", f"-p {self.port}", "-w", "-t", "60", "start", check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {proc.stderr}\n{self.log_text()[-2000:]}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def promote(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-w", "promote")

    @property
    def pid(self) -> int:
        """The postmaster's pid (its children are the backends and background workers)."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def running(self) -> bool:
        return self._pg("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- databases ----------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", **extra: str) -> str:
        query = "&".join(f"{key}={value}" for key, value in extra.items())
        return (f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{dbname}"
                + (f"?{query}" if query else ""))

    def create_database(self) -> str:
        """A fresh, empty database; its name."""
        import psycopg

        name = f"t{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def sql(self, query: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchall() if cur.description else []

    # -- a synchronous standby ----------------------------------------------------------------

    def standby_of(self, primary: PgCluster, *, name: str = "standby") -> PgCluster:
        """pg_basebackup of `primary` into this cluster's data directory, started as a
        streaming standby named `name` (its application_name for synchronous_standby_names)."""
        self.user, self.password = primary.user, primary.password
        env_pw = self.root / f"{name}.pgpass"
        env_pw.write_text(f"127.0.0.1:{primary.port}:*:{primary.user}:{primary.password}\n")
        env_pw.chmod(0o600)
        _give_away(env_pw)
        subprocess.run(
            [*_run_as(), "env", f"PGPASSFILE={env_pw}", str(self.bin / "pg_basebackup"),
             "-h", "127.0.0.1", "-p", str(primary.port), "-U", primary.user,
             "-D", str(self.data), "-X", "stream", "-R", "--no-sync", "--checkpoint=fast",
             "-d", f"application_name={name}"],
            check=True, capture_output=True, text=True, timeout=120)
        # -R wrote primary_conninfo into postgresql.auto.conf, which wins over
        # postgresql.conf: ours goes there too, after it, with the pgpass file and our name.
        with (self.data / "postgresql.auto.conf").open("a") as auto:
            auto.write(f"primary_conninfo = 'host=127.0.0.1 port={primary.port} "
                       f"user={primary.user} passfile={env_pw} application_name={name}'\n")
        return self


def _give_away(path: Path) -> None:
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)


def cluster_root() -> Path:
    """A temporary directory the unprivileged user owns (pytest's tmp_path is root's, 0700)."""
    root = Path(tempfile.mkdtemp(prefix="msgd-pg-"))
    _give_away(root)
    return root


@contextlib.contextmanager
def running_cluster(*settings: str) -> Iterator[PgCluster]:
    """A started cluster (with extra postgresql.conf `settings`), removed afterwards."""
    root = cluster_root()
    cluster = PgCluster(root)
    try:
        cluster.init()
        if settings:
            cluster.configure(*settings)
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
