"""`python -m bench.pg_rows [--rows N]`: PostgreSQL's own CPU per registration row.

What a row costs the database's backend, read from its process CPU clock, for fresh UEs
upserted in groups of 2,000 (msgd's `max_batch`), one transaction each, synchronous_commit
on, on a throw-away cluster (bench/pgcluster.py):

  ceiling      the issue's raw upsert into reg(ue, gateway, profile)
  bare         the same upsert into msgd's table shape without the v1.1 sync columns
  table        the same upsert into msgd_registration as migrated (sync columns included)
  decide       msgd_decide_v1, as a node calls it

One JSON line per variant and round, with its ratio to the ceiling of the same round: the
part of a registration that is the database's, apart from the node and the client.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

from bench.hostcpu import process_cpu_s
from bench.pgcluster import running_cluster
from bench.postgres import CLUSTER_SETTINGS

GROUP = 2_000
GATEWAY = "gw-bench-0001.example.org"


def _upsert(table: str, key: str) -> str:
    return (f"INSERT INTO {table} ({key}, gateway, profile) SELECT * FROM "
            "unnest(%b::text[], %b::text[], %b::bytea[]) ON CONFLICT ("
            f"{key}) DO UPDATE SET gateway = excluded.gateway, profile = excluded.profile")


def _variants() -> dict[str, tuple[str, str, Any]]:
    """name -> (statement, its table, the parameters of a group of ids)."""
    def plain(ids: list[str]) -> tuple[Any, ...]:
        return (ids, [GATEWAY] * len(ids), [None] * len(ids))

    def decide(ids: list[str]) -> tuple[Any, ...]:
        n = len(ids)
        return (ids, [GATEWAY] * n, [True] * n, [None] * n, [0] * n, [0] * n, 1)

    return {
        "ceiling": (_upsert("reg", "ue"), "reg", plain),
        "bare": (_upsert("bare", "ue_service_id"), "bare", plain),
        "table": (_upsert("msgd_registration", "ue_service_id"), "msgd_registration", plain),
        "decide": ("SELECT entry, failure FROM msgd_decide_v1(%b, %b, %b, %b, %b, %b, %b)",
                   "msgd_registration", decide),
    }


def measure(rows: int, rounds: int) -> list[dict[str, Any]]:
    import psycopg

    from msgd.registry import pg_schema

    ids = [f"ue-{i:07d}@iot.example.org" for i in range(rows)]
    random.Random(1).shuffle(ids)
    out = []
    with running_cluster(*CLUSTER_SETTINGS) as cluster, \
            psycopg.connect(cluster.dsn(cluster.create_database()), autocommit=True) as conn:
        pg_schema.migrate(conn)
        conn.execute("CREATE TABLE reg (ue text PRIMARY KEY, gateway text NOT NULL, "
                     "profile bytea)")
        conn.execute('CREATE TABLE bare (ue_service_id text COLLATE "C" PRIMARY KEY, '
                     "gateway text NOT NULL, profile bytea)")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        for round_number in range(1, rounds + 1):
            ceiling = None
            for name, (statement, table, params) in _variants().items():
                conn.execute(f"TRUNCATE {table}")
                conn.execute("CHECKPOINT")
                cpu0, wall0 = process_cpu_s(pid), time.perf_counter()
                for first in range(0, rows, GROUP):
                    with conn.transaction():
                        conn.execute(statement, params(ids[first:first + GROUP]), prepare=True)
                wall = time.perf_counter() - wall0
                us = (process_cpu_s(pid) - cpu0) / rows * 1e6
                ceiling = ceiling or us
                result = {"event": "result", "round": round_number, "variant": name,
                          "rows": rows, "group": GROUP, "backend_us_per_row": us,
                          "rows_per_s": rows / wall, "ratio_to_ceiling": us / ceiling}
                print(json.dumps(result), flush=True)
                out.append(result)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_rows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000, help="fresh UEs per variant")
    parser.add_argument("--rounds", type=int, default=2, help="every variant this many times")
    args = parser.parse_args(argv)
    measure(args.rows, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
