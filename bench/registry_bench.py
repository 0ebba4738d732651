"""Registry measurements (not a test): durable registrations/s, raw SQLite baseline, memory.

Prints one JSON object:
  registry_per_s    1,000,000 submit_register() made durable by the writer (one event loop)
  raw_sqlite_per_s  the same number of random 20-40 octet text keys inserted into the obvious
                    `(ue TEXT PRIMARY KEY, ...)` table, batches of 10,000, WAL, same synchronous
  rss_per_ue        RSS growth per registered UE after opening a file holding 1,000,000
  open_s            time of Registry.open() on that file (check + load)
  provisioned_*     per-lookup cost and RSS of provisioning lookups: the read connection (the
                    fallback of Registry.provisioned()) vs a dict of ProvisionedUe
  packed_*          the same for the packed index that msgd keeps (RSS with the id octets)

Usage: python bench/registry_bench.py [--n 1000000] [--synchronous full] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from msgd.registry.packed_index import PackedIndexBuilder
from msgd.registry.provisioning import ProvisionedUe
from msgd.registry.store import Registry

ALPHABET = (string.ascii_letters + string.digits).encode()


def random_ids(n: int, seed: int) -> list[str]:
    """n distinct random ASCII ids of 20-40 octets (the shape of real UE Service IDs)."""
    rng = random.Random(seed)
    ids = {
        bytes(rng.choices(ALPHABET, k=rng.randint(20, 40))).decode() for _ in range(n + n // 100)
    }
    return list(ids)[:n]


async def registry_rate(path: Path, ids: list[str], synchronous: str) -> dict[str, float]:
    registry = Registry.open(path, synchronous=synchronous)
    registry.start(asyncio.get_running_loop())
    batches = 0

    def on_batch(first: int, last: int, ok: bool) -> None:
        nonlocal batches
        batches += 1
        assert ok

    registry.add_listener(on_batch)
    gateways = [f"gateway-{i}.example.net" for i in range(8)]
    started = time.perf_counter()
    seq = 0
    for start in range(0, len(ids), 10_000):
        for i, ue in enumerate(ids[start : start + 10_000], start):
            seq = registry.submit_register(ue, gateways[i & 7], None)
        await asyncio.sleep(0)  # let completions in, as a server would between reads
    await registry.wait_durable(seq)
    elapsed = time.perf_counter() - started
    close_started = time.perf_counter()
    await registry.close()
    return {
        "registry_per_s": round(len(ids) / elapsed),
        "registry_batches": batches,
        "close_with_compaction_s": round(time.perf_counter() - close_started, 3),
    }


def raw_sqlite_rate(path: Path, ids: list[str], synchronous: str) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    conn.execute("CREATE TABLE reg(ue TEXT PRIMARY KEY, gateway TEXT NOT NULL, profile BLOB)")
    started = time.perf_counter()
    for start in range(0, len(ids), 10_000):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO reg VALUES (?, ?, NULL)",
            ((ue, "gateway-1.example.net") for ue in ids[start : start + 10_000]),
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return round(len(ids) / elapsed)


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_open(path: str) -> None:
    """Child process: RSS per UE and open time, away from the parent's garbage."""
    before = rss()
    started = time.perf_counter()
    registry = Registry.open(Path(path))
    opened = time.perf_counter() - started
    count = registry.registered_count()
    per_ue = (rss() - before) / count
    registry.close_sync()
    print(json.dumps({"open_s": round(opened, 3), "rss_per_ue": round(per_ue, 1)}))


def measure_provisioning(path: str, n: int) -> None:
    """Child process: provisioning lookup cost, SQLite read connection vs an in-memory dict."""
    ids = random_ids(n, seed=2)
    key = bytes(32)
    rows = [ProvisionedUe(ue, key, frozenset({"gateway-1.example.net"})) for ue in ids]
    registry = Registry.open(Path(path))
    started = time.perf_counter()
    registry.replace_provisioning(iter(rows))
    replace_s = time.perf_counter() - started
    del rows
    probe = random.Random(3).sample(ids, 200_000)
    started = time.perf_counter()
    for ue in probe:
        registry.provisioned(ue)
    sqlite_us = (time.perf_counter() - started) / len(probe) * 1e6
    base = rss()
    # The alternative: everything in memory (one shared frozenset, as a cache would share it).
    shared = frozenset({"gateway-1.example.net"})
    table = {ue: ProvisionedUe(ue, os.urandom(32), shared) for ue in ids}
    dict_rss = (rss() - base) / n
    started = time.perf_counter()
    for ue in probe:
        table.get(ue)
    dict_us = (time.perf_counter() - started) / len(probe) * 1e6
    registry.close_sync()
    print(
        json.dumps(
            {
                "provisioning_replace_s": round(replace_s, 2),
                "provisioned_sqlite_us": round(sqlite_us, 2),
                "provisioned_dict_us": round(dict_us, 3),
                "provisioned_dict_rss_per_ue": round(dict_rss, 1),
            }
        )
    )


def measure_packed(n: int) -> None:
    """Child process: RSS and lookup cost of the packed provisioning index msgd keeps."""
    ids = random_ids(n, seed=2)
    probe = [ue.encode().decode() for ue in random.Random(3).sample(ids, 200_000)]
    base = rss()
    builder = PackedIndexBuilder(n)
    for ue in ids:
        builder.add(ue, os.urandom(32), 0)
    index = builder.finish([frozenset({"gateway-1.example.net"})])
    packed_rss = (rss() - base) / n
    started = time.perf_counter()
    for ue in probe:
        index.get(ue)
    packed_us = (time.perf_counter() - started) / len(probe) * 1e6
    print(json.dumps({"packed_us": round(packed_us, 3),
                      "packed_rss_per_ue": round(packed_rss, 1)}))


def child(function: str, *args: object) -> dict[str, float]:
    code = f"from bench.registry_bench import {function}; {function}(*{args!r})"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--synchronous", default="full", choices=("full", "normal"))
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ids = random_ids(args.n, seed=1)
        result: dict[str, object] = {"n": args.n, "synchronous": args.synchronous}
        registry_path = Path(tmp, "registry.sqlite")
        result.update(asyncio.run(registry_rate(registry_path, ids, args.synchronous)))
        result["raw_sqlite_per_s"] = raw_sqlite_rate(Path(tmp, "raw.sqlite"), ids, args.synchronous)
        result["speedup"] = round(result["registry_per_s"] / result["raw_sqlite_per_s"], 2)
        del ids
        result.update(child("measure_open", str(registry_path)))
        result.update(child("measure_provisioning", str(Path(tmp, "prov.sqlite")), args.n))
        result.update(child("measure_packed", args.n))
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
