"""`msgctl gateway register|deregister`: act as a Message Gateway for the UEs of a file.

    msgctl gateway register --server 127.0.0.1:7554 --cert state/certs/gw1.example.pem \\
        --key state/certs/gw1.example.key --ca state/certs/ca.pem --ues state/gw1-ues.csv

Reads the UE file (msgd.gateway.ue_file; "-" is standard input) lazily, registers or
de-registers its UEs over one GatewaySession (bulk when the server allows it, TS 23.554
8.2.X; one by one with --single or when it does not, 8.2.3 / 8.2.4), shows a progress bar
with rate and ETA on a terminal, and ends with a summary per failure cause. --json prints
one JSON object per UE on standard output instead of the failure list. Exit codes: see
EXIT_CODES. parse_args (msgd.cli.main) is testable without starting anything; run() is the work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from msgd.errors import MsgdError, TLSSetupError
from wire.constants import DEFAULT_PORT, GatewayType

if TYPE_CHECKING:  # the client is imported when a command runs: `msgctl --help` stays quick
    from msgd.gateway.values import GatewayUe, UeResult

EXIT_OK = 0  # every UE succeeded
EXIT_FAILURES = 1  # the run completed and at least one UE failed (see the summary)
EXIT_USAGE = 2  # bad arguments, unreadable or invalid UE file, unusable certificate or key
EXIT_CONNECTION = 3  # could not connect / TLS / HELLO refused, or the connection was lost
#                      with UEs left without a result (listed as NO_RESULT)

EXIT_CODES = """\
exit codes:
  0  every UE succeeded
  1  the run completed and at least one UE failed (summary per failure cause)
  2  usage or configuration error: bad arguments, unreadable or invalid UE file,
     unusable certificate, key or CA file
  3  connection failure: refused, TLS or HELLO refused, or the connection was lost with
     UEs left without a result (they are listed; see --unanswered to resume with --only)"""

NO_RESULT = "NO_RESULT"
# Failures listed after the summary when not --json (the rest are counted).
SHOW_FAILURES = 20


def add_parser(commands: Any) -> None:
    gateway = commands.add_parser(
        "gateway", help="register / de-register UEs as a Message Gateway",
        description="Act as a Message Gateway (TS 23.554 8.2.3, 8.2.4, 8.2.X over wire-v1).")
    actions = gateway.add_subparsers(dest="gateway_command", required=True, metavar="ACTION")
    for name, text in (("register", "register the UEs of a file (8.2.3 / 8.2.X)"),
                       ("deregister", "de-register the UEs of a file (8.2.4)")):
        parser = actions.add_parser(
            name, help=text, description=f"{text[0].upper()}{text[1:]}.",
            epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
            fromfile_prefix_chars="@")
        _add_options(parser)
        parser.set_defaults(func=run, operation=name)
    from msgd.cli.gateway_sync import add_sync_parser

    add_sync_parser(actions, _add_options)


def _add_options(parser: argparse.ArgumentParser, *, sync: bool = False) -> None:
    parser.add_argument("--server", required=True, type=parse_server, metavar="HOST:PORT",
                        help=f"the MSGin5G Server (port {DEFAULT_PORT} if omitted; "
                             "[v6addr]:port for IPv6)")
    parser.add_argument("--cert", required=True, type=Path, help="gateway certificate (PEM)")
    parser.add_argument("--key", required=True, type=Path, help="its private key (PEM)")
    parser.add_argument("--ca", required=True, type=Path,
                        help="CA that signed the server's certificate (PEM)")
    parser.add_argument("--ues", required=True, metavar="FILE",
                        help="UE file: ue_service_id,key[,profile columns] CSV "
                             "(docs/gateway.md); - reads standard input")
    if sync:  # msgctl gateway sync: the connection and the file, --json
        parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
        parser.add_argument("--server-name", metavar="NAME",
                            help="name to verify in the server certificate (default: HOST)")
        return
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--bulk", dest="mode", action="store_const", const="bulk",
                      help="bulk procedures only; fail if the server does not allow bulk "
                           "(default: bulk when allowed, else one by one)")
    mode.add_argument("--single", dest="mode", action="store_const", const="single",
                      help="individual procedures only (8.2.3 / 8.2.4)")
    parser.set_defaults(mode="auto")
    parser.add_argument("--only", nargs="+", action="extend", metavar="UE",
                        help="only these UE Service IDs from the file; @FILE reads them "
                             "one per line (e.g. a file written by --unanswered)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per UE on standard output")
    parser.add_argument("--server-name", metavar="NAME",
                        help="name to verify in the server certificate (default: HOST)")
    parser.add_argument("--node-name", metavar="NAME", help="Node name sent in HELLO")
    parser.add_argument("--gateway-type", choices=("non-3gpp", "legacy-3gpp"),
                        default="non-3gpp", help="Gateway type sent in HELLO (default non-3gpp)")
    parser.add_argument("--timeout", type=_positive_float, default=10.0, metavar="SECONDS",
                        help="connect and HELLO timeout (default 10)")
    parser.add_argument("--reconnect", type=_count, default=6, metavar="N",
                        help="reconnect attempts in a row after a lost connection (default 6, "
                             "8 to 16 s of back-off in all; "
                             "0: stop at the first loss)")
    parser.add_argument("--busy-retries", type=_count, default=3, metavar="N",
                        help="resend a UE answered SERVER_BUSY up to N times, after its "
                             "Retry after (default 3)")
    parser.add_argument("--unanswered", type=Path, metavar="FILE",
                        help="write the UE Service IDs left without a result there, one per "
                             "line (resume with --only @FILE)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is off anyway when stderr is not a terminal)")


def parse_server(text: str) -> tuple[str, int]:
    """HOST, HOST:PORT or [V6ADDR]:PORT -> (host, port)."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: missing ]")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise argparse.ArgumentTypeError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not host:
        raise argparse.ArgumentTypeError(f"{text!r}: no host")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: port must be 1-65535")
    return host, int(port_text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


# --- running -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """The `msgctl gateway register|deregister` command; returns the exit code."""
    from msgd.log import setup_logging

    # Library warnings (protocol errors) as logfmt on stderr; info stays quiet for a CLI.
    setup_logging("warning", sys.stderr)
    return asyncio.run(_run(args, sys.stdout, sys.stderr))


def _fail(err: TextIO, message: str) -> None:
    print(f"msgctl gateway: {message}", file=err)


async def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Long on purpose: one linear flow (UE file, connect, run, progress, report, exit code) that
    reads in the order the user sees it."""
    from msgd.gateway.client import client_context
    from msgd.gateway.errors import ClientError, ConnectionLost, HandshakeError, UeSourceError
    from msgd.gateway.reconnecting import Backoff, GatewaySession
    from msgd.gateway.ue_file import GatewayConfigError, read_ues, scan_ues

    host, port = args.server
    only = frozenset(args.only) if args.only else None
    try:
        for what, path in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca)):
            if not os.access(path, os.R_OK):
                raise TLSSetupError(f"{what} {path}: cannot read "
                                    f"({'no such file' if not path.exists() else 'permission'})")
        ssl_context = client_context(str(args.cert), str(args.key), str(args.ca))
    except (TLSSetupError, MsgdError) as exc:
        _fail(err, str(exc))
        return EXIT_USAGE

    total: int | None = None
    if args.ues != "-":
        try:
            scan = scan_ues(args.ues, only=only)
        except GatewayConfigError as exc:
            _fail(err, str(exc))
            return EXIT_USAGE
        if scan.missing:
            _fail(err, f"--only: not in {args.ues}: {_some(scan.missing)}")
            return EXIT_USAGE
        total = scan.count

    session = GatewaySession(
        host, port, ssl_context=ssl_context, server_hostname=args.server_name,
        gateway_type=(GatewayType.LEGACY_3GPP if args.gateway_type == "legacy-3gpp"
                      else GatewayType.NON_3GPP),
        node_name=args.node_name, connect_timeout=args.timeout,
        max_attempts=args.reconnect + 1, busy_retries=args.busy_retries, backoff=Backoff(),
        on_reconnect=lambda where, delay: print(
            f"msgctl gateway: reconnecting to {where} in {delay:.1f} s", file=err))
    try:
        # The first connection is not retried: a wrong address or certificate should say so
        # at once. Reconnects apply once the run has started.
        client = await session.connect(retry=False)
    except ClientError as exc:
        _fail(err, f"cannot connect: {exc}")
        return EXIT_CONNECTION

    if args.mode == "bulk" and not client.bulk_allowed:
        await session.close()
        _fail(err, "the server does not allow bulk for this gateway "
                   "(without --bulk the UEs go one by one)")
        return EXIT_CONNECTION

    registering = args.operation == "register"
    seen: set[str] | None = set() if only is not None and total is None else None
    ues = _selected(read_ues(args.ues, only=only), seen)
    report = _Report(args.operation, total, out, err, json_lines=args.json,
                     progress=not args.no_progress)
    code = EXIT_OK
    stream = (session.bulk_register if registering else session.bulk_deregister)(
        ues, bulk=args.mode != "single")
    try:
        async with contextlib.aclosing(stream) as results:
            async for result in results:
                report.add(result)
    except UeSourceError as exc:
        cause = exc.__cause__
        _fail(err, str(cause) if isinstance(cause, GatewayConfigError) else str(exc))
        report.unanswered(exc.unanswered)
        code = EXIT_USAGE
    except (ConnectionLost, HandshakeError) as exc:
        _fail(err, f"connection to {host}:{port}: {exc}")
        report.unanswered(exc.unanswered)
        code = EXIT_CONNECTION
    except ClientError as exc:
        _fail(err, str(exc))
        report.unanswered(exc.unanswered)
        code = EXIT_CONNECTION
    finally:
        await session.close()
        report.close()
    if code != EXIT_OK:
        # UEs never taken from the file have no result either: name them too, so that
        # --only @FILE resumes exactly what is left.
        try:
            report.unanswered([ue.ue_service_id for ue in ues])
        except GatewayConfigError as exc:
            _fail(err, str(exc))
            code = EXIT_USAGE
    report.summary()
    if report.no_result:
        if args.unanswered is not None:
            _write_lines(args.unanswered, report.no_result)
            print(f"msgctl gateway: {len(report.no_result)} UE Service IDs without a result "
                  f"written to {args.unanswered}; resume with --only @{args.unanswered}",
                  file=err)
        elif not args.json:
            print(f"msgctl gateway: without a result: {_some(report.no_result)}", file=err)
    if seen is not None and only is not None and code == EXIT_OK:
        missing = sorted(only - seen)
        if missing:
            _fail(err, f"--only: not in {args.ues}: {_some(missing)}")
            return EXIT_USAGE
    if code != EXIT_OK:
        return code
    return EXIT_OK if report.failed == 0 else EXIT_FAILURES


def _selected(ues: Iterator[GatewayUe], seen: set[str] | None) -> Iterator[GatewayUe]:
    if seen is None:
        yield from ues
        return
    for ue in ues:
        seen.add(ue.ue_service_id)
        yield ue


def _some(ids: Any, limit: int = 10) -> str:
    ids = list(ids)
    text = ", ".join(ids[:limit])
    return text + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


class _Report:
    """Progress bar, per-UE output and the final summary."""

    def __init__(self, operation: str, total: int | None, out: TextIO, err: TextIO, *,
                 json_lines: bool, progress: bool) -> None:
        from tqdm import tqdm

        self.operation = operation
        self.out = out
        self.err = err
        self.json_lines = json_lines
        self.causes: Counter[str] = Counter()
        self.failures: list[UeResult] = []
        self.failed = 0
        self.done = 0
        self.no_result: list[str] = []
        self.started = time.monotonic()
        # disable=None: tqdm shows nothing when stderr is not a terminal.
        self.bar = tqdm(total=total, unit="UE", desc=operation, file=err, dynamic_ncols=True,
                        disable=None if progress else True, smoothing=0.05)

    def add(self, result: UeResult) -> None:
        self.done += 1
        self.causes[result.cause_name] += 1
        if not result.ok:
            self.failed += 1
            if len(self.failures) < SHOW_FAILURES:
                self.failures.append(result)
        if self.json_lines:
            self.out.write(json.dumps(result.as_dict()) + "\n")
        self.bar.update(1)

    def unanswered(self, ids: list[str]) -> None:
        for uid in ids:
            self.no_result.append(uid)
            self.causes[NO_RESULT] += 1
            if self.json_lines:
                self.out.write(json.dumps({"ue_service_id": uid, "ok": False,
                                           "cause": NO_RESULT, "retry_after": None,
                                           "attempts": None}) + "\n")

    def close(self) -> None:
        self.bar.close()
        with contextlib.suppress(Exception):
            self.out.flush()

    def summary(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        ok = self.causes.get("SUCCESS", 0)
        count = self.done + len(self.no_result)
        stream = self.err if self.json_lines else self.out
        lines = [f"{self.operation}: {count} UEs, {ok} succeeded, {self.failed} failed, "
                 f"{len(self.no_result)} without a result, in {elapsed:.1f} s "
                 f"({self.done / elapsed:.0f} UEs/s)"]
        for cause, n in sorted(self.causes.items(), key=lambda kv: (kv[0] != "SUCCESS", -kv[1])):
            lines.append(f"  {cause:<30} {n}")
        if not self.json_lines and self.failures:
            lines.append("failed:")
            lines.extend(f"  {r.ue_service_id}  {r.cause_name}" for r in self.failures)
            if self.failed > len(self.failures):
                lines.append(f"  ... and {self.failed - len(self.failures)} more "
                             "(--json lists every UE)")
        print("\n".join(lines), file=stream)
