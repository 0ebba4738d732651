"""The PostgreSQL registry beyond the port contract (tests/msgd/test_registry_contract.py):
its schema and migrations, `msgctl registry migrate`, what it shows of its DSN, two
registries (two nodes) deciding the same UEs at once, and a connection lost mid-service.
A real throw-away PostgreSQL (tests/pgcluster.py); outcomes are awaited through the port's
callback, never through sleeps.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
import psycopg.sql
import pytest

from msgd.cli import main as cli
from msgd.errors import RegistryError
from msgd.registry import pg_schema
from msgd.registry.port import SUCCESS, Change, Outcome
from msgd.registry.postgres import PgRegistry, PgSettings, redact_dsn
from tests.postgres.conftest import pg_node
from wire.constants import FailureCause

STORAGE = Outcome(FailureCause.STORAGE_FAILURE)
VIA_OTHER = Outcome(FailureCause.REGISTERED_VIA_OTHER_GATEWAY)


async def decide(port: PgRegistry, gateway: str, changes: Sequence[Change]) -> list[Outcome]:
    done: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
    port.submit(gateway, changes, lambda outcomes: done.set_result(list(outcomes)))
    return await done


async def opened(dsn: str, **settings: object) -> PgRegistry:
    registry = await asyncio.to_thread(PgRegistry.open, PgSettings(dsn, **settings))
    registry.start(asyncio.get_running_loop())
    return registry


def owners(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(
            "SELECT ue_service_id, gateway FROM msgd_registration").fetchall())


# --- schema -----------------------------------------------------------------------------------


def test_schema_is_created_once_and_versioned(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        dry = pg_schema.migrate(conn, dry_run=True)
        assert (dry.current, dry.target) == (0, pg_schema.LATEST_VERSION)
        # A dry run changes nothing: not even the version table exists afterwards.
        assert pg_schema.current_version(conn) == 0
        assert conn.execute("SELECT to_regclass('msgd_schema')").fetchone() == (None,)
        applied = pg_schema.migrate(conn)
        assert [m.version for m in applied.pending] == [m.version for m in pg_schema.MIGRATIONS]
        assert pg_schema.current_version(conn) == pg_schema.LATEST_VERSION
        again = pg_schema.migrate(conn)
        assert again.pending == () and again.current == pg_schema.LATEST_VERSION


def test_a_newer_schema_is_refused_and_left_alone(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pg_schema.migrate(conn)
        conn.execute("INSERT INTO msgd_schema(version, description) VALUES (99, 'future')")
    with pytest.raises(RegistryError, match="version 99, newer than this msgd"):
        PgRegistry.open(PgSettings(pg_dsn))
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT max(version) FROM msgd_schema").fetchone() == (99,)


def test_msgctl_registry_migrate_dry_run_then_for_real(
        tmp_path: Path, pki, pg_dsn: str, capsys) -> None:
    dep = pg_node(tmp_path, pki, pg_dsn, name="a")
    argv = ["registry", "migrate", "--config", str(dep.config_path)]
    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    latest = pg_schema.LATEST_VERSION
    assert f"schema version 0 -> {latest}; would apply" in out
    assert "CREATE TABLE msgd_registration" in out
    with psycopg.connect(pg_dsn) as conn:
        assert pg_schema.current_version(conn) == 0
    assert cli.main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["current"] == 0
    assert [m["version"] for m in result["migrations"]] == list(range(1, latest + 1))
    assert cli.main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    with psycopg.connect(pg_dsn) as conn:
        assert pg_schema.current_version(conn) == pg_schema.LATEST_VERSION


def _schema_at(conn: psycopg.Connection, version: int) -> None:
    """Apply migrations 1..version by hand, as an older msgd left the database."""
    with conn.transaction():
        conn.execute(pg_schema._CREATE_VERSION_TABLE)
        for migration in pg_schema.MIGRATIONS[:version]:
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute("INSERT INTO msgd_schema(version, description) VALUES (%s, 'x')",
                         (migration.version,))


def test_migration_2_gives_existing_rows_their_sync_bucket_and_hash(pg_dsn: str) -> None:
    """A database at version 1 with registrations: migration 2 (wire v1.1 sync) computes each
    row's bucket and ue_hash as docs/protocol.md §6.1 says (wire.sync)."""
    from wire.sync import bucket_of, ue_hash

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _schema_at(conn, 1)
        rows = [("ue-1@example", "gw1", None), ("ü-2@example", "gw1", b"\x30\x00\x01\x02")]
        for row in rows:
            conn.execute("INSERT INTO msgd_registration VALUES (%s, %s, %s)", row)
        plan = pg_schema.migrate(conn)
        assert [m.version for m in plan.pending] == list(range(2, pg_schema.LATEST_VERSION + 1))
        got = dict((u, (b, bytes(h))) for u, b, h in conn.execute(
            "SELECT ue_service_id, sync_bucket, sync_hash FROM msgd_registration"))
    assert got == {u: (bucket_of(u.encode(), 12), ue_hash(u.encode(), p)) for u, _, p in rows}


# UE Service IDs that an octet conversion could get wrong: backslashes (doubled, octal- and
# hex-looking), non-ASCII, the longest (255 octets), and plain ones.
TRICKY_UES = ["a\\b", "\\", "\\\\", "\\000", "\\x41", "é\\101ü", "ü" * 127, "x" * 255,
              "ue-1@example"]


def test_migration_3_keeps_every_sync_value_and_is_inlined(pg_dsn: str) -> None:
    """Migration 3 rewrites the sync columns' functions from IMMUTABLE parts only, so that the
    planner inlines them (a row then costs two SHA-256, not two SQL-function calls): the rows
    stored under migration 2 and the rows inserted after it get the octets of wire.sync."""
    from wire.sync import bucket_of, ue_hash

    profile = b"\x30\x00\x01\x02"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _schema_at(conn, 2)
        before = [(u, "gw1", profile if n % 2 else None) for n, u in enumerate(TRICKY_UES)]
        for row in before:
            conn.execute("INSERT INTO msgd_registration VALUES (%s, %s, %s)", row)
        plan = pg_schema.migrate(conn)
        assert [m.version for m in plan.pending] == list(range(3, pg_schema.LATEST_VERSION + 1))
        renamed = [u + "/3" if len(u.encode()) < 254 else f"{n}" + "y" * 254
                   for n, u in enumerate(TRICKY_UES)]
        after = [(u, "gw2", None if n % 2 else profile) for n, u in enumerate(renamed)]
        for row in after:
            conn.execute("INSERT INTO msgd_registration VALUES (%s, %s, %s)", row)
        got = {u: (b, bytes(h)) for u, b, h in conn.execute(
            "SELECT ue_service_id, sync_bucket, sync_hash FROM msgd_registration")}
        plan_text = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN VERBOSE SELECT msgd_sync_bucket(u), msgd_sync_hash(u, NULL) "
            "FROM unnest(ARRAY['a']) AS u"))
        indexes = {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'msgd_registration'")}
    assert got == {u: (bucket_of(u.encode(), 12), ue_hash(u.encode(), p))
                   for u, _, p in before + after}
    assert "msgd_sync_" not in plan_text and "sha256" in plan_text
    assert indexes == {"msgd_registration_pkey"}


def test_migration_4_computes_the_bucket_from_one_digest(pg_dsn: str) -> None:
    """Migration 4 takes the bucket from one SHA-256 of the id instead of two: the rows stored
    before it and the rows inserted after it hold wire.sync's bucket, and the inlined bucket
    has one sha256 in its plan."""
    from wire.sync import bucket_of

    def plan_of_bucket(conn: psycopg.Connection) -> str:
        return "\n".join(r[0] for r in conn.execute(
            "EXPLAIN VERBOSE SELECT msgd_sync_bucket(u) FROM unnest(ARRAY['a']) AS u"))

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _schema_at(conn, 3)
        assert plan_of_bucket(conn).count("sha256") == 2
        for ue in TRICKY_UES:
            conn.execute("INSERT INTO msgd_registration VALUES (%s, 'gw1', NULL)", (ue,))
        plan = pg_schema.migrate(conn)
        assert [m.version for m in plan.pending] == list(range(4, pg_schema.LATEST_VERSION + 1))
        renamed = [u + "/4" if len(u.encode()) < 254 else f"{n}" + "z" * 254
                   for n, u in enumerate(TRICKY_UES)]
        for ue in renamed:
            conn.execute("INSERT INTO msgd_registration VALUES (%s, 'gw2', NULL)", (ue,))
        got = dict(conn.execute("SELECT ue_service_id, sync_bucket FROM msgd_registration"))
        recomputed = dict(conn.execute(
            "SELECT ue_service_id, msgd_sync_bucket(ue_service_id) FROM msgd_registration"))
        plan_text = plan_of_bucket(conn)
    expected = {u: bucket_of(u.encode(), 12) for u in TRICKY_UES + renamed}
    assert got == expected and recomputed == expected
    assert "msgd_sync_" not in plan_text and plan_text.count("sha256") == 1


def test_migration_5_lets_a_session_without_standard_conforming_strings_register(
        pg_dsn: str) -> None:
    """A database or role may still set standard_conforming_strings = off (an old
    application's need), and an SQL function's body is parsed in the session that runs it.
    Up to migration 4 the sync functions' backslashes made every insert of such a session fail;
    from migration 5 on it stores wire.sync's octets, the rows stored before keep theirs, and
    the functions are still inlined."""
    from wire.sync import bucket_of, ue_hash

    profile = b"\x30\x00\x01\x02"
    before = [(u, "gw1", profile if n % 2 else None) for n, u in enumerate(TRICKY_UES)]
    renamed = [u + "/5" if len(u.encode()) < 254 else f"{n}" + "w" * 254
               for n, u in enumerate(TRICKY_UES)]
    after = [(u, "gw2", None if n % 2 else profile) for n, u in enumerate(renamed)]
    insert = "INSERT INTO msgd_registration VALUES (%s, %s, %s)"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _schema_at(conn, 4)
        for row in before:
            conn.execute(insert, row)
        conn.execute("SET standard_conforming_strings = off")
        conn.execute("SET escape_string_warning = off")
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute(insert, after[0])
        plan = pg_schema.migrate(conn)
        assert [m.version for m in plan.pending] == [5]
        # The migration ran with standard strings (SET LOCAL), and left the session's own.
        assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("off",)
        for row in after:
            conn.execute(insert, row)
        got = {u: (b, bytes(h)) for u, b, h in conn.execute(
            "SELECT ue_service_id, sync_bucket, sync_hash FROM msgd_registration")}
        recomputed = {u: (b, bytes(h)) for u, b, h in conn.execute(
            "SELECT ue_service_id, msgd_sync_bucket(ue_service_id), "
            "msgd_sync_hash(ue_service_id, profile) FROM msgd_registration")}
        plan_text = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN VERBOSE SELECT msgd_sync_bucket(u), msgd_sync_hash(u, NULL) "
            "FROM unnest(ARRAY['a']) AS u"))
    expected = {u: (bucket_of(u.encode(), 12), ue_hash(u.encode(), p))
                for u, _, p in before + after}
    assert got == expected and recomputed == expected
    assert "msgd_sync_" not in plan_text and plan_text.count("sha256") == 2


def test_migration_5_recomputes_the_sync_hash_migration_2_stored_wrong(pg_dsn: str) -> None:
    """Under migration 2 a session with standard_conforming_strings off read the hash's
    '\\x..' prefix as an escape and stored a wrong sync_hash; migration 5 recomputes it."""
    from wire.sync import bucket_of, ue_hash

    rows = [(u, "gw1", b"\x30\x00" if n % 2 else None) for n, u in enumerate(TRICKY_UES)]
    expected = {u: (bucket_of(u.encode(), 12), ue_hash(u.encode(), p)) for u, _, p in rows}
    select = "SELECT ue_service_id, sync_bucket, sync_hash FROM msgd_registration"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _schema_at(conn, 2)
        conn.execute("SET standard_conforming_strings = off")
        conn.execute("SET escape_string_warning = off")
        for row in rows:
            conn.execute("INSERT INTO msgd_registration VALUES (%s, %s, %s)", row)
        stored = {u: (b, bytes(h)) for u, b, h in conn.execute(select)}
        assert all(stored[u][1] != expected[u][1] for u in stored)
        pg_schema.migrate(conn)
        got = {u: (b, bytes(h)) for u, b, h in conn.execute(select)}
    assert got == expected


async def test_a_node_on_a_database_without_standard_conforming_strings_registers(
        pg_dsn: str) -> None:
    """The same through msgd, the database's default being off: its registrations succeed and
    its digests are wire.sync's."""
    from wire.sync import digests_of

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET standard_conforming_strings = off")
                     .format(psycopg.sql.Identifier(conn.info.dbname)))
    registry = await opened(pg_dsn)
    try:
        changes = [Change(u, True, None) for u in TRICKY_UES]
        assert await decide(registry, "gw1", changes) == [SUCCESS] * len(changes)
        digests = await registry.sync_digests("gw1", 12)
    finally:
        await registry.close()
    assert digests == digests_of([(u.encode(), None) for u in TRICKY_UES], 12)


# --- what is shown of the DSN -------------------------------------------------------------------


@pytest.mark.parametrize("dsn", [
    "postgresql://msgd:s3cret-pw@db1,db2/msgd?target_session_attrs=read-write",
    "host=db1 user=msgd password=s3cret-pw dbname=msgd",
    "postgresql://msgd@db1/msgd?password=s3cret-pw",
])
def test_the_password_of_a_dsn_is_never_shown(dsn: str) -> None:
    shown = redact_dsn(dsn)
    assert "s3cret-pw" not in shown and "password=***" in shown and "msgd" in shown


def test_an_unreachable_database_is_named_without_its_password(pg_cluster) -> None:
    dsn = pg_cluster.dsn("no_such_database")
    with pytest.raises(RegistryError) as caught:
        PgRegistry.open(PgSettings(dsn))
    assert pg_cluster.password not in str(caught.value)
    assert "no_such_database" in str(caught.value)


# --- two nodes, one database --------------------------------------------------------------------


async def test_two_registries_racing_for_the_same_ues_agree_with_their_answers(
        pg_dsn: str) -> None:
    """Node A's gateway registers each UE and later de-registers it; node B's gateway
    registers the same UEs at the same time. Whatever the interleaving, each UE ends with
    the owner the answers imply: A's de-registration was REGISTERED_VIA_OTHER_GATEWAY only
    if B owns the UE, and no UE is left to A or lost in between."""
    node_a, node_b = await opened(pg_dsn), await opened(pg_dsn)
    try:
        ues = [f"race-{i:04d}" for i in range(600)]
        rng = random.Random(7)

        async def run(node: PgRegistry, gateway: str, plan: list[list[Change]]):
            answers: dict[str, list[Outcome]] = {}
            for changes in plan:
                for change, outcome in zip(changes, await decide(node, gateway, changes),
                                           strict=True):
                    answers.setdefault(change.ue_service_id, []).append(outcome)
            return answers

        def batches(changes: list[Change]) -> list[list[Change]]:
            out, i = [], 0
            while i < len(changes):
                size = rng.randrange(1, 40)
                out.append(changes[i:i + size])
                i += size
            return out

        shuffled = rng.sample(ues, len(ues))
        plan_a = batches([Change(u, True, b"a") for u in shuffled]
                         + [Change(u, False, None) for u in rng.sample(ues, len(ues))])
        plan_b = batches([Change(u, True, b"b") for u in rng.sample(ues, len(ues))])
        answers_a, answers_b = await asyncio.gather(run(node_a, "gw-a", plan_a),
                                                    run(node_b, "gw-b", plan_b))
        final = await asyncio.to_thread(owners, pg_dsn)
        for ue in ues:
            reg_a, dereg_a = answers_a[ue]
            (reg_b,) = answers_b[ue]
            assert reg_a == SUCCESS and reg_b == SUCCESS
            assert dereg_a in (SUCCESS, VIA_OTHER), (ue, dereg_a)
            assert final.get(ue) in (None, "gw-b"), (ue, final.get(ue))
            if dereg_a == VIA_OTHER:
                assert final.get(ue) == "gw-b", ue
            if final.get(ue) is None:
                assert dereg_a == SUCCESS, ue
        # Each node reads the same committed state.
        for ue in rng.sample(ues, 20):
            a, b = await node_a.lookup(ue), await node_b.lookup(ue)
            assert a == b and (a.gateway if a else None) == final.get(ue)
    finally:
        await node_a.close()
        await node_b.close()


# --- a connection lost --------------------------------------------------------------------------


async def test_a_killed_connection_fails_its_group_and_the_next_one_reconnects(
        pg_dsn: str, pg_cluster) -> None:
    registry = await opened(pg_dsn, application_name="msgd-victim")
    try:
        assert await decide(registry, "gw-a", [Change("ue-1", True, None)]) == [SUCCESS]
        killed = pg_cluster.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name = 'msgd-victim'")
        assert killed and all(row[0] for row in killed)
        # The writer finds its connection dead only when it uses it: that group fails, and
        # nothing of it was applied.
        lost = await decide(registry, "gw-a", [Change("ue-2", True, None)])
        assert lost == [STORAGE]
        # The writer reconnects by itself; the next batch is served.
        assert await decide(registry, "gw-a", [Change("ue-3", True, None)]) == [SUCCESS]
        assert registry.health() is None
        assert set(await asyncio.to_thread(owners, pg_dsn)) == {"ue-1", "ue-3"}
    finally:
        await registry.close()


async def test_the_next_group_is_sent_before_the_answers_of_the_one_before(pg_dsn: str) -> None:
    """Groups back to back (max_batch 1: a group per batch): when the first group's answers
    are handed over, the second group's statement has already gone out, and the answers
    still come in submission order, each after its own commit."""
    registry = await opened(pg_dsn, max_batch=1)
    try:
        seen: list[tuple[str, int, list[Outcome]]] = []
        done = asyncio.Event()

        def on_decided(name: str) -> Callable[[Sequence[Outcome]], None]:
            def decided(outcomes: Sequence[Outcome]) -> None:
                seen.append((name, registry.groups_sent, list(outcomes)))
                if len(seen) == 3:
                    done.set()
            return decided

        registry.submit("gw-a", [Change("ov-1", True, None)], on_decided("a"))
        registry.submit("gw-a", [Change("ov-1", False, None)], on_decided("b"))
        registry.submit("gw-a", [Change("ov-1", False, None)], on_decided("c"))
        async with asyncio.timeout(30):
            await done.wait()
        # a: its group and b's had begun; b: all three; c: the last, nothing after it.
        assert seen == [("a", 2, [SUCCESS]), ("b", 3, [SUCCESS]),
                        ("c", 3, [Outcome(FailureCause.NOT_REGISTERED)])]
        assert await asyncio.to_thread(owners, pg_dsn) == {}
    finally:
        await registry.close()


async def test_groups_stay_fast_after_the_table_was_emptied_and_vacuumed(pg_dsn: str) -> None:
    """A session's cached plans must not outlive the table's size: bulk-register, bulk
    de-register, VACUUM ANALYZE (the table looks empty), then register again on the same
    connection. With a plan cached while the table was empty, each group walked the whole
    table per UE and failed with statement_timeout as the table grew back."""
    import psycopg as pg

    registry = await opened(pg_dsn, statement_timeout=1.0)
    try:
        ues = [f"vac-{i:06d}" for i in range(30_000)]

        async def bulk(register: bool) -> None:
            for first in range(0, len(ues), 2_000):
                changes = [Change(u, register, None) for u in ues[first:first + 2_000]]
                outcomes = await decide(registry, "gw-a", changes)
                assert outcomes == [SUCCESS] * len(changes), set(outcomes)

        await bulk(True)
        await bulk(False)
        async with await pg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute("VACUUM (ANALYZE) msgd_registration")
        await bulk(True)
    finally:
        await registry.close()


async def test_a_deadlock_between_two_nodes_is_retried_and_both_groups_are_decided(
        pg_dsn: str, pg_cluster, caplog) -> None:
    """Node A de-registers X and registers Y; node B de-registers Y and registers X. Each
    locks its de-registration's row first, then both wait for a row this test holds; once it
    is released they need each other's rows: PostgreSQL aborts one of them as a deadlock,
    that group is sent again and both are decided, as if one had run before the other."""
    from tests.postgres.conftest import node_waits_on_a_lock

    dbname = pg_dsn.rsplit("/", 1)[1]
    pg_cluster.sql(f"ALTER DATABASE {dbname} SET deadlock_timeout = '100ms'")
    node_a, node_b = await opened(pg_dsn), await opened(pg_dsn)
    try:
        assert await decide(node_a, "gw-a", [Change("x-ue", True, None),
                                             Change("a-held", True, None)]) == [SUCCESS] * 2
        assert await decide(node_b, "gw-b", [Change("y-ue", True, None)]) == [SUCCESS]
        async with await psycopg.AsyncConnection.connect(pg_dsn) as holder:
            await holder.execute(
                "SELECT 1 FROM msgd_registration WHERE ue_service_id = 'a-held' FOR UPDATE")
            # "a-held" sorts first: each group's upserts start with it.
            first = asyncio.create_task(decide(node_a, "gw-a", [
                Change("x-ue", False, None), Change("a-held", True, b"a"),
                Change("y-ue", True, b"a")]))
            second = asyncio.create_task(decide(node_b, "gw-b", [
                Change("y-ue", False, None), Change("a-held", True, b"b"),
                Change("x-ue", True, b"b")]))
            await node_waits_on_a_lock(pg_dsn, count=2)
            await holder.rollback()
        a, b = await first, await second
    finally:
        await node_a.close()
        await node_b.close()
    assert any(r.getMessage() == "registry.group_retried"
               and getattr(r, "msgd_fields", {}).get("reason") == "DeadlockDetected"
               for r in caplog.records)
    final = await asyncio.to_thread(owners, pg_dsn)
    if final["a-held"] == "gw-b":  # A ran first: B's de-registration found Y taken over
        assert a == [SUCCESS] * 3 and b == [VIA_OTHER, SUCCESS, SUCCESS]
        assert final == {"a-held": "gw-b", "x-ue": "gw-b", "y-ue": "gw-a"}
    else:  # B ran first
        assert b == [SUCCESS] * 3 and a == [VIA_OTHER, SUCCESS, SUCCESS]
        assert final == {"a-held": "gw-a", "x-ue": "gw-b", "y-ue": "gw-a"}
