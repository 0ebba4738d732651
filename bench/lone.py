"""`python -m bench --scenarios lone`: what a single costs the server when it arrives alone.

At a low rate each read holds one request and each answer is a `send` of its own, so a single
costs the server several times what it costs in a full read (the saturated run of
`registered`). This scenario measures the server's CPU per single at each of `lone_rates`
(open loop, 100 gateways, each a Poisson process) and, as the ceiling of the same run, a TLS
echo at the same rates (`bench/tls_echo_floor.py`: uvloop, one answer per request, nothing
else), so the figure is a ratio to what TLS on this machine costs per request. CPU is read
from the process's CPU clock (nanoseconds, bench.hostcpu). Every single is a registration
that the registry journals (the first rate's are new, later ones re-register the pool
through the same gateway: also one journal op each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import tls_echo_floor
from bench.hostcpu import process_cpu_s
from bench.scenarios import POOL_SEED, LoadGen, Msgd, Run

__all__ = ["render", "run_lone"]


def run_lone(run: Run) -> dict[str, Any]:
    sizes = run.sizes
    rates = [float(text) for text in sizes.lone_rates.split(",") if text.strip()]
    out: dict[str, Any] = {"rates": []}
    server = Msgd(run, "L-lone")
    out["ready_s"] = server.start()
    try:
        server.settle()
        for rate in rates:
            gen = LoadGen(run, server, "singles", rate=rate, identities=run.pool_gateways,
                          pool=sizes.pool, seed=POOL_SEED, warmup=sizes.warmup_s,
                          duration=sizes.lone_s)
            gen.wait_for("prepared")
            cpu_before = process_cpu_s(server.pid)
            gen.send()
            result = gen.finish()
            cpu = process_cpu_s(server.pid) - cpu_before
            answered = result["answered"]
            out["rates"].append({
                "rate": rate, "per_s": result["per_s"], "p50_ms": result["p50_ms"],
                "p99_ms": result["p99_ms"], "answered": answered,
                "server_cpu_us_per_single": cpu / answered * 1e6 if answered else None,
            })
    finally:
        out.update({f"server_{k}": v for k, v in server.stop().items()})
    cert, key = Path(run.pki["server_cert"]), Path(run.pki["server_key"])
    for row in out["rates"]:
        floor = tls_echo_floor.measure(row["rate"], len(run.pool_gateways), sizes.lone_s,
                                       cert, key)
        row["tls_echo"] = floor
        ceiling = floor["server_cpu_us_per_request"]
        single = row["server_cpu_us_per_single"]
        row["ratio"] = single / ceiling if single is not None and ceiling else None
    return out


def render(result: dict[str, Any]) -> str:
    lines = [
        "| lone singles (open loop, Poisson) | msgd p50 / p99 | msgd server CPU per single | "
        "TLS echo CPU per request (ceiling) | ratio |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in result["rates"]:
        floor = row["tls_echo"]
        single = row["server_cpu_us_per_single"]
        ratio = row["ratio"]
        if single is None or ratio is None:
            lines.append(f"| {row['rate']:,.0f}/s | n/a (answered {row['answered']}, echo "
                         f"requests {floor['requests']}) | | | |")
            continue
        lines.append(
            f"| {row['rate']:,.0f}/s | {row['p50_ms']:.2f} / {row['p99_ms']:.2f} ms | "
            f"{single:.1f} µs | {floor['server_cpu_us_per_request']:.1f} µs | {ratio:.2f} |")
    return "\n".join(lines)
