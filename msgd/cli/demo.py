"""A ready-to-run demo state directory: dev certificates, msgd.toml and provisioned UEs.

init_demo() is what `make run` (via `msgctl demo init`) uses. It is idempotent: files that
exist are left alone, so a second run keeps the registry, the keys and any edits. Files that
hold keys (private keys, ues.csv, gw1-ues.csv) are 0600.
"""

from __future__ import annotations

import csv
import io
import secrets
import sys
from pathlib import Path
from typing import TextIO

from msgd.tls.devpki import PRIVATE_MODE, PUBLIC_MODE, init_dir, write_file
from wire.constants import ALPN_PROTOCOL

__all__ = ["DEMO_GATEWAYS", "DEMO_LISTEN", "DEMO_METRICS", "demo_summary", "init_demo"]

DEMO_GATEWAYS = ("gw1.example", "gw2.example")
DEMO_LISTEN = "127.0.0.1:7554"
DEMO_METRICS = "127.0.0.1:9554"
UE_GATEWAY = "gw1.example"
KEY_BYTES = 32  # wire-v1 §6: K_ue is 32 octets

_CONFIG = f"""\
# msgd demo configuration, written by `msgctl demo init`. Relative paths are relative to
# this file's directory. See systemd/msgd.toml.example for every key.

[server]
listen = "{DEMO_LISTEN}"
node_name = "msgd-demo"

[tls]
certificate = "certs/server.pem"
private_key = "certs/server.key"
gateway_ca = "certs/ca.pem"
# crl = "certs/crl.pem"        # python -m msgd.tls.devpki crl certs --revoke gw2.example.pem

[registry]
path = "registry.sqlite"

[provisioning]
file = "ues.csv"

[limits]
max_bulk_entries = 1000000
max_frame_size = 65535
max_outstanding = 64
keepalive_interval = 30
hello_timeout = 10

[metrics]
listen = "{DEMO_METRICS}"

[control]
socket = "msgd.ctl"

[log]
level = "info"

# gw1.example proves every UE with its K_ue (the keys are in gw1-ues.csv).
[[gateways]]
identity = "gw1.example"
ue_authentication = true
bulk_allowed = true

# gw2.example is a trusted gateway (TS 33.501 Y.6): UE credentials optional, no bulk.
[[gateways]]
identity = "gw2.example"
ue_authentication = false
bulk_allowed = false
"""


def init_demo(
    state_dir: Path, *, ues: int = 5, quiet: bool = False, out: TextIO | None = None
) -> Path:
    """Create (what is missing of) the demo in `state_dir`; return the msgd.toml path.

    Writes certs/ (CA, server, gw1.example, gw2.example), msgd.toml, ues.csv with `ues`
    UEs ue-0001@gw1.example ... authorised for gw1.example, and gw1-ues.csv holding the
    same keys for the gateway side. Unless `quiet`, prints demo_summary() to `out`
    (default: standard output).
    """
    if ues < 0:
        raise ValueError("ues must not be negative")
    state_dir = Path(state_dir)
    # A new state directory is private: it will hold the registry and the control socket.
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    init_dir(state_dir / "certs", gateways=DEMO_GATEWAYS, keep_existing=True)

    config = state_dir / "msgd.toml"
    if not config.exists():
        write_file(config, _CONFIG.encode(), mode=PUBLIC_MODE)

    server_file = state_dir / "ues.csv"
    gateway_file = state_dir / "gw1-ues.csv"
    # The two files must carry the same keys: whichever exists is the source of the other.
    if server_file.exists():
        rows = _read_keys(server_file)
    elif gateway_file.exists():
        rows = _read_keys(gateway_file)
    else:
        rows = [
            (f"ue-{n:04d}@{UE_GATEWAY}", secrets.token_bytes(KEY_BYTES).hex())
            for n in range(1, ues + 1)
        ]
    if not server_file.exists():
        body = _csv(("ue_service_id", "key", "gateways"), [(ue, k, UE_GATEWAY) for ue, k in rows])
        write_file(server_file, body, mode=PRIVATE_MODE)
    if not gateway_file.exists():
        body = _csv(("ue_service_id", "key"), rows)
        write_file(gateway_file, body, mode=PRIVATE_MODE)

    if not quiet:
        print(demo_summary(state_dir), file=out or sys.stdout)
    return config


def demo_summary(state_dir: Path) -> str:
    """A short human description of a demo directory and how to connect to it."""
    d = Path(state_dir)
    certs = d / "certs"
    count = len(_read_keys(d / "ues.csv")) if (d / "ues.csv").exists() else 0
    return "\n".join(
        [
            f"msgd demo in {d}:",
            f"  config        {d / 'msgd.toml'}",
            f"  certificates  {certs}/ (ca, server, gw1.example, gw2.example; keys 0600)",
            f"  provisioning  {d / 'ues.csv'} ({count} UEs for {UE_GATEWAY})",
            f"  gateway keys  {d / 'gw1-ues.csv'} (the same K_ue, for the gateway tools)",
            f"start:   msgd --config {d / 'msgd.toml'}",
            f"connect: TLS to {DEMO_LISTEN}, ALPN {ALPN_PROTOCOL}, CA {certs / 'ca.pem'},",
            f"         client cert {certs / 'gw1.example.pem'} key {certs / 'gw1.example.key'}",
            f"check:   openssl s_client -connect {DEMO_LISTEN} -alpn {ALPN_PROTOCOL} "
            f"-CAfile {certs / 'ca.pem'} -cert {certs / 'gw1.example.pem'} "
            f"-key {certs / 'gw1.example.key'}",
            f"metrics: http://{DEMO_METRICS}/metrics   control socket: {d / 'msgd.ctl'}",
        ]
    )


def _read_keys(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [(row["ue_service_id"], row["key"]) for row in csv.DictReader(fh)]


def _csv(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")
