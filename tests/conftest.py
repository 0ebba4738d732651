from __future__ import annotations

import logging

import pytest

from msgd.log import setup_logging
from tests.ops import secret_scan


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path machinery: the scan logs under it
def pytest_configure(config):
    # The daemon's own log format, so captured logs show event fields (and the secret
    # scan of issue 5 sees exactly what operators would).
    setup_logging("debug")
    logging.getLogger("wire.session").setLevel(logging.INFO)
    secret_scan.install(config)


def pytest_sessionfinish(session, exitstatus):
    # After every test of the run: no key, proof or nonce in any msgd log (fails the run).
    secret_scan.finish(session)


@pytest.fixture(scope="session")
def pg_cluster():
    """One throw-away PostgreSQL for the session, started by the first test that needs it
    (tests/pgcluster.py); fails, naming the Debian package, where there is none."""
    from tests.pgcluster import running_cluster

    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_dsn(pg_cluster) -> str:
    """The DSN (with its password) of a fresh, empty database for this test."""
    return pg_cluster.dsn(pg_cluster.create_database())
