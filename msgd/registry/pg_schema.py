"""The registry's schema in PostgreSQL: versioned migrations that msgd applies itself.

Like the SQLite file (`schema`), the database carries the version of its schema
(`msgd_schema`, one row per migration applied) and msgd brings it up to date at start, or
`msgctl registry migrate [--dry-run]` does it ahead of an upgrade. Every migration runs in one
transaction under a transaction-level advisory lock, so nodes starting together apply it once
and a failed migration leaves the schema as it was (PostgreSQL's DDL is transactional). A
database whose schema is newer than this msgd knows is refused, never touched.

The per-UE rules of wire-v1 §5 that depend on registry state run in the database, one call of
`msgd_decide_v1` per group of batches (docs/scale-out.md, "One round trip per batch"):

* Rows are decided in "rounds": entry i of a group is in round k when its UE occurs k times
  before it in the group. Within a round every UE occurs once, so one set-based statement
  decides and applies it (an INSERT ... ON CONFLICT may not touch a row twice), and the
  rounds run in order, each seeing the ones before (a new snapshot per statement in
  PL/pgSQL under READ COMMITTED). Almost every group has one round.
* A de-registration decides on who owns the UE now, so the rows of the group's
  de-registrations are locked first (FOR UPDATE, in UE order, so two nodes take them in the
  same order): between that lock and the change, no other node can take the UE over or
  remove it. A registration does not depend on the current owner (it always takes over), so
  it needs no lock beyond the row lock of its own upsert.
* Only failures come back (entry number, cause): success is the common case and costs no
  result row.
* The function is planned at every call (plan_cache_mode): see its definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from msgd.errors import RegistryError
from wire.constants import FailureCause

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "Migration",
    "MigrationPlan",
    "SchemaTooNewError",
    "current_version",
    "migrate",
    "plan_migration",
]

# Any constant of our own: every node serialises its migrations on it.
MIGRATION_LOCK = 0x6D736764_0001  # "msgd", 1


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


_DECIDE_V1 = f"""
CREATE FUNCTION msgd_decide_v1(
    p_ues text[], p_gateways text[], p_regs boolean[], p_profiles bytea[],
    p_verdicts smallint[], p_rounds integer[], p_round_count integer)
RETURNS TABLE (entry bigint, failure smallint)
LANGUAGE plpgsql
-- Planned at every call, with the table's current size: PL/pgSQL otherwise caches one
-- generic plan per session, and one made while the table was empty (a bulk de-registration,
-- then VACUUM) walked the whole primary key for every later group; as the table grew back,
-- each call took seconds and hit statement_timeout (bench, two nodes, 200,000 UEs).
-- Planning costs about a millisecond per call, well under a microsecond per entry.
SET plan_cache_mode = force_custom_plan
AS $fn$
DECLARE
    k integer;
BEGIN
    -- A de-registration decides on the current owner: hold those rows until commit.
    PERFORM 1 FROM msgd_registration AS r
     WHERE r.ue_service_id = ANY (
           SELECT x.ue FROM unnest(p_ues, p_regs) AS x(ue, reg) WHERE NOT x.reg)
     ORDER BY r.ue_service_id
       FOR UPDATE;
    FOR k IN 0 .. p_round_count - 1 LOOP
        RETURN QUERY
        WITH input AS (
            SELECT x.ue, x.gw, x.reg, x.profile, x.verdict, x.n
              FROM unnest(p_ues, p_gateways, p_regs, p_profiles, p_verdicts, p_rounds)
                   WITH ORDINALITY AS x(ue, gw, reg, profile, verdict, rnd, n)
             WHERE x.rnd = k
        ), deregistrations AS (
            -- Only a de-registration depends on the current owner: a registration always
            -- takes over, so it costs no lookup here.
            SELECT i.ue, i.n,
                   CASE
                     WHEN cur.gateway IS NULL THEN {int(FailureCause.NOT_REGISTERED)}::smallint
                     WHEN cur.gateway <> i.gw
                       THEN {int(FailureCause.REGISTERED_VIA_OTHER_GATEWAY)}::smallint
                     ELSE nullif(i.verdict, 0)
                   END AS cause
              FROM input AS i
              LEFT JOIN msgd_registration AS cur ON cur.ue_service_id = i.ue
             WHERE NOT i.reg
        ), upserted AS (
            INSERT INTO msgd_registration AS r (ue_service_id, gateway, profile)
            SELECT i.ue, i.gw, i.profile FROM input AS i
             WHERE i.reg AND i.verdict = 0
             ORDER BY i.ue
            ON CONFLICT (ue_service_id)
            DO UPDATE SET gateway = excluded.gateway, profile = excluded.profile
        ), removed AS (
            DELETE FROM msgd_registration AS r
             USING deregistrations AS d
             WHERE d.cause IS NULL AND r.ue_service_id = d.ue
        )
        SELECT i.n, i.verdict FROM input AS i WHERE i.reg AND i.verdict <> 0
        UNION ALL
        SELECT d.n, d.cause FROM deregistrations AS d WHERE d.cause IS NOT NULL;
    END LOOP;
END
$fn$
"""

# wire v1.1 sync (docs/protocol.md §6.1), in SQL: the bucket (b = 12) and ue_hash of a row,
# kept as stored generated columns, so that every node reads the same digests from committed
# rows, and a DIGEST REQUEST is one aggregate over the gateway's rows (bit_xor, PostgreSQL
# 14+). Declared IMMUTABLE: they depend on nothing but their arguments (convert_to to UTF-8 is
# fixed for a UTF-8 database, which msgd's UE Service IDs need anyway).
_SYNC_FUNCTIONS = (
    r"""CREATE FUNCTION msgd_sync_bucket(p_ue text) RETURNS smallint
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT (((get_byte(d, 0) << 8) | get_byte(d, 1)) >> 4)::smallint
          FROM (SELECT sha256(convert_to(p_ue, 'UTF8')) AS d) AS s $$""",
    r"""CREATE FUNCTION msgd_sync_hash(p_ue text, p_profile bytea) RETURNS bytea
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT substr(sha256('\x4d5347696e35472d53594e432f3100'::bytea
                             || substr(int2send(octet_length(u)::int2), 2, 1) || u
                             || coalesce('\x03'::bytea || int2send(octet_length(p_profile)::int2)
                                         || p_profile, ''::bytea)), 1, 16)
          FROM (SELECT convert_to(p_ue, 'UTF8') AS u) AS s $$""",
)

# Migration 3: the same two functions, written so that PostgreSQL inlines them into the
# generated columns' expressions. convert_to() is STABLE, and an IMMUTABLE SQL function whose
# body calls a STABLE one is never inlined: each row paid two calls through the SQL-function
# executor, ~3 µs each, which halved the rows a node's group commit could insert (measured on
# the development machine: 20.3 µs per registration in msgd_decide_v1 against 9.7 without the
# columns). decode(replace(p_ue, '\', '\\'), 'escape') is the text's own octets (UTF-8: the
# database's encoding, which msgd needs) from IMMUTABLE functions only: the escape format
# copies every octet but a backslash, which is doubled first. The values are the same octet
# for octet (tests/postgres/test_pg_schema.py), so the stored columns stay valid.
_SYNC_FUNCTIONS_INLINED = (
    r"""CREATE OR REPLACE FUNCTION msgd_sync_bucket(p_ue text) RETURNS smallint
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT ((get_byte(sha256(decode(replace(p_ue, '\', '\\'), 'escape')), 0) << 4)
                | (get_byte(sha256(decode(replace(p_ue, '\', '\\'), 'escape')), 1) >> 4)
               )::smallint $$""",
    r"""CREATE OR REPLACE FUNCTION msgd_sync_hash(p_ue text, p_profile bytea) RETURNS bytea
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT substr(sha256('\x4d5347696e35472d53594e432f3100'::bytea
                             || substr(int2send(octet_length(p_ue)::int2), 2, 1)
                             || decode(replace(p_ue, '\', '\\'), 'escape')
                             || coalesce('\x03'::bytea || int2send(octet_length(p_profile)::int2)
                                         || p_profile, ''::bytea)), 1, 16) $$""",
)

# Migration 4: the bucket from one SHA-256. PostgreSQL does not share a subexpression, so the
# bucket of migration 3, a get_byte of each of the digest's first two octets, computed the
# digest twice: ~0.9 µs of a registration's ~10 in the database (measured on the development
# machine, 400,000 upserts in groups of 2,000, backend CPU). Its first three hex digits are
# the same twelve bits, from IMMUTABLE parts only, so it is still inlined; the values are the
# same, and the stored column stays valid.
_SYNC_BUCKET_ONE_DIGEST = \
    r"""CREATE OR REPLACE FUNCTION msgd_sync_bucket(p_ue text) RETURNS smallint
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT ('x' || left(encode(substr(sha256(decode(replace(p_ue, '\', '\\'), 'escape')),
                                          1, 2), 'hex'), 3))::bit(12)::integer::smallint $$"""

# Migration 5: the same functions with no backslash in them. An SQL function's body is parsed
# in the session that runs it, and a role or database may still set standard_conforming_strings
# = off (an old application's need): '\x..' and '\' then read as escapes. Under migrations
# 3 and 4 inlining the bucket failed with a syntax error, so such a session could insert no
# registration at all; under migration 2 its inserts succeeded with a wrong sync_hash, which no
# later migration recomputed. decode(hex) and chr(92) mean the same in either setting, are
# IMMUTABLE (still inlined) and fold to constants; the values are wire.sync's. The UPDATE
# recomputes the stored columns of the rows that differ (a scan of the table: two SHA-256 per
# row, once).
_BACKSLASH_DOUBLED = "replace(p_ue, chr(92), chr(92) || chr(92))"
_SYNC_FUNCTIONS_ANY_QUOTING = (
    f"""CREATE OR REPLACE FUNCTION msgd_sync_bucket(p_ue text) RETURNS smallint
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT ('x' || left(encode(substr(sha256(decode({_BACKSLASH_DOUBLED}, 'escape')),
                                          1, 2), 'hex'), 3))::bit(12)::integer::smallint $$""",
    f"""CREATE OR REPLACE FUNCTION msgd_sync_hash(p_ue text, p_profile bytea) RETURNS bytea
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT substr(sha256(decode('4d5347696e35472d53594e432f3100', 'hex')
                             || substr(int2send(octet_length(p_ue)::int2), 2, 1)
                             || decode({_BACKSLASH_DOUBLED}, 'escape')
                             || coalesce(decode('03', 'hex')
                                         || int2send(octet_length(p_profile)::int2)
                                         || p_profile, ''::bytea)), 1, 16) $$""",
    # Any UPDATE of a row computes its stored generated columns again.
    """UPDATE msgd_registration SET profile = profile
        WHERE sync_bucket IS DISTINCT FROM msgd_sync_bucket(ue_service_id)
           OR sync_hash IS DISTINCT FROM msgd_sync_hash(ue_service_id, profile)""",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "registrations and the batch decision function", (
        # COLLATE "C": UE Service IDs compare as octets, as the wire and the SQLite registry
        # do, and the index avoids locale-aware comparisons on the hot path.
        """CREATE TABLE msgd_registration (
            ue_service_id text COLLATE "C" PRIMARY KEY,
            gateway text NOT NULL,
            profile bytea
        )""",
        "CREATE INDEX msgd_registration_gateway ON msgd_registration (gateway)",
        _DECIDE_V1,
    )),
    Migration(2, "wire v1.1 sync: bucket and ue_hash of each registration", (
        *_SYNC_FUNCTIONS,
        """ALTER TABLE msgd_registration
             ADD COLUMN sync_bucket smallint
                 GENERATED ALWAYS AS (msgd_sync_bucket(ue_service_id)) STORED,
             ADD COLUMN sync_hash bytea
                 GENERATED ALWAYS AS (msgd_sync_hash(ue_service_id, profile)) STORED""",
        "CREATE INDEX msgd_registration_sync ON msgd_registration (gateway, sync_bucket)",
    )),
    Migration(3, "sync columns computed inline; no index but the primary key", (
        *_SYNC_FUNCTIONS_INLINED,
        # Each secondary index is a random insertion per registration: at 1,000,000 rows the
        # (gateway, sync_bucket) one alone took msgd_decide_v1 from 15.3 to 21.4 µs per
        # registration. What they served is rare and stays well under a second without them
        # (same 1,000,000 rows: a DIGEST 300 ms either way, a LIST of 10 buckets 73 ms
        # instead of 2; an admin listing by gateway is a scan): docs/scale-out.md, "Schema".
        "DROP INDEX msgd_registration_gateway",
        "DROP INDEX msgd_registration_sync",
    )),
    Migration(4, "sync bucket from one SHA-256", (_SYNC_BUCKET_ONE_DIGEST,)),
    Migration(5, "sync functions without backslashes (any standard_conforming_strings); "
                 "wrong sync columns recomputed",
              _SYNC_FUNCTIONS_ANY_QUOTING),
)
LATEST_VERSION = MIGRATIONS[-1].version

_CREATE_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS msgd_schema (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class SchemaTooNewError(RegistryError):
    """The database's schema is newer than this msgd: it is left alone."""


@dataclass(frozen=True)
class MigrationPlan:
    current: int  # 0: no msgd schema yet
    pending: tuple[Migration, ...]

    @property
    def target(self) -> int:
        return self.pending[-1].version if self.pending else self.current

    def describe(self) -> list[str]:
        """One line per migration to apply (for --dry-run and the log)."""
        return [f"{m.version}: {m.description}" for m in self.pending]

    def statements(self) -> list[str]:
        return [s for m in self.pending for s in m.statements]


def plan_migration(current: int) -> MigrationPlan:
    """What brings a schema at `current` to LATEST_VERSION; raises SchemaTooNewError."""
    if current > LATEST_VERSION:
        raise SchemaTooNewError(
            f"the database's msgd schema is version {current}, newer than this msgd knows "
            f"({LATEST_VERSION}): upgrade msgd, the schema is left as it is")
    return MigrationPlan(current, tuple(m for m in MIGRATIONS if m.version > current))


def current_version(conn: Any) -> int:
    """The schema version of the database behind `conn` (a psycopg Connection); 0: none."""
    row = conn.execute("SELECT to_regclass('msgd_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM msgd_schema").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: Any, *, dry_run: bool = False) -> MigrationPlan:
    """Bring the schema up to date in one transaction (or, dry_run, only say what would be
    done). `conn` is a psycopg Connection in autocommit mode. Returns the plan.

    Blocking: msgd runs it before its event loop starts, msgctl on its own.
    """
    if dry_run:
        return plan_migration(current_version(conn))
    with conn.transaction():
        # Nodes starting together: the second waits here and then finds nothing to do.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        # The statements are written for standard strings, and a CREATE FUNCTION parses its
        # body in this session: a database whose default is off must not change them.
        conn.execute("SET LOCAL standard_conforming_strings = on")
        conn.execute(_CREATE_VERSION_TABLE)
        plan = plan_migration(current_version(conn))
        for migration in plan.pending:
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO msgd_schema(version, description) VALUES (%s, %s)",
                (migration.version, migration.description))
    return plan
