"""`msgctl gateway sync`: wire v1.1 registry sync from the command line (docs/protocol.md §6).

Prints the UEs missing on the server, those it holds that the file lacks, and those whose
profile differs; with --repair fixes them and says so. Exit 0 when in sync (after repair),
1 when differences remain, 2 for a bad file / certificate, 3 for connection trouble.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

from msgd.errors import MsgdError, TLSSetupError

EXIT_OK, EXIT_DIFFERENCES, EXIT_USAGE, EXIT_CONNECTION = 0, 1, 2, 3


def add_sync_parser(actions: Any, add_connection_options: Any) -> None:
    parser = actions.add_parser(
        "sync", help="compare the server's registrations with a UE file (wire v1.1)",
        description="Compare the UEs the server holds for this gateway with a UE file; "
                    "--repair registers the missing and changed ones and releases the extra.")
    add_connection_options(parser, sync=True)
    parser.add_argument("--repair", action="store_true", help="fix the differences")
    parser.set_defaults(func=run_sync)


def run_sync(args: argparse.Namespace) -> int:
    from msgd.log import setup_logging

    setup_logging("warning", sys.stderr)
    return asyncio.run(_sync(args, sys.stdout, sys.stderr))


async def _sync(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from msgd.gateway.client import GatewayClient, client_context
    from msgd.gateway.errors import ClientError
    from msgd.gateway.ue_file import GatewayConfigError, read_ues

    host, port = args.server
    try:
        ssl_context = client_context(str(args.cert), str(args.key), str(args.ca))
        ues = list(read_ues(args.ues))
    except (TLSSetupError, MsgdError, GatewayConfigError, OSError) as exc:
        print(f"msgctl gateway sync: {exc}", file=err)
        return EXIT_USAGE
    try:
        client = await GatewayClient.connect(host, port, ssl_context=ssl_context,
                                             server_hostname=args.server_name)
    except ClientError as exc:
        print(f"msgctl gateway sync: cannot connect: {exc}", file=err)
        return EXIT_CONNECTION
    try:
        report = await client.sync(ues, repair=args.repair)
    except ClientError as exc:
        print(f"msgctl gateway sync: {exc}", file=err)
        return EXIT_CONNECTION
    finally:
        await client.close()
    failed = [r.ue_service_id for r in report.repaired if not r.ok]
    if args.json:
        json.dump({"missing": report.missing, "extra": report.extra,
                   "profile_differs": report.profile_differs,
                   "repaired": args.repair, "repair_failed": failed}, out)
        out.write("\n")
    else:
        for label, uids in (("missing on the server", report.missing),
                            ("extra on the server", report.extra),
                            ("profile differs", report.profile_differs)):
            for uid in uids:
                print(f"{label}: {uid}", file=out)
        if args.repair and report.repaired:
            print(f"repaired {len(report.repaired) - len(failed)} of "
                  f"{len(report.repaired)}", file=out)
        if report.in_sync:
            print("in sync", file=out)
    if report.in_sync or (args.repair and not failed):
        return EXIT_OK
    return EXIT_DIFFERENCES
