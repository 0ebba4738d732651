"""`msgctl`: the operator's and the gateway vendor's command line.

    msgctl demo init DIR                      a ready-to-run demo (make run uses it)
    msgctl certs init|gateway|crl ...         dev PKI (msgd.tls.devpki)
    msgctl gateway register|deregister ...    act as a Message Gateway (msgd.cli.gateway)
    msgctl status|gateways|registry|provision|drain|undrain|reload ...
                                              admin over the control socket (msgd.cli.admin)

parse_args(argv) is testable without starting anything; main(argv) returns the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from msgd.cli import admin as cli_admin
from msgd.cli import gateway as cli_gateway


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msgctl", description="msgd command line: demo, certificates, gateway, admin")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="make a demo state directory")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    init = demo_commands.add_parser("init", help="certificates, msgd.toml and provisioned UEs")
    init.add_argument("dir", type=Path, help="state directory (created if missing)")
    init.add_argument("--ues", type=int, default=5, help="provisioned demo UEs (default 5)")
    init.add_argument("--quiet", action="store_true")
    init.set_defaults(func=_demo_init)

    certs = commands.add_parser(
        "certs", help="dev certificates (see certs/README.md)", add_help=False)
    certs.add_argument("args", nargs=argparse.REMAINDER)
    certs.set_defaults(func=_certs)

    cli_gateway.add_parser(commands)
    cli_admin.add_parsers(commands)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def _demo_init(args: argparse.Namespace) -> int:
    from msgd.cli.demo import init_demo

    init_demo(args.dir, ues=args.ues, quiet=args.quiet)
    return 0


def _certs(args: argparse.Namespace) -> int:
    from msgd.tls.devpki import main as certs_main

    return certs_main(args.args)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("msgctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
