"""`msgctl registry migrate [--dry-run]`: bring the PostgreSQL registry's schema up to date.

msgd migrates the schema itself when it starts; this command does it ahead of an upgrade, or
shows with --dry-run what would be applied, without changing anything. It reads [registry]
of msgd.toml (--config) and talks to the database directly, not to a running daemon. The
DSN is shown only without its password.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from msgd.errors import MsgdError

__all__ = ["run_migrate"]


def run_migrate(args: argparse.Namespace) -> int:
    """0: up to date (or, --dry-run, the plan shown); 1: the database refused or is newer
    than this msgd; 2: bad configuration or not a PostgreSQL registry."""
    from msgd.config import load_config

    try:
        config = load_config(args.config)
    except MsgdError as exc:
        print(f"msgctl: {exc}", file=sys.stderr)
        return 2
    if config.registry.backend != "postgresql":
        print(f"msgctl: {args.config}: [registry] backend is {config.registry.backend!r}; "
              "the SQLite registry file is migrated by msgd when it opens it", file=sys.stderr)
        return 2
    import psycopg

    from msgd.registry import pg_schema
    from msgd.registry.postgres import redact_dsn

    shown = redact_dsn(config.registry.dsn or "")
    try:
        with psycopg.connect(config.registry.dsn or "", autocommit=True,
                             connect_timeout=max(1, round(config.registry.connect_timeout))
                             ) as conn:
            plan = pg_schema.migrate(conn, dry_run=args.dry_run)
    except (psycopg.Error, MsgdError) as exc:
        print(f"msgctl: registry {shown}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        "dsn": shown, "dry_run": args.dry_run, "current": plan.current,
        "latest": pg_schema.LATEST_VERSION,
        "migrations": [{"version": m.version, "description": m.description}
                       for m in plan.pending]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if not plan.pending:
        print(f"registry {shown}: schema version {plan.current}, up to date")
        return 0
    verb = "would apply" if args.dry_run else "applied"
    print(f"registry {shown}: schema version {plan.current} -> {plan.target}; {verb}:")
    for line in plan.describe():
        print(f"  {line}")
    if args.dry_run:
        for statement in plan.statements():
            print("\n".join("    " + s for s in statement.strip().splitlines()) + ";")
    return 0
