"""`python -m bench --registry postgresql`: msgd nodes on a PostgreSQL registry (issue 14).

A throw-away PostgreSQL on this host (bench/pgcluster.py: Debian's server run as an
unprivileged user, fsync and synchronous_commit on) and real msgd children whose [registry]
is that database. Measured, in this order:

  ceiling   one client process with the same driver as msgd (psycopg 3): INSERT INTO reg(ue,
            gateway, profile) SELECT * FROM unnest(arrays) ON CONFLICT (ue) DO UPDATE ... in
            batches of 10,000 rows, one transaction per batch, synchronous_commit = on, no
            pipelining; the same UE ids as the bulk
  one node  bulk registration of bulk_n UEs through node 1, then their bulk de-registration
  two nodes the same with node 1 and node 2 each taking every other UE, at once (the table is
            vacuumed before each phase that follows a de-registration and before the
            two-node de-registration: a million dead rows would make them measure autovacuum)
  singles   single registrations from `gateways` gateways, half on each node (closed loop)

The UEs, keys, PKI and load generator are the SQLite benchmark's (bench/scenarios.py,
bench/loadgen.py). docs/scale-out.md reads the numbers.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

from bench import scenarios
from bench.hostcpu import CpuMeter
from bench.loadgen import ue_ids
from bench.pgcluster import running_cluster

# The bench cluster: the WAL of a million-row bulk without a checkpoint in the middle, and
# the durability settings msgd requires (fsync, synchronous_commit) left on.
CLUSTER_SETTINGS = (
    "shared_buffers = 1GB",
    "max_wal_size = 8GB",
    "checkpoint_timeout = 30min",
    "wal_buffers = 64MB",
    "fsync = on",
    "synchronous_commit = on",
)
CEILING_BATCH = 10_000
# [registry] keys for the nodes beyond backend and dsn (MSGD_BENCH_PG="max_batch=2000,...").
REGISTRY_SETTINGS: dict[str, str] = dict(
    item.split("=", 1) for item in os.environ.get("MSGD_BENCH_PG", "").split(",") if item)
TARGET_BULK = 50_000


def ceiling(dsn: str, n: int, postgresql_pid: int) -> dict[str, Any]:
    """Rows per second of the issue's raw upsert, batches of 10,000, one transaction each;
    the CPU it took: PostgreSQL's and this process's (the client)."""
    import psycopg

    ids = ue_ids(scenarios.BULK_SEED, n)
    gateways = [scenarios.BULK_GATEWAY] * CEILING_BATCH
    profiles: list[bytes | None] = [None] * CEILING_BATCH
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE reg (ue text PRIMARY KEY, gateway text NOT NULL, "
                     "profile bytea)")
        conn.execute("SET synchronous_commit = on")
        started = time.perf_counter()
        # The client's tree leaves PostgreSQL out (adopted by this process when it runs as
        # a container's PID 1 or a subreaper).
        meter = CpuMeter({"postgresql": [postgresql_pid], "client": [os.getpid()]},
                         exclude={postgresql_pid})
        for first in range(0, n, CEILING_BATCH):
            batch = ids[first:first + CEILING_BATCH]
            with conn.transaction():
                conn.execute(
                    "INSERT INTO reg(ue, gateway, profile) SELECT * FROM "
                    "unnest(%s::text[], %s::text[], %s::bytea[]) ON CONFLICT (ue) DO UPDATE "
                    "SET gateway = excluded.gateway, profile = excluded.profile",
                    (batch, gateways[:len(batch)], profiles[:len(batch)]))
        wall = time.perf_counter() - started
        cpu = meter.read(n)
        conn.execute("DROP TABLE reg")
    return {"rows": n, "wall_s": wall, "rows_per_s": n / wall, "batch": CEILING_BATCH,
            "cpu": cpu}


def _vacuum(dsn: str) -> float:
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) msgd_registration")
    return time.perf_counter() - started


def _rows(dsn: str) -> int:
    """Registrations in the database now: what a phase's answers claim must be there."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM msgd_registration").fetchone()[0]


def _node_config(run: scenarios.Run, dsn: str, name: str) -> scenarios.Run:
    """A Run whose msgd.toml puts the registry in PostgreSQL, node_name `name`."""
    assert run.config_path is not None
    text = run.config_path.read_text()
    text = re.sub(r'\[registry\]\npath = "registry.sqlite"\nsynchronous = "\w+"\n',
                  f'[registry]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
                  + "".join(f"{k} = {v}\n" for k, v in REGISTRY_SETTINGS.items()), text)
    text = text.replace('node_name = "msgd-bench"', f'node_name = "{name}"')
    path = run.dir / f"msgd-{name}.toml"
    path.write_text(text)
    return dataclasses.replace(run, config_path=path)


def _meter(nodes: list[scenarios.Msgd], postgresql_pid: int) -> CpuMeter:
    return CpuMeter({"postgresql": [postgresql_pid], "nodes": [node.pid for node in nodes]})


def _loadgen_cpu(results: list[dict[str, Any]]) -> dict[str, float]:
    """What the load generators used, as they report it (they have ended when it is read)."""
    return {"loadgen": sum(r["loadgen_cpu_s"] for r in results)}


def _bulk_on(nodes: list[scenarios.Msgd], run: scenarios.Run, op: str,
             postgresql_pid: int) -> dict[str, Any]:
    """One bulk of every bulk UE, shared out among `nodes` (every len(nodes)-th UE each),
    all load generators started at once; server CPU summed over the nodes, and where the
    host's CPU went."""
    gens = []
    for index, node in enumerate(nodes):
        part = [index, len(nodes)] if len(nodes) > 1 else None
        gens.append(scenarios.LoadGen(run, node, "bulk", op=op, n=run.sizes.bulk_n,
                                      seed=scenarios.BULK_SEED,
                                      identity=scenarios.BULK_GATEWAY, part=part))
    for gen in gens:
        gen.wait_for("prepared")
    meter = _meter(nodes, postgresql_pid)
    for gen in gens:
        gen.send()
    results = [gen.finish() for gen in gens]
    n = sum(r["n"] for r in results)
    host = meter.read(n, _loadgen_cpu(results))
    wall = max(r["wall_s"] for r in results)
    return {"n": n, "ok": sum(r["ok"] for r in results), "cpu": host,
            "failed": sum(r["failed"] for r in results),
            "causes": [r["causes"] for r in results], "wall_s": wall, "ue_per_s": n / wall,
            "server_cpu_s": host["nodes_s"], "server_cpu_us_per_ue": host["nodes_us_per_ue"],
            "per_node": results}


def _singles(nodes: list[scenarios.Msgd], run: scenarios.Run,
             postgresql_pid: int) -> dict[str, Any]:
    gateways = run.pool_gateways
    share = -(-len(gateways) // len(nodes))
    s = run.sizes
    gens = []
    for index, node in enumerate(nodes):
        mine = gateways[index * share:(index + 1) * share]
        gens.append(scenarios.LoadGen(run, node, "singles", identities=mine, pool=s.pool,
                                      seed=scenarios.POOL_SEED, first_index=index * share,
                                      warmup=s.warmup_s, duration=s.singles_s))
    for gen in gens:
        gen.wait_for("prepared")
    meter = _meter(nodes, postgresql_pid)
    for gen in gens:
        gen.send()
    results = [gen.finish() for gen in gens]
    answered = sum(r["answered"] for r in results)
    host = meter.read(answered, _loadgen_cpu(results))
    return {"gateways": len(gateways), "per_s": sum(r["per_s"] for r in results),
            "cpu": host,
            "ok": sum(r["ok"] for r in results), "answered": answered,
            "p50_ms": max(r["p50_ms"] for r in results),
            "p99_ms": max(r["p99_ms"] for r in results),
            "server_cpu_us_per_ue": host["nodes_us_per_ue"],
            "per_node": results}


def run_postgresql(run: scenarios.Run) -> dict[str, Any]:
    """Every PostgreSQL measurement of the module docstring, on one throw-away cluster."""
    out: dict[str, Any] = {}
    with running_cluster(*CLUSTER_SETTINGS) as cluster:
        out["postgresql"] = cluster.sql("SHOW server_version")[0][0]
        dsn = cluster.dsn(cluster.create_database())
        started = time.perf_counter()
        out["ceiling"] = ceiling(dsn, run.sizes.bulk_n, cluster.pid)
        out["ceiling"]["elapsed_s"] = time.perf_counter() - started
        node1 = scenarios.Msgd(_node_config(run, dsn, "pg-node-1"), "pg-node-1")
        node2 = scenarios.Msgd(_node_config(run, dsn, "pg-node-2"), "pg-node-2")
        try:
            out["ready_s"] = node1.start()
            out["one_node_register"] = _bulk_on([node1], run, "register", cluster.pid)
            out["one_node_register"]["rows_after"] = _rows(dsn)
            out["one_node_deregister"] = _bulk_on([node1], run, "deregister", cluster.pid)
            out["one_node_deregister"]["rows_after"] = _rows(dsn)
            # A million dead rows and their index entries would otherwise make the next bulk
            # measure autovacuum: each phase starts from a vacuumed table (time reported).
            out["vacuum_s"] = _vacuum(dsn)
            node2.start()
            out["two_nodes_register"] = _bulk_on([node1, node2], run, "register", cluster.pid)
            out["two_nodes_register"]["rows_after"] = _rows(dsn)
            out["vacuum2_s"] = _vacuum(dsn)
            out["two_nodes_deregister"] = _bulk_on([node1, node2], run, "deregister", cluster.pid)
            out["two_nodes_deregister"]["rows_after"] = _rows(dsn)
            out["vacuum3_s"] = _vacuum(dsn)
            out["singles"] = _singles([node1, node2], run, cluster.pid)
        finally:
            for node in (node1, node2):
                if node.proc is not None:
                    out[f"{node.name}_stop"] = node.stop()
    return out


def render(results: dict[str, Any]) -> str:
    pg = results["postgresql_registry"]
    ceil = pg["ceiling"]["rows_per_s"]

    def row(name: str, rate: float, cpu: float | None, target: str) -> str:
        cpu_text = f"{cpu:.0f} µs" if cpu is not None else "–"
        return (f"| {name} | {rate:,.0f} UE/s | {ceil:,.0f} rows/s | {rate / ceil:.2f} | "
                f"{cpu_text} | {target} |")

    one = pg["one_node_register"]
    lines = [
        f"PostgreSQL {pg['postgresql']}, {results['sizes']['bulk_n']:,} UEs, same host",
        "",
        "| measurement | msgd | ceiling (same run) | ratio | server CPU/UE | target |",
        "|---|---:|---:|---:|---:|---|",
        row("bulk registration, one node", one["ue_per_s"], one["server_cpu_us_per_ue"],
            f"≥ {TARGET_BULK:,} and ≥ 1.0 × ceiling: "
            + ("yes" if one["ue_per_s"] >= TARGET_BULK and one["ue_per_s"] >= ceil
               else "no")),
        row("bulk de-registration, one node", pg["one_node_deregister"]["ue_per_s"],
            pg["one_node_deregister"]["server_cpu_us_per_ue"], ""),
        row("bulk registration, two nodes at once", pg["two_nodes_register"]["ue_per_s"],
            pg["two_nodes_register"]["server_cpu_us_per_ue"], ""),
        row("bulk de-registration, two nodes at once",
            pg["two_nodes_deregister"]["ue_per_s"],
            pg["two_nodes_deregister"]["server_cpu_us_per_ue"], ""),
        f"| singles, {pg['singles']['gateways']} gateways over two nodes | "
        f"{pg['singles']['per_s']:,.0f} /s (p50 {pg['singles']['p50_ms']:.1f} ms, p99 "
        f"{pg['singles']['p99_ms']:.1f} ms) | | | "
        + (f"{pg['singles']['server_cpu_us_per_ue']:.0f} µs"
           if pg["singles"]["server_cpu_us_per_ue"] else "–") + " | |",
    ]
    lines += ["", f"Where the host's CPU went ({pg['ceiling']['cpu']['cores']} cores; µs of a "
              "core per UE, and cores busy):", "",
              "| phase | PostgreSQL | msgd nodes / the ceiling's client | load generators "
              "| rest | host busy |", "|---|---:|---:|---:|---:|---:|"]

    def cpu_row(name: str, cpu: dict[str, Any], side: str) -> str:
        def cell(key: str) -> str:
            if cpu.get(f"{key}_us_per_ue") is None:  # not in this phase, or nothing counted
                return "–"
            return f"{cpu[f'{key}_us_per_ue']:.1f} µs ({cpu[f'{key}_cores']:.2f})"
        return (f"| {name} | {cell('postgresql')} | {cell(side)} | {cell('loadgen')} | "
                f"{cell('rest')} | {cpu['host_busy_cores']:.2f} |")

    lines.append(cpu_row("ceiling (raw upsert)", pg["ceiling"]["cpu"], "client"))
    for key, name in (("one_node_register", "bulk registration, one node"),
                      ("one_node_deregister", "bulk de-registration, one node"),
                      ("two_nodes_register", "bulk registration, two nodes"),
                      ("two_nodes_deregister", "bulk de-registration, two nodes"),
                      ("singles", "singles, two nodes")):
        lines.append(cpu_row(name, pg[key]["cpu"], "nodes"))
    return "\n".join(lines)
