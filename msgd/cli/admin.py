"""`msgctl status|gateways|registry|provision|drain|undrain|reload`: admin over the control socket.

    msgctl status                         daemon state, listener, registry, certificates
    msgctl gateways                       configured gateways, connected since, entries
    msgctl registry count                 registered / provisioned / pending
    msgctl registry show UE               one UE (its registration and provisioning)
    msgctl registry list [--gateway G]    registered UEs, optionally of one gateway
    msgctl registry compact               fold the journal into the snapshot now (online
                                          compaction; msgd keeps serving meanwhile)
    msgctl registry migrate [--dry-run]   the PostgreSQL schema brought up to date (directly,
                                          from [registry] dsn of --config; msgd/cli/migrate.py)
    msgctl provision import FILE          add or replace the UEs of a provisioning CSV (all
                                          of them in one transaction, or none)
    msgctl provision remove UE            remove one UE's provisioning
    msgctl provision forget UE... | --all drop admin changes: the provisioning file decides
                                          for those UEs again from the next reload
    msgctl drain                          GOODBYE to every gateway, stop accepting
    msgctl undrain                        accept gateways again after a drain
    msgctl reload                         reload like SIGHUP and report the outcome

Admin changes (provision import, provision remove) persist across reloads and restarts and win
over the provisioning file until forgotten (provision forget); `msgctl status` counts them.

Every command takes --json (machine-readable output), --socket PATH, or --config FILE
(default /etc/msgd/msgd.toml) whose [control] socket names the socket. The protocol is in
msgd/control.py. Exit codes: 0 done; 1 the daemon refused or the command failed (unknown UE,
reload failed, permission denied); 2 usage; 3 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from msgd.errors import MsgdError

__all__ = ["DEFAULT_CONFIG", "AdminError", "ControlClient", "add_parsers", "resolve_socket"]

DEFAULT_CONFIG = Path("/etc/msgd/msgd.toml")
ADMIN_RULE = ("Admin changes (provision import, provision remove) persist across reloads and "
              "restarts and win over the provisioning file until forgotten (provision forget).")
EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


class AdminError(MsgdError):
    """An admin command that did not succeed; exit_code says why."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ControlClient:
    """A blocking client of the control socket (one request at a time)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except PermissionError:
            sock.close()
            raise AdminError(
                f"{self.path}: permission denied (run as root or as the daemon's user)",
                EXIT_UNREACHABLE,
            ) from None
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise AdminError(f"{self.path}: no msgd is listening there (is it running?)",
                             EXIT_UNREACHABLE) from None
        except OSError as exc:
            sock.close()
            raise AdminError(f"{self.path}: {exc.strerror or exc}", EXIT_UNREACHABLE) from None
        self._sock = sock
        self._file = sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, cmd: str, params: dict[str, Any]) -> None:
        data = json.dumps({"cmd": cmd, **params}, separators=(",", ":")) + "\n"
        try:
            self._sock.sendall(data.encode("utf-8"))
        except OSError as exc:
            failure = AdminError(f"{self.path}: sending failed: {exc.strerror or exc}",
                                 EXIT_UNREACHABLE)
            # The daemon may have answered and closed already (it refuses a peer at once):
            # its answer says more than EPIPE.
            try:
                message = self._read()
            except AdminError:
                raise failure from None
            self._result(message)
            raise failure from None

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except TimeoutError:
            raise AdminError(f"{self.path}: no answer in time", EXIT_UNREACHABLE) from None
        except OSError as exc:
            raise AdminError(f"{self.path}: {exc.strerror or exc}", EXIT_UNREACHABLE) from None
        if not line:
            raise AdminError(f"{self.path}: the daemon closed the connection", EXIT_UNREACHABLE)
        try:
            message = json.loads(line)
        except ValueError:
            raise AdminError(f"{self.path}: not a msgd control socket (bad answer)",
                             EXIT_UNREACHABLE) from None
        if not isinstance(message, dict):
            raise AdminError(f"{self.path}: bad answer", EXIT_UNREACHABLE)
        return message

    @staticmethod
    def _result(message: dict[str, Any]) -> Any:
        if not message.get("ok"):
            error = AdminError(str(message.get("error", "failed")))
            error.result = message.get("result")  # type: ignore[attr-defined]
            raise error
        return message.get("result")

    def request(self, cmd: str, **params: Any) -> Any:
        """Send one request; return its result or raise AdminError with the daemon's words."""
        self._send(cmd, params)
        return self._result(self._read())

    def stream(self, cmd: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Items of a streamed answer (registry.list); the final result goes to self.last."""
        self._send(cmd, params)
        while True:
            message = self._read()
            if "item" in message and "ok" not in message:
                yield message["item"]
                continue
            self.last = self._result(message)
            return


def resolve_socket(socket_path: Path | None, config_path: Path) -> Path:
    """--socket, else [control] socket from the configuration file."""
    if socket_path is not None:
        return socket_path
    from msgd.config import parse_config

    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AdminError(f"cannot read {config_path} ({exc.strerror or exc}); "
                         "pass --socket PATH or --config FILE", 2) from None
    try:
        config = parse_config(text, config_path.parent, path=config_path, check_files=False)
    except MsgdError as exc:
        raise AdminError(str(exc), 2) from None
    if config.control.socket is None:
        raise AdminError(f"{config_path} has no [control] socket; pass --socket PATH", 2)
    return config.control.socket


# --- argument parsing ---------------------------------------------------------------------


def add_parsers(commands: Any) -> None:
    """The admin verbs' parsers, one statement each: long on purpose, so the set reads as one
    table of msgctl's commands."""
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("reaching the daemon")
    where.add_argument("--socket", type=Path, metavar="PATH", help="control socket path")
    where.add_argument("--config", type=Path, default=DEFAULT_CONFIG, metavar="FILE",
                       help=f"msgd.toml naming the socket (default {DEFAULT_CONFIG})")
    where.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="give up waiting for an answer after this long (default 30)")
    common.add_argument("--json", action="store_true", help="machine-readable JSON output")

    def add(parent: Any, name: str, help: str, func: Any) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, parents=[common], help=help, description=help)
        parser.set_defaults(func=func)
        return parser

    add(commands, "status", "daemon status: listener, gateways, registry, certificates", _status)
    add(commands, "gateways", "configured gateways: connected, since, entries processed",
        _gateways)
    registry = commands.add_parser("registry", help="registered UEs")
    registry_commands = registry.add_subparsers(dest="registry_command", required=True,
                                                metavar="COMMAND")
    add(registry_commands, "count", "how many UEs are registered and provisioned", _count)
    show = add(registry_commands, "show", "one UE's registration and provisioning", _show)
    show.add_argument("ue", metavar="UE", help="UE Service ID")
    listing = add(registry_commands, "list", "registered UEs", _list)
    listing.add_argument("--gateway", metavar="G", help="only UEs registered through G")
    listing.add_argument("--limit", type=int, metavar="N", help="at most N UEs")
    add(registry_commands, "compact", "fold the journal into the snapshot now, while msgd "
        "serves (it also runs on its own: [registry] compact_*)", _compact)
    migrate = registry_commands.add_parser(
        "migrate", help="bring the PostgreSQL registry's schema up to date (msgd does it at "
        "start too); reads [registry] of --config, not the daemon",
        description="Bring the PostgreSQL registry's schema up to date.")
    migrate.add_argument("--config", type=Path, default=DEFAULT_CONFIG, metavar="FILE",
                         help=f"msgd.toml with [registry] dsn (default {DEFAULT_CONFIG})")
    migrate.add_argument("--dry-run", action="store_true",
                         help="show what would be applied, change nothing")
    migrate.add_argument("--json", action="store_true", help="machine-readable JSON output")
    migrate.set_defaults(func=_migrate)
    provision = commands.add_parser(
        "provision", help="change provisioning at once",
        description="Change provisioning at once. " + ADMIN_RULE)
    provision_commands = provision.add_subparsers(dest="provision_command", required=True,
                                                  metavar="COMMAND")
    importing = add(provision_commands, "import",
                    "add or replace the UEs of a CSV file (ue_service_id,key,gateways), all "
                    "in one transaction or none", _import)
    importing.add_argument("file", type=Path, metavar="FILE")
    importing.epilog = ADMIN_RULE
    remove = add(provision_commands, "remove", "remove one UE's provisioning", _remove)
    remove.add_argument("ue", metavar="UE", help="UE Service ID")
    remove.epilog = ADMIN_RULE
    forget = add(provision_commands, "forget",
                 "drop admin changes, so that the provisioning file decides for these UEs "
                 "again from the next reload or restart", _forget)
    forget.add_argument("ues", nargs="*", metavar="UE", help="UE Service IDs")
    forget.add_argument("--all", action="store_true", help="every admin change")
    forget.epilog = ADMIN_RULE
    add(commands, "drain", "GOODBYE to every gateway and stop accepting new ones", _drain)
    add(commands, "undrain", "accept gateways again after a drain (the listener re-opens on "
        "the same address)", _undrain)
    add(commands, "reload", "reload configuration, certificates, CRL and provisioning now",
        _reload)


def _run(args: argparse.Namespace, body: Any, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        path = resolve_socket(args.socket, args.config)
        with ControlClient(path, args.timeout) as client:
            return int(body(client, args, out) or 0)
    except AdminError as exc:
        result = getattr(exc, "result", None)
        if args.json:
            _dump({"ok": False, "error": str(exc), "result": result}, out)
        print(f"msgctl: {exc}", file=sys.stderr)
        return exc.exit_code


def _dump(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _request(
    args: argparse.Namespace,
    cmd: str,
    render: Callable[[dict[str, Any], TextIO], None],
    **params: Any,
) -> int:
    """Ask the daemon once; print its answer as JSON (--json) or through `render`."""

    def body(client: ControlClient, args: argparse.Namespace, out: TextIO) -> None:
        result = client.request(cmd, **params)
        if args.json:
            _dump(result, out)
        else:
            render(result, out)

    return _run(args, body)


# --- commands -----------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    return _request(args, "status", _render_status)


def _render_status(status: dict[str, Any], out: TextIO) -> None:
    reg = status["registry"]
    gws = status["gateways"]
    lines = [
        f"{status['node_name']}: {status['state']}, pid {status['pid']}, "
        f"up {_duration(status['uptime_seconds'])} (msgd {status['version']})",
        f"listening    {status['listen']}",
        f"gateways     {gws['connected']} connected, {gws['configured']} configured",
        f"registry     {reg['registered']} registered, {reg['provisioned']} provisioned, "
        f"{reg['pending']} pending ({reg.get('path') or reg.get('dsn')})",
        *([f"registry     UNAVAILABLE since {reg['unavailable_since']}: {reg['problem']}"]
          if reg.get("available") is False else []),
        f"provisioning {reg['admin_overrides']} admin changes kept over the provisioning file",
    ]
    if "journal" in reg:
        lines.append(_journal_line(reg))
    for cert in status["tls"]["certificates"]:
        lines.append(f"certificate  {cert['role']}: {cert['subject']}, expires "
                     f"{cert['not_after']} ({cert['days_left']} days)")
    if status["tls"]["crl"]:
        lines.append(f"crl          {status['tls']['crl']}, next update "
                     f"{status['tls']['crl_next_update']}")
    if status["metrics"]:
        lines.append(f"metrics      http://{status['metrics']}/metrics")
    if status["watchdog_seconds"]:
        lines.append(f"watchdog     {status['watchdog_seconds']:g} s")
    reload = status["last_reload"]
    if reload:
        outcome = "ok" if reload["ok"] else f"FAILED ({reload['part']}): {reload['error']}"
        lines.append(f"last reload  {reload['at']}: {outcome}")
    out.write("\n".join(lines) + "\n")


def _gateways(args: argparse.Namespace) -> int:
    return _request(args, "gateways", _render_gateways)


def _render_gateways(result: dict[str, Any], out: TextIO) -> None:
    rows = [("GATEWAY", "CONNECTED", "SINCE", "PEER", "ENTRIES", "POLICY")]
    for gw in result["gateways"]:
        policy = ("not configured" if not gw["configured"] else
                  ("auth" if gw["ue_authentication"] else "trusted")
                  + (",bulk" if gw["bulk_allowed"] else ""))
        conns = gw["connections"] or [None]
        for conn in conns:
            rows.append((
                gw["identity"] or "(no identity)",
                "yes" + (" (closing)" if conn and conn["closing"] else "") if conn else "no",
                conn["since"] if conn else "-",
                conn["peer"] if conn else "-",
                str(conn["entries_processed"]) if conn else "-",
                policy,
            ))
    _table(rows, out)


def _count(args: argparse.Namespace) -> int:
    return _request(args, "registry.count", _render_count)


def _render_count(result: dict[str, Any], out: TextIO) -> None:
    out.write(f"{result['registered']} registered, {result['provisioned']} provisioned, "
              f"{result['pending']} pending\n")


def _journal_line(reg: dict[str, Any]) -> str:
    journal, files, compaction = reg["journal"], reg["file_bytes"], reg["compaction"]
    text = (f"journal      {journal['changes']} changes in {journal['rows']} rows "
            f"({_mib(journal['bytes'])}); file {_mib(files['main'])} + WAL "
            f"{_mib(files['wal'])}")
    last = compaction["last"]
    if compaction["running"]:
        text += "; compacting now"
    elif last is not None:
        outcome = "ok" if last["ok"] else f"FAILED: {last['error']}"
        text += f"; last compaction {last['ended_at']} ({last['seconds']:g} s, {outcome})"
    return text


def _mib(octets: int) -> str:
    return f"{octets / 2**20:.1f} MiB"


def _compact(args: argparse.Namespace) -> int:
    return _request(args, "registry.compact", _render_compact)


def _render_compact(result: dict[str, Any], out: TextIO) -> None:
    before, after = result["before"], result["after"]
    if not result["changes_folded"]:
        out.write("nothing to fold: the journal was empty")
    else:
        out.write(f"folded {result['changes_folded']} changes ({result['journal_rows_folded']} "
                  f"journal rows) into a snapshot of {result['registrations']} registrations "
                  f"in {result['seconds']:.2f} s")
    out.write(f"\njournal      {before['journal']['changes']} -> "
              f"{after['journal']['changes']} changes\n")
    out.write(f"file         {_mib(sum(before['file_bytes'].values()))} -> "
              f"{_mib(sum(after['file_bytes'].values()))} (with the WAL)\n")


def _migrate(args: argparse.Namespace) -> int:
    from msgd.cli.migrate import run_migrate

    return run_migrate(args)


def _show(args: argparse.Namespace) -> int:
    return _request(args, "registry.show", _render_show, ue=args.ue)


def _render_show(result: dict[str, Any], out: TextIO) -> None:
    lines = [f"ue_service_id        {result['ue_service_id']}"]
    if result["registered"]:
        lines.append(f"registered           yes, through {result['gateway']}")
        if result["profile"]:
            lines.append(f"profile              {json.dumps(result['profile'])}")
    else:
        lines.append("registered           no")
    if result["provisioned"]:
        allowed = ", ".join(result["authorized_gateways"])
        lines.append(f"provisioned          yes, for {allowed}")
    else:
        lines.append("provisioned          no")
    out.write("\n".join(lines) + "\n")


def _list(args: argparse.Namespace) -> int:
    def body(client: ControlClient, args: argparse.Namespace, out: TextIO) -> None:
        params: dict[str, Any] = {}
        if args.gateway is not None:
            params["gateway"] = args.gateway
        if args.limit is not None:
            params["limit"] = args.limit
        items = client.stream("registry.list", **params)
        if args.json:
            # One JSON document, written as it streams in (a registry can be millions long).
            out.write('{"registrations": [')
            for index, item in enumerate(items):
                out.write(("," if index else "") + "\n  " + json.dumps(item, ensure_ascii=False))
            out.write(f'\n], "count": {client.last["count"]}}}\n')
            return
        for item in items:
            profile = f"  {json.dumps(item['profile'])}" if "profile" in item else ""
            out.write(f"{item['ue_service_id']}\t{item['gateway']}{profile}\n")
        if sys.stderr.isatty():
            print(f"{client.last['count']} UEs", file=sys.stderr)

    return _run(args, body)


def _import(args: argparse.Namespace) -> int:
    from msgd.ops.control import MAX_IMPORT_ROWS
    from msgd.registry.provisioning import read_provisioning_csv

    # Read and check the file here, with line numbers in any error, before asking the daemon.
    rows = []
    try:
        for row in read_provisioning_csv(args.file):
            rows.append({"ue_service_id": row.ue_service_id, "key": row.key.hex(),
                         "gateways": sorted(row.gateways)})
            if len(rows) > MAX_IMPORT_ROWS:
                print(f"msgctl: {args.file}: more than {MAX_IMPORT_ROWS} UEs; for that many, "
                      "update the provisioning file and reload", file=sys.stderr)
                return EXIT_FAILED
    except MsgdError as exc:
        print(f"msgctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not rows:
        print(f"msgctl: {args.file}: no UEs in the file", file=sys.stderr)
        return EXIT_FAILED

    return _request(args, "provision.import", _render_import, rows=rows)


def _render_import(result: dict[str, Any], out: TextIO) -> None:
    out.write(f"imported {result['imported']} UEs ({result['provisioned']} provisioned)\n")
    print("msgctl: note: kept over the provisioning file across reloads and restarts until "
          "`msgctl provision forget`", file=sys.stderr)


def _remove(args: argparse.Namespace) -> int:
    return _request(args, "provision.remove", _render_remove, ue=args.ue)


def _render_remove(result: dict[str, Any], out: TextIO) -> None:
    still = " (its registration stays until it de-registers)" \
        if result["still_registered"] else ""
    out.write(f"removed {result['removed']}{still}\n")


def _forget(args: argparse.Namespace) -> int:
    if bool(args.ues) == bool(args.all):
        print("msgctl: provision forget: give UE Service IDs or --all (not both)",
              file=sys.stderr)
        return 2
    params: dict[str, Any] = {"all": True} if args.all else {"ues": args.ues}
    return _request(args, "provision.forget", _render_forget, **params)


def _render_forget(result: dict[str, Any], out: TextIO) -> None:
    out.write(f"forgot {result['forgotten']} admin changes ({result['admin_overrides']} left); "
              "the provisioning file decides for those UEs from the next reload "
              "(msgctl reload)\n")
    if result["unknown"]:
        print("msgctl: no admin change was recorded for: " + ", ".join(result["unknown"]),
              file=sys.stderr)


def _drain(args: argparse.Namespace) -> int:
    return _request(args, "drain", _render_drain)


def _render_drain(result: dict[str, Any], out: TextIO) -> None:
    out.write(f"draining: GOODBYE sent to {result['gateways_told']} gateways, "
              f"{result['connected']} still finishing; no new connections accepted\n")


def _undrain(args: argparse.Namespace) -> int:
    return _request(args, "undrain", _render_undrain)


def _render_undrain(result: dict[str, Any], out: TextIO) -> None:
    was = "" if result["was_draining"] else " (it was not draining)"
    out.write(f"accepting gateways on {result['listen']}{was}\n")


def _reload(args: argparse.Namespace) -> int:
    return _request(args, "reload", _render_reload)


def _render_reload(result: dict[str, Any], out: TextIO) -> None:
    changes = result["changes"]
    parts = [f"{changes['provisioned']} UEs provisioned"]
    if changes["gateways_added"]:
        parts.append("gateways added: " + ", ".join(changes["gateways_added"]))
    if changes["gateways_removed"]:
        parts.append("gateways removed: " + ", ".join(changes["gateways_removed"]))
    if changes["sessions_ended"]:
        parts.append(f"{changes['sessions_ended']} sessions told GOODBYE")
    if changes["restart_needed"]:
        parts.append("needs a restart to apply: " + ", ".join(changes["restart_needed"]))
    out.write("reloaded: " + "; ".join(parts) + "\n")


# --- formatting -----------------------------------------------------------------------------


def _table(rows: list[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                  .rstrip() + "\n")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s"
