"""The admin control socket (`[control] socket`): what `msgctl status|gateways|...` talks to.

Transport: a unix stream socket. Access is checked twice: the socket file is created 0600
(owner: the daemon's user; under systemd it sits in RuntimeDirectory /run/msgd, 0700), and
every connection's peer credentials (SO_PEERCRED) must be root or the daemon's own uid; any
other peer gets one error line and is disconnected.

Protocol: line-delimited JSON, UTF-8, one request at a time per connection, any number of
requests per connection. A request is one object with "cmd" and the command's parameters:

    {"cmd": "registry.show", "ue": "ue-0001@gw1.example"}

and is answered by one line, {"ok": true, "result": {...}} or {"ok": false, "error": "..."}.
`registry.list` streams: one {"item": {...}} line per registration, then the final
{"ok": true, "result": {"count": N}} line. Commands:

    status                               daemon, listener, registry (with the number of admin
                                         changes kept over the provisioning file),
                                         certificates, last reload
    gateways                             configured and connected gateways (since, entries)
    registry.count                       registered / provisioned / pending counts
    registry.show     {"ue"}             one UE's registration and provisioning (never its key)
    registry.list     {"gateway"?, "limit"?}
    registry.compact                     fold the journal into the snapshot now (online
                                         compaction); answers when done, with what it did
    provision.import  {"rows": [{"ue_service_id", "key": hex, "gateways": [...]}]}
                                         all rows in one transaction, or none of them
    provision.remove  {"ue"}
    provision.forget  {"ues": [...]} | {"all": true}
                                         drop admin changes: the provisioning file decides
                                         for those UEs again from the next reload
    drain                                GOODBYE to every gateway, stop accepting
    undrain                              accept gateways again (the listener re-opened)
    reload                               as SIGHUP, but answers with the outcome
    debug.block       {"seconds"}        ONLY with MSGD_TEST_HOOKS=1 in the daemon's
                                         environment: blocks the event loop (watchdog tests)

Admin changes (provision.import, provision.remove) are recorded in the registry file and win
over the provisioning file: they persist across reloads and restarts until forgotten
(provision.forget). Requests are logged with their command and non-secret parameters;
`provision.import` carries keys, so only its row count is logged. Keys are never sent back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msgd.errors import MsgdError, ProvisioningError, RegistryError
from msgd.log import get_logger
from msgd.registry.provisioning import ProvisionedUe, identity_problem, validate_provisioned

if TYPE_CHECKING:
    from msgd.server.ports import AdminHost

__all__ = [
    "MAX_IMPORT_ROWS",
    "MAX_REQUEST",
    "TEST_HOOKS_ENV",
    "ControlServer",
    "peer_allowed",
    "peer_credentials",
]

log = get_logger("msgd.control")

MAX_REQUEST = 16 * 1024 * 1024  # octets in one request line (provision.import is the big one)
MAX_IMPORT_ROWS = 100_000  # beyond this, edit the provisioning file and reload instead
MAX_CLIENTS = 16
TEST_HOOKS_ENV = "MSGD_TEST_HOOKS"
_LIST_YIELD_EVERY = 512  # registry.list lets the loop breathe this often
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class RequestError(MsgdError):
    """A request the daemon refuses: the message goes back to msgctl as is."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def peer_allowed(uid: int, own_uid: int | None = None) -> bool:
    """Only root and the user the daemon runs as may administer it."""
    return uid == 0 or uid == (os.geteuid() if own_uid is None else own_uid)


class ControlServer:
    """The control socket of one daemon, seen through its admin port (`ports.AdminHost`)."""

    def __init__(self, server: AdminHost, path: Path) -> None:
        self.server = server
        self.path = Path(path)
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
        self._commands: dict[str, Callable[[dict[str, Any], Any], Awaitable[Any]]] = {
            "status": self._status,
            "gateways": self._gateways,
            "registry.count": self._registry_count,
            "registry.show": self._registry_show,
            "registry.compact": self._registry_compact,
            "provision.import": self._provision_import,
            "provision.remove": self._provision_remove,
            "provision.forget": self._provision_forget,
            "drain": self._drain,
            "undrain": self._undrain,
            "reload": self._reload,
        }
        if self.test_hooks:
            self._commands["debug.block"] = self._debug_block

    # --- socket -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket; a problem is logged and the daemon runs on without it."""
        try:
            sock = self._bind()
        except OSError as exc:
            log.error("control.bind_failed", socket=str(self.path), reason=_reason(exc))
            return
        except RequestError as exc:
            log.error("control.bind_failed", socket=str(self.path), reason=str(exc))
            return
        self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_REQUEST)
        log.info("control.listening", socket=str(self.path), mode="0600")
        if self.test_hooks:
            log.warning("control.test_hooks_enabled", env=TEST_HOOKS_ENV,
                        commands="debug.block")

    def _bind(self) -> socket.socket:
        path = self.path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bound under a temporary name, made 0600, then renamed: the socket never exists
            # at its real path with the umask's (possibly looser) mode.
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            if len(os.fsencode(tmp)) > 107:
                tmp = path.with_name(f".c{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            os.rename(tmp, path)
            info = path.stat()
            self._inode = (info.st_dev, info.st_ino)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _clear_stale(path: Path) -> None:
        try:
            info = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise RequestError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            # Left behind by a daemon that did not stop cleanly.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        finally:
            probe.close()
        raise RequestError(f"{path} is in use by another process")

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._server = None
        # Remove the path only if it is still our socket (not one a successor bound).
        with contextlib.suppress(OSError):
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) == self._inode:
                self.path.unlink()
        log.info("control.closed", socket=str(self.path))

    # --- one client -------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, _gid = peer_credentials(sock)
        except OSError as exc:
            log.warning("control.refused", reason=f"no peer credentials: {_reason(exc)}")
            writer.close()
            return
        clog = log.bind(peer_pid=pid, peer_uid=uid)
        if not peer_allowed(uid):
            clog.warning("control.refused", reason="uid is neither root nor the daemon's")
            self.server.metrics.control_request("connect", False)
            await _send(writer, {"ok": False, "error": f"permission denied: uid {uid} may not "
                                 "administer msgd (only root and the daemon's user)"})
            writer.close()
            return
        if len(self._writers) >= MAX_CLIENTS:
            await _send(writer, {"ok": False, "error": "too many control connections"})
            writer.close()
            return
        self._writers.add(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _send(writer, {"ok": False, "error": f"request longer than "
                                         f"{MAX_REQUEST} octets"})
                    break
                if not line:
                    break
                if not await self._one(line, writer, clog):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _one(self, line: bytes, writer: asyncio.StreamWriter, clog: Any) -> bool:
        """Answer one request line; False when the connection should end."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError("a request is a JSON object with a \"cmd\" string")
        except (ValueError, UnicodeDecodeError) as exc:
            await _send(writer, {"ok": False, "error": f"bad request: {exc}"})
            return False
        cmd = request["cmd"]
        started = time.monotonic()
        try:
            if cmd == "registry.list":
                result = await self._registry_list(request, writer)
            else:
                handler = self._commands.get(cmd)
                if handler is None:
                    raise RequestError(f"unknown command {cmd!r}")
                result = await handler(request, clog)
        except (RequestError, ProvisioningError, RegistryError) as exc:
            self.server.metrics.control_request(cmd if cmd in _KNOWN else "unknown", False)
            clog.info("control.command", cmd=cmd[:40], ok=False, reason=str(exc))
            await _send(writer, {"ok": False, "error": str(exc)})
            return True
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            clog.exception("control.command", cmd=cmd, ok=False, reason=type(exc).__name__)
            self.server.metrics.control_request(cmd if cmd in _KNOWN else "unknown", False)
            await _send(writer, {"ok": False, "error": f"internal error ({type(exc).__name__})"})
            return True
        ok = not (isinstance(result, _Failed))
        self.server.metrics.control_request(cmd, ok)
        clog.info("control.command", cmd=cmd, ok=ok, **_loggable(cmd, request),
                  took=round(time.monotonic() - started, 3))
        if isinstance(result, _Failed):
            await _send(writer, {"ok": False, "error": result.error, "result": result.result})
        else:
            await _send(writer, {"ok": True, "result": result})
        return True

    # --- commands ---------------------------------------------------------------------------

    async def _status(self, _request: dict[str, Any], _log: Any) -> dict[str, Any]:
        server = self.server
        registry = server.registry
        config = server.config
        now = dt.datetime.now(dt.UTC)
        certificates = [
            {"role": role, "subject": subject, "not_after": _iso(not_after),
             "days_left": round((not_after - now).total_seconds() / 86400, 1)}
            for role, subject, not_after in server.metrics.certificates.configured
        ]
        crl_next = server.metrics.certificates.crl_next_update
        return {
            "node_name": server.node_name,
            "version": _version(),
            "pid": os.getpid(),
            "state": "stopping" if server.stopping else "draining" if server.draining
            else "running",
            "started_at": _iso(dt.datetime.fromtimestamp(server.started_at, dt.UTC)),
            "uptime_seconds": round(time.time() - server.started_at, 1),
            "listen": _address(server.address),
            "gateways": {"configured": len(server.gateways),
                         "connected": len(server.connections)},
            "registry": {
                # backend, and its path or DSN (no password); with PostgreSQL, whether it
                # takes writes and since when it does not.
                **server.reads.describe(),
                "registered": registry.registered_count(),
                "provisioned": registry.provisioned_count(),
                "pending": registry.pending(),
                "admin_overrides": registry.provisioning.provisioning_overrides(),
                # The embedded registry's file, journal and compaction; PostgreSQL has none.
                **(_registry_file(registry) if hasattr(registry, "journal") else {}),
            },
            "tls": {
                "certificate": str(config.tls.certificate),
                "gateway_ca": str(config.tls.gateway_ca),
                "crl": str(config.tls.crl) if config.tls.crl else None,
                "crl_next_update": _iso(crl_next) if crl_next else None,
                "certificates": certificates,
            },
            "metrics": _address(server.metrics.address),
            "watchdog_seconds": server.notifier.watchdog_interval(),
            "last_reload": server.last_reload,
        }

    async def _gateways(self, _request: dict[str, Any], _log: Any) -> dict[str, Any]:
        server = self.server
        wall = time.time() - server.loop.time()  # loop time -> Unix time
        by_identity: dict[str, list[dict[str, Any]]] = {}
        for conn in list(server.connections):
            by_identity.setdefault(conn.identity or "", []).append({
                "peer": conn.peer,
                "since": _iso(dt.datetime.fromtimestamp(wall + conn.connected_at, dt.UTC)),
                "entries_processed": conn.entries_processed,
                "closing": conn.closing,
            })
        rows = []
        for identity in sorted(set(server.gateways) | set(by_identity)):
            policy = server.gateways.get(identity)
            conns = sorted(by_identity.get(identity, []), key=lambda c: c["since"])
            rows.append({
                "identity": identity or None,
                "configured": policy is not None,
                "ue_authentication": policy.ue_authentication if policy else None,
                "bulk_allowed": policy.bulk_allowed if policy else None,
                "connected": bool(conns),
                "connections": conns,
                "entries_processed": sum(c["entries_processed"] for c in conns),
            })
        return {"gateways": rows}

    async def _registry_count(self, _request: dict[str, Any], _log: Any) -> dict[str, Any]:
        registry = self.server.registry
        return {"registered": await self.server.reads.count(),
                "provisioned": registry.provisioned_count(), "pending": registry.pending()}

    async def _registry_show(self, request: dict[str, Any], _log: Any) -> dict[str, Any]:
        ue = _ue_param(request)
        registry = self.server.registry
        registration = await self.server.reads.lookup(ue)
        provisioned = registry.provisioned(ue)
        if registration is None and provisioned is None:
            raise RequestError(f"UE {ue!r} is neither registered nor provisioned")
        return {
            "ue_service_id": ue,
            "registered": registration is not None,
            "gateway": registration.gateway if registration else None,
            "profile": _profile(registration.profile) if registration else None,
            "durable": registry.pending() == 0,
            "provisioned": provisioned is not None,
            "authorized_gateways": sorted(provisioned.gateways) if provisioned else [],
        }

    async def _registry_list(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> Any:
        gateway = request.get("gateway")
        if gateway is not None and not isinstance(gateway, str):
            raise RequestError("gateway must be a string")
        limit = request.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 0):
            raise RequestError("limit must be a non-negative integer")
        count = 0
        # Closed at once when the limit ends it: a database scan holds a cursor till then.
        async with contextlib.aclosing(self.server.reads.scan(gateway)) as rows:
            async for registration in rows:
                if limit is not None and count >= limit:
                    break
                item: dict[str, Any] = {"ue_service_id": registration.ue_service_id,
                                        "gateway": registration.gateway}
                if registration.profile is not None:
                    item["profile"] = _profile(registration.profile)
                writer.write(_line({"item": item}))
                count += 1
                if count % _LIST_YIELD_EVERY == 0:
                    await writer.drain()  # a slow reader holds this request, not the daemon
                    await asyncio.sleep(0)
        return {"count": count, "gateway": gateway}

    async def _registry_compact(self, _request: dict[str, Any], clog: Any) -> dict[str, Any]:
        registry = self.server.registry
        if not hasattr(registry, "compact"):
            raise RequestError("registry compact: only the embedded SQLite registry has a "
                               "journal to fold (PostgreSQL compacts itself: autovacuum)")
        before = _registry_file(registry)
        clog.info("registry.compact", journal_changes=registry.journal.changes)
        report = await registry.compact()  # RegistryError: the file keeps what it had
        return {**report.as_dict(), "before": before, "after": _registry_file(registry)}

    async def _provision_import(self, request: dict[str, Any], clog: Any) -> Any:
        raw = request.get("rows")
        if not isinstance(raw, list) or not raw:
            raise RequestError("rows must be a non-empty list")
        if len(raw) > MAX_IMPORT_ROWS:
            raise RequestError(f"at most {MAX_IMPORT_ROWS} rows per import; for more, edit "
                               "the provisioning file and reload")
        rows = [_row(index, item) for index, item in enumerate(raw, 1)]
        seen: set[str] = set()
        for index, row in enumerate(rows, 1):
            if row.ue_service_id in seen:
                raise RequestError(f"row {index}: duplicate ue_service_id")
            seen.add(row.ue_service_id)
        registry = self.server.registry
        clog.info("provision.import", rows=len(rows))
        try:
            # One transaction: every row is stored, or none is.
            await asyncio.to_thread(registry.provisioning.upsert_provisioned_many, rows)
        except MsgdError as exc:
            return _Failed(f"import failed, nothing was applied: {exc}", {"imported": 0})
        return {"imported": len(rows), "provisioned": registry.provisioned_count(),
                "admin_overrides": registry.provisioning.provisioning_overrides()}

    async def _provision_remove(self, request: dict[str, Any], _log: Any) -> Any:
        ue = _ue_param(request)
        registry = self.server.registry
        removed = await asyncio.to_thread(registry.provisioning.remove_provisioned, ue)
        if not removed:
            raise RequestError(f"UE {ue!r} is not provisioned")
        return {"removed": ue,
                "still_registered": await self.server.reads.lookup(ue) is not None,
                "provisioned": registry.provisioned_count()}

    async def _provision_forget(self, request: dict[str, Any], _log: Any) -> Any:
        everything = request.get("all")
        ues = request.get("ues")
        if everything is True and ues is None:
            wanted = None
        elif everything in (None, False) and isinstance(ues, list) and ues:
            for ue in ues:
                problem = identity_problem(ue, "ue")
                if problem is not None:
                    raise RequestError(problem)
            wanted = ues
        else:
            raise RequestError('give either "ues" (a non-empty list) or "all": true')
        provisioning = self.server.registry.provisioning
        forgotten = await asyncio.to_thread(provisioning.forget_provisioning_overrides, wanted)
        if wanted is not None and not forgotten:
            raise RequestError("no admin change is recorded for " + ", ".join(
                repr(ue) for ue in wanted))
        dropped = set(forgotten)
        unknown = [] if wanted is None else [ue for ue in dict.fromkeys(wanted)
                                             if ue not in dropped]
        return {"forgotten": len(forgotten), "unknown": unknown,
                "admin_overrides": provisioning.provisioning_overrides()}

    async def _drain(self, _request: dict[str, Any], _log: Any) -> dict[str, Any]:
        told = self.server.drain()
        return {"draining": True, "gateways_told": told,
                "connected": len(self.server.connections)}

    async def _undrain(self, _request: dict[str, Any], _log: Any) -> Any:
        was_draining = self.server.draining
        problem = self.server.undrain()
        if problem is not None:
            return _Failed(f"still draining: {problem}", {"draining": True})
        return {"draining": False, "was_draining": was_draining,
                "listen": _address(self.server.address)}

    async def _reload(self, _request: dict[str, Any], _log: Any) -> Any:
        result = await self.server.reload_now()
        if not result["ok"]:
            return _Failed(f"reload failed ({result['part']}): {result['error']}", result)
        return result

    async def _debug_block(self, request: dict[str, Any], clog: Any) -> dict[str, Any]:
        seconds = request.get("seconds")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) \
                or not 0 < seconds <= 60:
            raise RequestError("seconds must be a number in (0, 60]")
        clog.warning("control.debug_block", seconds=seconds)
        # Deliberately blocks the event loop (watchdog tests; MSGD_TEST_HOOKS=1 only).
        time.sleep(seconds)
        return {"blocked": seconds}


@dataclasses.dataclass
class _Failed:
    """A command that ran and failed, with a result worth showing anyway."""

    error: str
    result: Any


_KNOWN = frozenset({"status", "gateways", "registry.count", "registry.show", "registry.list",
                    "registry.compact", "provision.import", "provision.remove",
                    "provision.forget", "drain", "undrain", "reload", "debug.block"})


def _registry_file(registry: Any) -> dict[str, Any]:
    """The registry file, its journal and online compaction, as `status` shows them."""
    journal = registry.journal
    main, wal = registry.file_sizes()
    compaction = registry.compaction
    last = compaction.last
    return {
        "journal": {"changes": journal.changes, "rows": journal.rows, "bytes": journal.octets},
        "file_bytes": {"main": main, "wal": wal},
        "compaction": {
            "running": compaction.running,
            "succeeded": compaction.ok_count,
            "failed": compaction.failed_count,
            "last": None if last is None else {
                "ok": last.ok, "error": last.error, "trigger": last.trigger,
                "ended_at": _iso(dt.datetime.fromtimestamp(last.started_at + last.seconds,
                                                           dt.UTC)),
                "seconds": round(last.seconds, 3), "changes_folded": last.changes_folded,
                "registrations": last.registrations},
        },
    }


def _ue_param(request: dict[str, Any]) -> str:
    ue = request.get("ue")
    problem = identity_problem(ue, "ue")
    if problem is not None:
        raise RequestError(problem)
    return ue  # type: ignore[return-value]


def _row(index: int, item: Any) -> ProvisionedUe:
    if not isinstance(item, dict):
        raise RequestError(f"row {index}: must be an object")
    uid, key_hex, gateways = item.get("ue_service_id"), item.get("key"), item.get("gateways")
    try:
        key = bytes.fromhex(key_hex) if isinstance(key_hex, str) and len(key_hex) == 64 else b""
    except ValueError:
        key = b""
    if not key:
        # Never echo the value: it is (or was meant to be) a key.
        raise RequestError(f"row {index}: key must be 64 hex characters")
    if not isinstance(gateways, list) or not all(isinstance(g, str) for g in gateways):
        raise RequestError(f"row {index}: gateways must be a list of gateway identities")
    if not isinstance(uid, str):
        raise RequestError(f"row {index}: ue_service_id must be a string")
    row = ProvisionedUe(uid, key, frozenset(gateways))
    try:
        validate_provisioned(row)
    except ProvisioningError as exc:
        raise RequestError(f"row {index}: {exc}") from None
    return row


def _loggable(cmd: str, request: dict[str, Any]) -> dict[str, Any]:
    """The parameters worth a log line; provision.import's rows hold keys and are left out."""
    fields = {}
    for name in ("ue", "gateway", "limit", "seconds"):
        if name in request and isinstance(request[name], str | int | float):
            fields[name] = request[name]
    if cmd == "provision.import" and isinstance(request.get("rows"), list):
        fields["rows"] = len(request["rows"])
    if cmd == "provision.forget":
        if isinstance(request.get("ues"), list):
            fields["ues"] = len(request["ues"])
        if request.get("all") is True:
            fields["all"] = True
    return fields


def _profile(raw: bytes | None) -> Any:
    if raw is None:
        return None
    from wire.messages import decode_profile, message_fields

    try:
        profile = decode_profile(raw)
    except Exception:  # stored as received; show the octets if they no longer decode
        return {"raw": raw.hex()}
    shown = {}
    for name, value in message_fields(profile).items():
        if value is None:
            continue
        shown[name] = value.hex() if isinstance(value, bytes) else value
    return shown


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("msgd")
    except PackageNotFoundError:
        return "unknown"


def _address(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


async def _send(writer: asyncio.StreamWriter, obj: Any) -> None:
    writer.write(_line(obj))
    with contextlib.suppress(ConnectionError):
        await writer.drain()


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
