"""The tests' throw-away PostgreSQL (bench/pgcluster.py, shared with the benchmark): where
there is none, a test FAILS naming the Debian package (never skips), and every password a
cluster is given goes to the secret scan (tests/ops/secret_scan.py), which fails the run if
msgd ever logs it.

One cluster serves a whole test session (tests/conftest.py, fixture `pg_cluster`); each test
gets a fresh database in it (`pg_dsn`). The failover test builds its own primary and
synchronous standby (`PgCluster.standby_of`), the database-away test a cluster of its own.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import pgcluster
from bench.pgcluster import PostgresMissing, cluster_root
from tests.harness import SECRETS

__all__ = ["PgCluster", "cluster_root", "running_cluster"]


class PgCluster(pgcluster.PgCluster):
    """bench's PgCluster, failing the test where PostgreSQL is not installed."""

    def __init__(self, root: Path, *, name: str = "primary", port: int | None = None) -> None:
        try:
            super().__init__(root, name=name, port=port)
        except PostgresMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        SECRETS.add(self.password.encode())


@contextlib.contextmanager
def running_cluster() -> Iterator[PgCluster]:
    root = cluster_root()
    cluster = PgCluster(root)
    try:
        cluster.init().start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
