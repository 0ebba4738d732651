"""`msgctl status|gateways|registry|provision|drain`: admin over the control socket."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(commands: Any) -> None:
    status = commands.add_parser("status", help="daemon status")
    status.set_defaults(func=_todo)


def _todo(args: argparse.Namespace) -> int:
    raise SystemExit("msgctl admin: not implemented yet")
