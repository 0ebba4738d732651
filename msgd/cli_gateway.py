"""`msgctl gateway ...`: act as a Message Gateway (filled in by the gateway CLI work)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    gateway = commands.add_parser("gateway", help="register / de-register UEs as a gateway")
    gateway.set_defaults(func=_todo)


def _todo(args: argparse.Namespace) -> int:
    raise SystemExit("msgctl gateway: not implemented yet")
