"""The registry in PostgreSQL, shared by any number of msgd nodes ([registry] backend =
"postgresql"): the registry port (`port.Registrar`) and what the daemon reads of it.

Every per-UE rule that depends on registry state is decided in the database (`pg_schema`,
msgd_decide_v1), so two nodes can never disagree: the database's row locks order concurrent
changes of a UE, whichever node they come through.

* Group commit. Batches submitted on the loop queue up; one writer task sends everything
  queued (up to `max_batch` entries) as ONE statement in its own implicit transaction: one
  round trip, one commit, per group. While it is in flight the next group gathers, so the
  groups grow with the load, as the SQLite writer's do. A node has one write connection, so
  its groups commit in submission order and the batches of one caller are decided in order
  (port.Registrar).
* A success is handed over only when the statement has returned, i.e. after PostgreSQL
  committed it; the session forces synchronous_commit on (or keeps a stronger setting), so
  that is after the WAL is flushed, and on every synchronous standby the server waits for.
* PostgreSQL away: the group in flight gets STORAGE_FAILURE (its commit may or may not have
  happened: docs/scale-out.md), batches that never reached the database get SERVER_BUSY with
  a Retry after, and so does everything submitted while the writer has no connection. The
  writer reconnects by itself with back-off (a multi-host DSN with
  target_session_attrs=read-write finds a promoted standby). The node stays up.
* Deadlocks between nodes (rare: both lock their rows in UE order) and serialization
  failures are retried: the transaction rolled back, nothing was applied.

psycopg 3 drives libpq asynchronously on the event loop (docs/scale-out.md, "Driver"): no
thread, and the DSN means exactly what it means to psql.

Near 600 lines, one class: the writer, the admin reads and the status all turn on the same
connection state (available or not, since when, why). The reads (lookup, scan, count; their
own connection and lock) are the part to move out first if it grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from msgd.errors import RegistryError
from msgd.log import get_logger
from msgd.registry import pg_schema
from msgd.registry.memory_provisioning import MemoryProvisioning
from msgd.registry.port import BUSY_RETRY_MS, SUCCESS, Change, Decided, Outcome
from msgd.registry.provisioning import ProvisionedUe
from msgd.registry.store import Listener, Registration
from wire.constants import BUCKET_BITS_MAX, FailureCause
from wire.sync import FineDigests

__all__ = ["PgRegistry", "PgSettings", "redact_dsn"]

log = get_logger("msgd.registry")

STORAGE_FAILED = Outcome(FailureCause.STORAGE_FAILURE)
BUSY = Outcome(FailureCause.SERVER_BUSY, BUSY_RETRY_MS)
_FAILED = {int(cause): Outcome(cause) for cause in FailureCause}
DEADLOCK_RETRIES = 5
COUNT_REFRESH = 5.0  # seconds between refreshes of the registered count (STATUS=, gauges)
# Longest wait between reconnection attempts: a refused connection costs the database
# nothing, and every second away is a second of SERVER_BUSY for the gateways.
RECONNECT_MAX = 2.0

# %b: the arrays go in binary format. psycopg builds a text-format array in Python, element by
# element with quoting: ~7 µs per entry for the six arrays, a fifth of a node's loop (py-spy,
# bench --registry postgresql); in binary ~2.5.
_DECIDE = "SELECT entry, failure FROM msgd_decide_v1(%b, %b, %b, %b, %b, %b, %b)"


@dataclass(frozen=True)
class PgSettings:
    dsn: str
    statement_timeout: float = 5.0  # seconds; a statement running longer fails its entries
    connect_timeout: float = 5.0  # seconds per connection attempt (libpq connect_timeout)
    # Entries per transaction (one group commit). At most half of [limits] bulk_window (4096):
    # a connection whose whole window is in the group in flight stops reading until it
    # commits, so decoding and the database would take turns instead of overlapping.
    max_batch: int = 2_000
    unavailable_retry_ms: int = 1_000  # Retry after of SERVER_BUSY while the database is away
    application_name: str = "msgd"


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for logs and errors (key=value form).

    A DSN libpq cannot parse is not shown at all: it might hold a password we fail to find.
    """
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable dsn>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**params)


def _error_text(exc: BaseException) -> str:
    """One line for logs and errors: the server's primary message and SQLSTATE only. Its
    DETAIL and CONTEXT can quote row values (a profile, a UE id) and are left out; libpq's
    own messages name hosts and users, never passwords."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    sqlstate = getattr(exc, "sqlstate", None)
    if primary:
        text = f"{primary} (SQLSTATE {sqlstate})" if sqlstate else primary
    else:
        text = str(exc).split("\nDETAIL:")[0]
    return " ".join(text.split())[:300] or type(exc).__name__


class _Batch:
    """One submission: its outcomes (None where the database decides) and the callback."""

    __slots__ = ("decided", "first_seq", "gateway", "indexes", "outcomes", "sent")

    def __init__(self, gateway: str, outcomes: list[Outcome | None], indexes: list[int],
                 changes: Sequence[Change], decided: Decided, first_seq: int) -> None:
        self.gateway = gateway
        self.outcomes = outcomes
        self.indexes = indexes  # positions of the entries the database decides
        self.sent = [changes[i] for i in indexes]
        self.decided = decided
        self.first_seq = first_seq


class PgRegistry:
    """Registry service and registrar over PostgreSQL; every method runs on the loop thread
    except provisioned(), the counts and pending() (read by the metrics thread).

Over 400 lines for now: the connection's life (connect, reconnect with back-off, failover),
the grouping of batches into one function call, and the admin reads share the one write
connection's state; the admin reads are the part to move out first."""

    backend = "postgresql"

    def __init__(self, settings: PgSettings, *, max_pending_writes: int = 200_000) -> None:
        self.settings = settings
        self.dsn_shown = redact_dsn(settings.dsn)
        self.provisioning = MemoryProvisioning()
        self.max_pending_writes = max_pending_writes
        self._on_submit: Callable[[int], None] | None = None
        self._listeners: list[Listener] = []
        self._queue: deque[_Batch] = deque()
        self._pending = 0  # entries queued or in flight
        self.groups_sent = 0  # msgd_decide_v1 statements begun (tests follow the overlap)
        self._last_seq = 0  # one seq per entry sent to the database
        self._durable_seq = 0  # every entry up to it is settled
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._rconn: psycopg.AsyncConnection[Any] | None = None
        self._rlock = asyncio.Lock()
        self._wake = asyncio.Event()  # a batch was queued, or close() began
        self._closed_event = asyncio.Event()  # close() began
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._closed = False
        self._down: str | None = "not opened"
        self._down_since: float | None = time.time()
        self._registered = 0
        self._refusals = 0

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: PgSettings, *, max_pending_writes: int = 200_000) -> PgRegistry:
        """Connect once and bring the schema up to date (blocking: before the loop runs, or
        through asyncio.to_thread). Raises RegistryError naming the DSN without password."""
        registry = cls(settings, max_pending_writes=max_pending_writes)
        try:
            with psycopg.connect(settings.dsn, autocommit=True,
                                 **registry._connect_kwargs()) as conn:
                plan = pg_schema.migrate(conn)
                (count,) = conn.execute("SELECT count(*) FROM msgd_registration").fetchone() \
                    or (0,)
        except psycopg.Error as exc:
            raise RegistryError(
                f"registry {registry.dsn_shown}: {_error_text(exc)}") from None
        registry._registered = int(count)
        registry._set_up()  # reachable a moment ago: take entries until a write says not
        if plan.pending:
            log.info("registry.migrated", dsn=registry.dsn_shown, schema_from=plan.current,
                     schema_to=plan.target, migrations="; ".join(plan.describe()))
        log.info("registry.opened", backend="postgresql", dsn=registry.dsn_shown,
                 schema=plan.target, registered=count)
        return registry

    def _connect_kwargs(self) -> dict[str, Any]:
        """What the DSN leaves unsaid; a value in the DSN wins (psycopg merges kwargs over it
        only where we give them, so we give only what the DSN lacks)."""
        params = conninfo_to_dict(self.settings.dsn)
        wanted: dict[str, Any] = {
            "connect_timeout": max(1, round(self.settings.connect_timeout)),
            "application_name": self.settings.application_name,
            # A peer that vanished without closing (a failed host): the kernel gives up on
            # the connection instead of waiting minutes for TCP retransmissions.
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": max(1000, round(self.settings.statement_timeout * 2000)),
        }
        return {key: value for key, value in wanted.items() if key not in params}

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self.settings.dsn, autocommit=True, prepare_threshold=None,
            **self._connect_kwargs())
        try:
            timeout_ms = max(1, round(self.settings.statement_timeout * 1000))
            await conn.execute(f"SET statement_timeout = {timeout_ms}")
            cur = await conn.execute("SHOW synchronous_commit")
            row = await cur.fetchone()
            # A success is told only once durable: never weaker than on; remote_write and
            # remote_apply (set by the operator) are kept.
            if row is None or row[0] in ("off", "local"):
                await conn.execute("SET synchronous_commit = on")
        except BaseException:
            await conn.close()
            raise
        return conn

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer and the count refresher on `loop`."""
        if self._closed:
            raise RegistryError("registry is closed")
        self._loop = loop
        self._tasks = [loop.create_task(self._write_loop()),
                       loop.create_task(self._refresh_loop())]

    # -- the registrar (port.Registrar) -------------------------------------------------------

    def registrar(self, *, max_pending_writes: int,
                  on_submit: Callable[[int], None] | None = None) -> PgRegistry:
        """The port for the server: this object, with the server's limits."""
        self.max_pending_writes = max_pending_writes
        self._on_submit = on_submit
        return self

    def submit(self, gateway: str, changes: Sequence[Change], decided: Decided) -> None:
        """port.Registrar.submit: queue the batch for the writer's next group."""
        outcomes: list[Outcome | None] = []
        append = outcomes.append
        indexes: list[int] = []
        room = self.max_pending_writes - self._pending
        down = self._down is not None or self._closing
        busy = Outcome(FailureCause.SERVER_BUSY, self.settings.unavailable_retry_ms) \
            if down else BUSY
        for index, change in enumerate(changes):
            if room <= 0 or down:
                append(busy)
            elif change.register and change.verdict is not None:
                append(_FAILED[int(change.verdict)])
            else:
                append(None)
                indexes.append(index)
                room -= 1
        if not indexes and not self._queue:
            decided(outcomes)  # type: ignore[arg-type]  # nothing to wait for
            return
        batch = _Batch(gateway, outcomes, indexes, changes, decided, self._last_seq + 1)
        if indexes:
            self._last_seq += len(indexes)
            self._pending += len(indexes)
            if self._on_submit is not None:
                self._on_submit(self._last_seq)
        self._queue.append(batch)
        self._wake.set()

    def settle_completed(self) -> None:
        """port.Registrar.settle_completed: nothing waits here; the writer is a task on the
        loop and calls `decided` as each commit returns."""

    # -- the writer ---------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        backoff = 0.2
        while True:
            if self._conn is None and not self._closing:
                try:
                    self._conn = await self._connect()
                except (psycopg.Error, OSError) as exc:
                    self._set_down(_error_text(exc))
                    self._fail_queued(busy=True)
                    # Back off; close() ends the wait early. (Not _wake: new batches set it,
                    # and while the database is away they are answered without the writer.)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(backoff):
                            await self._closed_event.wait()
                    backoff = min(RECONNECT_MAX, backoff * 2)
                    continue
                backoff = 0.2
                self._set_up()
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._conn is None:  # closing without a connection: nothing can be sent
                self._fail_queued(busy=True)
                continue
            await self._run_groups(self._conn)

    def _take_group(self) -> list[_Batch]:
        queue = self._queue
        group = [queue.popleft()]
        size = len(group[0].indexes)
        limit = self.settings.max_batch
        while queue and size + len(queue[0].indexes) <= limit:
            batch = queue.popleft()
            group.append(batch)
            size += len(batch.indexes)
        return group

    async def _run_groups(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Decide the queued groups back to back on `conn`. Each next group's statement goes
        out before the answers of the one before are handed over (encoding and writing a
        group's answers is milliseconds of the loop, during which the database would
        otherwise wait: one node registered 49,000 UE/s without this overlap); groups still
        commit one after the other, and are handed over in order."""
        group = self._take_group()
        failures = await self._decide_group(conn, group)
        while self._queue and self._conn is conn:
            following = self._take_group()
            decided = asyncio.ensure_future(self._decide_group(conn, following))
            await asyncio.sleep(0)  # one turn: the task builds and sends its statement
            self._settle(group, failures)
            group, failures = following, await decided
        self._settle(group, failures)

    async def _decide_group(self, conn: psycopg.AsyncConnection[Any],
                            group: list[_Batch]) -> dict[int, int] | None:
        """The failures of the group's entries (entry number: cause), or None when the
        group failed as a whole; the caller hands them over (`_settle`)."""
        self.groups_sent += 1
        params = _group_params(group)
        failures: dict[int, int] | None = None
        error: str | None = None
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                cur = await conn.execute(_DECIDE, params, prepare=True)
                failures = {int(n): int(cause) for n, cause in await cur.fetchall()}
                break
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                # Rolled back as a whole: nothing applied, safe to run again.
                if attempt == DEADLOCK_RETRIES:
                    error = _error_text(exc)
                else:
                    log.info("registry.group_retried", reason=type(exc).__name__)
            except psycopg.Error as exc:
                error = _error_text(exc)
                break
        if failures is None:
            broken = conn.broken or conn.closed
            log.error("registry.group_failed", entries=len(params[0]), reason=error,
                      connection="lost" if broken else "kept")
            if broken:
                # Reconnected at once by the write loop; only a failed reconnect makes the
                # registry "unavailable" (a connection closed by an administrator or an idle
                # timeout should not turn entries away).
                self._conn = None
                with contextlib.suppress(Exception):
                    await conn.close()
        return failures

    def _settle(self, group: list[_Batch], failures: dict[int, int] | None) -> None:
        """Hand the group's outcomes over in order; failures None: the group failed."""
        number = 0  # 1-based entry number within the group, as msgd_decide_v1 counts
        first = group[0].first_seq
        last = first - 1
        for batch in group:
            outcomes = batch.outcomes
            for index in batch.indexes:
                number += 1
                if failures is None:
                    outcomes[index] = STORAGE_FAILED
                else:
                    cause = failures.get(number)
                    outcomes[index] = SUCCESS if cause is None else _FAILED[cause]
            last = batch.first_seq + len(batch.indexes) - 1 if batch.indexes else last
            self._pending -= len(batch.indexes)
        if number:
            self._durable_seq = last
        for batch in group:
            try:
                batch.decided(batch.outcomes)  # type: ignore[arg-type]
            except Exception:  # one caller's bug must not hold the others' answers
                log.exception("registry.decided_callback_failed")
        if number:
            for callback in tuple(self._listeners):
                try:
                    callback(first, last, failures is not None)
                except Exception:
                    log.exception("registry.listener_failed", listener=repr(callback))

    def _fail_queued(self, *, busy: bool) -> None:
        """Everything queued never reached the database: SERVER_BUSY (busy) or failed."""
        if not self._queue:
            return
        group = list(self._queue)
        self._queue.clear()
        retry = Outcome(FailureCause.SERVER_BUSY, self.settings.unavailable_retry_ms)
        first = group[0].first_seq
        last = first - 1
        for batch in group:
            for index in batch.indexes:
                batch.outcomes[index] = retry if busy else STORAGE_FAILED
            if batch.indexes:
                last = batch.first_seq + len(batch.indexes) - 1
            self._pending -= len(batch.indexes)
        if last >= first:
            self._durable_seq = last
        for batch in group:
            try:
                batch.decided(batch.outcomes)  # type: ignore[arg-type]
            except Exception:
                log.exception("registry.decided_callback_failed")
        if last >= first:
            for callback in tuple(self._listeners):
                with contextlib.suppress(Exception):
                    callback(first, last, False)

    def _set_down(self, reason: str) -> None:
        if self._down is None:
            self._down_since = time.time()
            log.error("registry.unavailable", dsn=self.dsn_shown, reason=reason,
                      effect="entries get SERVER_BUSY until it returns")
        elif self._down != reason:
            log.warning("registry.still_unavailable", dsn=self.dsn_shown, reason=reason)
        self._down = reason

    def _set_up(self) -> None:
        if self._down is not None:
            away = time.time() - (self._down_since or time.time())
            log.info("registry.available", dsn=self.dsn_shown, after=round(away, 1))
        self._down = None
        self._down_since = None

    # -- reads (the admin socket, STATUS=, gauges) --------------------------------------------

    async def _read_conn(self) -> psycopg.AsyncConnection[Any]:
        conn = self._rconn
        if conn is None or conn.broken or conn.closed:
            self._rconn = None
            conn = self._rconn = await self._connect()
        return conn

    async def _read(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._closed:
            raise RegistryError("registry is closed")
        async with self._rlock:
            # A read is safe to repeat: once more on a fresh connection when the one kept
            # turned out dead (the database restarted or failed over since the last read).
            for attempt in (1, 2):
                try:
                    conn = await self._read_conn()
                    cur = await conn.execute(query, params)
                    return await cur.fetchall()
                except psycopg.Error as exc:
                    if attempt == 1 and self._rconn is not None and self._rconn.broken:
                        continue
                    raise RegistryError(
                        f"registry {self.dsn_shown}: {_error_text(exc)}") from None
        raise AssertionError("unreachable")

    async def lookup(self, ue_service_id: str) -> Registration | None:
        """The committed registration of a UE, or None."""
        rows = await self._read(
            "SELECT gateway, profile FROM msgd_registration WHERE ue_service_id = %s",
            (ue_service_id,))
        if not rows:
            return None
        gateway, profile = rows[0]
        return Registration(ue_service_id, gateway, bytes(profile) if profile is not None else None)

    async def scan(self, gateway: str | None = None) -> AsyncGenerator[Registration, None]:
        """Every committed registration (of `gateway`), streamed through a server cursor."""
        if self._closed:
            raise RegistryError("registry is closed")
        query = "SELECT ue_service_id, gateway, profile FROM msgd_registration"
        params: tuple[Any, ...] = ()
        if gateway is not None:
            query += " WHERE gateway = %s"
            params = (gateway,)
        async with self._rlock:
            try:
                conn = await self._read_conn()
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("SELECT 1")  # a dead connection is replaced first
                if conn.broken:
                    conn = await self._read_conn()
                async with conn.transaction(), conn.cursor(name="msgd_scan") as cur:
                    await cur.execute(query, params)
                    while True:
                        rows = await cur.fetchmany(1000)
                        if not rows:
                            break
                        for ue, gw, profile in rows:
                            yield Registration(
                                ue, gw, bytes(profile) if profile is not None else None)
            except psycopg.Error as exc:
                raise RegistryError(
                    f"registry {self.dsn_shown}: {_error_text(exc)}") from None

    # -- wire v1.1 sync reads (docs/protocol.md §6): committed rows are the durable state ---

    async def sync_digests(self, gateway: str, bucket_bits: int) -> bytes:
        """The 2^b bucket digests of `gateway`, aggregated in the database (every node
        answers the same): bit_xor of each ue_hash's two halves per fine bucket, folded."""
        rows = await self._read(
            "SELECT sync_bucket,"
            " bit_xor(('x' || encode(substr(sync_hash, 1, 8), 'hex'))::bit(64)::bigint),"
            " bit_xor(('x' || encode(substr(sync_hash, 9, 8), 'hex'))::bit(64)::bigint)"
            " FROM msgd_registration WHERE gateway = %s GROUP BY sync_bucket", (gateway,))
        fine = FineDigests()
        mask = (1 << 64) - 1
        for bucket, high, low in rows:
            fine.table[bucket] = ((high & mask) << 64) | (low & mask)
        return fine.digests(bucket_bits)

    async def sync_list(self, gateway: str, bucket_bits: int,
                        buckets: tuple[int, ...]) -> list[tuple[str, bytes]]:
        """(UE Service ID, ue_hash) of `gateway`'s committed registrations in `buckets`."""
        per = 1 << (BUCKET_BITS_MAX - bucket_bits)
        fine = [k for b in buckets for k in range(b * per, (b + 1) * per)]
        rows = await self._read(
            "SELECT ue_service_id, sync_hash FROM msgd_registration"
            " WHERE gateway = %s AND sync_bucket = ANY(%s)", (gateway, fine))
        return [(uid, bytes(digest)) for uid, digest in rows]

    async def count(self) -> int:
        """Registered UEs now (a query; registered_count() is the cached figure)."""
        (row,) = await self._read("SELECT count(*) FROM msgd_registration")
        self._registered = int(row[0])
        return self._registered

    async def _refresh_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(RegistryError):
                await self.count()
            await asyncio.sleep(COUNT_REFRESH)  # a period, not a synchronisation

    def describe(self) -> dict[str, Any]:
        """The registry as `msgctl status` shows it."""
        since = None
        if self._down_since is not None:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._down_since))
        return {"backend": self.backend, "dsn": self.dsn_shown,
                "available": self._down is None, "problem": self._down,
                "unavailable_since": since}

    def health(self) -> str | None:
        """None while the database takes writes, else what is wrong (STATUS=)."""
        return None if self._down is None else f"database unavailable: {self._down}"

    # -- what the daemon reads (RegistryService) ----------------------------------------------

    def provisioned(self, ue_service_id: str) -> ProvisionedUe | None:
        return self.provisioning.provisioned(ue_service_id)

    def provisioned_count(self) -> int:
        return self.provisioning.provisioned_count()

    def replace_provisioning(self, rows: Iterable[ProvisionedUe]) -> int:
        return self.provisioning.replace_provisioning(rows)

    def registered_count(self) -> int:
        """Registered UEs as last counted (every COUNT_REFRESH seconds; all nodes' changes)."""
        return self._registered

    def pending(self) -> int:
        return self._pending

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def add_listener(self, callback: Listener) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    # -- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Decide what is queued (or fail it), then close the connections."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        self._closed_event.set()
        if self._tasks:
            writer = self._tasks[0]
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            for task in self._tasks[1:]:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_queued(busy=True)
        self._closed = True
        for conn in (self._conn, self._rconn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._conn = self._rconn = None
        log.info("registry.closed", dsn=self.dsn_shown)

    def close_sync(self) -> None:
        """close() for a registry never started (main's early exits): no connection is
        open before start(), so there is nothing to wait for."""
        if self._tasks and self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("close_sync() on a started registry; use await close()")
        self._closing = self._closed = True

    def __repr__(self) -> str:
        return (f"<PgRegistry {self.dsn_shown} pending={self._pending} "
                f"available={self._down is None}>")


def _group_params(group: list[_Batch]) -> tuple[Any, ...]:
    """The arrays of msgd_decide_v1 for a group, with each entry's round (pg_schema)."""
    ues: list[str] = []
    gateways: list[str] = []
    regs: list[bool] = []
    profiles: list[bytes | None] = []
    verdicts: list[int] = []
    rounds: list[int] = []
    seen: dict[str, int] = {}
    rounds_needed = 1
    for batch in group:
        gateway = batch.gateway
        for ue, register, profile, verdict in batch.sent:
            ues.append(ue)
            gateways.append(gateway)
            regs.append(register)
            profiles.append(profile)
            verdicts.append(0 if verdict is None else int(verdict))
            k = seen.get(ue, 0)
            seen[ue] = k + 1
            rounds.append(k)
            if k >= rounds_needed:
                rounds_needed = k + 1
    return (ues, gateways, regs, profiles, verdicts, rounds, rounds_needed)
