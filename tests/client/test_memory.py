"""100,000 UEs through bulk_register against the real msgd child process: the client's own
memory does not grow with the count.

Measured in this (the client's) process, two ways, each compared between a run of 10,000
and a run of 100,000 UEs taken from a generator:

* live Python memory blocks (sys.getallocatedblocks), sampled every 256 results: a client
  that kept one object per UE would end 100,000 runs at least 90,000 blocks higher;
* the peak resident set (VmHWM, reset through /proc/self/clear_refs before each run): kept
  results would cost megabytes.

tracemalloc would say the same but multiplies the client's cost per allocation about
fivefold; these two are free, so the test measures the client at its real speed.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from msgd.gateway import GatewayUe
from tests.harness import ChildServer, connect, make_deployment

KEY = bytes(range(32))
BIG = 100_000
SMALL = 10_000


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


async def _measure(gw, n: int) -> tuple[int, int, int]:
    """(successes, peak extra blocks, peak extra resident octets) of one run of n UEs."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss_before = _status_bytes("VmRSS:")
    blocks_before = sys.getallocatedblocks()
    peak_blocks = blocks_before
    ok = 0
    ues = (GatewayUe(f"m-{i:06d}@gw1.example", KEY) for i in range(n))
    async for result in gw.bulk_register(ues):
        ok += result.ok
        if not ok & 255:
            peak_blocks = max(peak_blocks, sys.getallocatedblocks())
    return ok, peak_blocks - blocks_before, _status_bytes("VmHWM:") - rss_before


async def test_client_memory_does_not_grow_with_the_count(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki)
    lines = ["ue_service_id,key,gateways",
             *(f"m-{i:06d}@gw1.example,{KEY.hex()},gw1.example" for i in range(BIG))]
    (dep.dir / "ues.csv").write_text("\n".join(lines) + "\n")
    del lines
    child = ChildServer(dep)
    child.start()
    try:
        async with await connect(dep, child.address) as gw:
            await _measure(gw, 2_000)  # warm up: allocator arenas, TLS buffers, caches
            small = await _measure(gw, SMALL)
            big = await _measure(gw, BIG)
    finally:
        assert child.terminate() == 0
    print(f"\nclient memory, {SMALL} UEs: +{small[1]} blocks, +{small[2] / 2**20:.2f} MiB RSS;"
          f" {BIG} UEs: +{big[1]} blocks, +{big[2] / 2**20:.2f} MiB RSS")
    assert small[0] == SMALL and big[0] == BIG  # every UE registered
    # Bounded by the window (8192 UEs in flight), not the count: ten times the UEs does not
    # come near ten times the blocks; a client keeping one object per UE would add at least
    # 90,000 blocks and fail both.
    assert big[1] < 3 * max(small[1], 20_000), (small, big)
    assert big[1] - small[1] < 60_000, (small, big)
    # ...and the peak resident set does not climb either (kept results: > 15 MiB).
    assert big[2] < 8 * 2**20, (small, big)
