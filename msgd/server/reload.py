"""SIGHUP / `msgctl reload`: what a reload reads, what it keeps, what live sessions learn.

The Server runs a reload in two halves (docs/survival.md): `read_inputs` reads and checks
every input and may fail, leaving everything as it was; then, on the loop thread with no await
in between, the server switches to them and applies `recheck` to each live connection
(wire-v1 §4 item 6). These functions hold the decisions; the Server holds the state.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from msgd.config import Config, GatewayPolicy, load_config
from msgd.errors import ConfigError, MsgdError, ProvisioningError, RegistryError, TLSSetupError
from msgd.registry.provisioning import read_provisioning_csv
from msgd.tls.contexts import ServerTls, is_revoked, load_server_tls
from wire.constants import ErrorCause

if TYPE_CHECKING:
    from collections.abc import Mapping

    from msgd.registry.service import RegistryService
    from msgd.server.connection import GatewayConnection

__all__ = ["ReloadFailed", "ReloadInputs", "kept_config", "read_inputs", "recheck"]


class ReloadFailed(MsgdError):
    """An input of the reload is unusable: nothing changed. `part` names which."""

    def __init__(self, part: str, reason: str) -> None:
        super().__init__(reason)
        self.part = part


class ReloadInputs(NamedTuple):
    config: Config
    tls: ServerTls
    provisioned: int  # UEs in the provisioning now committed


async def read_inputs(path: Path | None, registry: RegistryService) -> ReloadInputs:
    """Read the configuration, the TLS files and CRL (each once), and commit the
    provisioning last: after it nothing can fail. Raises ReloadFailed."""
    if path is None:
        raise ReloadFailed("config", "the daemon was not started from a configuration file")
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise ReloadFailed("config", str(exc)) from None
    try:
        tls = load_server_tls(config.tls)
    except TLSSetupError as exc:
        raise ReloadFailed("tls", str(exc)) from None
    try:
        count = await asyncio.to_thread(
            registry.replace_provisioning, read_provisioning_csv(config.provisioning.file)
        )
    except (ProvisioningError, RegistryError, OSError) as exc:
        raise ReloadFailed("provisioning", str(exc)) from None
    return ReloadInputs(config, tls, count)


def kept_config(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration to run with after a reload, and the keys whose new value waits for a
    restart: those read once at start (the listener, the registry file, the metrics listener
    and the control socket) keep their old values."""
    fixed = {"server.listen": (old.server.listen, new.server.listen),
             "registry": (old.registry, new.registry),
             "metrics.listen": (old.metrics.listen, new.metrics.listen),
             "control.socket": (old.control.socket, new.control.socket)}
    restart = sorted(key for key, (was, now) in fixed.items() if was != now)
    kept = dataclasses.replace(
        new,
        server=dataclasses.replace(old.server, node_name=new.server.node_name),
        registry=old.registry,
        metrics=old.metrics,
        control=old.control,
    )
    return kept, restart


def recheck(
    conn: GatewayConnection, tls: ServerTls, gateways: Mapping[str, GatewayPolicy]
) -> str | None:
    """Apply a reload to one live connection; what happened to it (a `sessions_*` counter of
    the reload's result), or None."""
    if conn.session is None:
        return None
    if tls.crl is not None and is_revoked(tls.crl, conn.peer_der()):
        conn.log.warning("gateway.revoked", effect="GOODBYE(GATEWAY_NOT_ALLOWED)")
        conn.revoke("certificate revoked")
        return "sessions_revoked"
    if conn.identity is None or conn.policy is None:
        return None  # no HELLO yet: the identity is checked against the new table then
    policy = gateways.get(conn.identity)
    if policy is None:
        conn.log.warning("gateway.removed", effect="GOODBYE(GATEWAY_NOT_ALLOWED)")
        conn.revoke("gateway removed from configuration")
        return "sessions_removed"
    if policy != conn.policy and not conn.session.goodbye_sent:
        # HELLO ACK announced the old settings: they hold until the session ends.
        conn.log.info("gateway.settings_changed", effect="GOODBYE(NORMAL)")
        conn.goodbye(ErrorCause.NORMAL, "gateway settings changed: reconnect to learn them")
        return "sessions_settings_changed"
    return None
