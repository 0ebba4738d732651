"""Fixtures of the PostgreSQL tests: a PKI, and msgd nodes sharing one throw-away database
(tests/pgcluster.py, the `pg_cluster` and `pg_dsn` fixtures of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ChildServer, Deployment, Gw, make_deployment
from tests.pki import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), gateways=("gw1.example", "gw2.example"))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for control sockets (sun_path holds 107 octets)."""
    path = Path(tempfile.mkdtemp(prefix="msgd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pg_node(tmp: Path, pki: Pki, dsn: str, *, name: str, control: Path | None = None,
            ues: dict[str, list[str]] | None = None, like: Deployment | None = None,
            limits: dict[str, object] | None = None, registry_extra: str = "",
            metrics: bool = False) -> Deployment:
    """A deployment whose [registry] is PostgreSQL at `dsn`. `like`: the same provisioning
    file (and keys) as another node, as an operator gives every node the same CSV."""
    extra = f'[control]\nsocket = "{control}"\n' if control is not None else ""
    if metrics:
        extra += '[metrics]\nlisten = "127.0.0.1:0"\n'
    dep = make_deployment(tmp / name, pki, ues=None if like else ues,
                          gateways=(Gw("gw1.example"), Gw("gw2.example")), limits=limits,
                          extra=extra)
    text = dep.config_path.read_text()
    text = text.replace('[registry]\npath = "registry.sqlite"\n',
                        f'[registry]\nbackend = "postgresql"\ndsn = "{dsn}"\n{registry_extra}')
    text = re.sub(r'(?m)^node_name = ".*"$', f'node_name = "{name}"', text)
    dep.config_path.write_text(text)
    if like is not None:
        shutil.copy(like.dir / "ues.csv", dep.dir / "ues.csv")
        dep.keys = like.keys
    return dep


def start_node(dep: Deployment) -> ChildServer:
    child = ChildServer(dep, provisioning_index=False)
    child.start()
    return child


async def node_waits_on_a_lock(dsn: str, timeout: float = 30.0, count: int = 1) -> None:
    """Until `count` msgd connections wait on a row lock in the database (a test holds it, so
    that a crash or kill is sure to find a group of the node in flight)."""
    import psycopg

    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'msgd' "
                "AND wait_event_type = 'Lock'")
            row = await cur.fetchone()
            if row and row[0] >= count:
                return
            assert time.monotonic() < deadline, "no msgd connection waits on the lock"
            await asyncio.sleep(0.02)  # polling the database for a condition, bounded
