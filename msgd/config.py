"""Operator configuration: msgd.toml read into frozen dataclasses and checked before binding.

The TOML layout is the operator contract (systemd/msgd.toml.example shows every key). Each
mistake raises ConfigError with one line that names the key, so the daemon exits with code 2
before it binds a port. Unknown keys are errors too: a typo must not silently fall back to a
default. Relative paths are taken relative to the configuration file's directory.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msgd.errors import ConfigError
from wire.constants import (
    DEFAULT_HELLO_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_FRAME_SIZE_LIMIT,
    NODE_NAME_MAX,
)

__all__ = [
    "Config",
    "ControlConfig",
    "GatewayPolicy",
    "LimitsConfig",
    "LogConfig",
    "MetricsConfig",
    "ProvisioningConfig",
    "RegistryConfig",
    "ServerConfig",
    "TlsConfig",
    "load_config",
    "parse_config",
    "parse_listen",
]

U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
# sockaddr_un.sun_path holds 108 octets including the terminating NUL.
UNIX_PATH_MAX = 107
# X.509 ub-common-name: the gateway identity is the client certificate's subject CN.
CN_MAX = 64
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TLS_VERSIONS = ("1.2", "1.3")
SYNCHRONOUS_MODES = ("full", "normal")
REGISTRY_BACKENDS = ("sqlite", "postgresql")
MAX_SECONDS = 3600
MAX_RATIO = 1000.0  # registry.compact_journal_ratio


@dataclass(frozen=True)
class ServerConfig:
    listen: str
    host: str
    port: int
    node_name: str


@dataclass(frozen=True)
class TlsConfig:
    certificate: Path
    private_key: Path
    gateway_ca: Path
    crl: Path | None = None
    min_version: str = "1.3"


@dataclass(frozen=True)
class RegistryConfig:
    path: Path | None  # the SQLite file; None with backend "postgresql" (not used there)
    synchronous: str = "full"
    # Online compaction (msgd/registry/compaction.py): fold the journal into the snapshot
    # once it holds this many changes and this share of the registered UEs, at most once
    # per compact_min_interval seconds. 0 changes: only `msgctl registry compact`.
    compact_journal_changes: int = 100_000
    compact_journal_ratio: float = 0.25
    compact_min_interval: float = 10.0
    backend: str = "sqlite"
    # backend "postgresql" (msgd.registry.postgres; docs/scale-out.md). The DSN may hold a
    # password: it is shown only through postgres.redact_dsn, never as is.
    dsn: str | None = field(default=None, repr=False)
    statement_timeout: float = 5.0
    connect_timeout: float = 5.0
    max_batch: int = 2_000  # a group in flight at most half a connection's bulk_window


@dataclass(frozen=True)
class ProvisioningConfig:
    file: Path


@dataclass(frozen=True)
class LimitsConfig:
    max_bulk_entries: int = 1_000_000
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_outstanding: int = 64
    keepalive_interval: int = DEFAULT_KEEPALIVE_INTERVAL
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    max_connections: int = 10_000
    # Unanswered bulk entries per connection before the server stops reading (wire-v1 §5).
    bulk_window: int = 4096
    shutdown_grace: float = 10.0
    # Queued-but-unwritten registry changes; above this, entries fail with SERVER_BUSY.
    max_pending_writes: int = 200_000
    # A frame must arrive whole within this many seconds of its first octet, or the
    # connection is closed (a slow drip must not hold a connection; docs/protocol.md).
    frame_timeout: float = 10.0
    # Reconnect-storm damping: sessions one gateway identity may open within
    # reconnect_window seconds; further HELLOs get GOODBYE(OVERLOADED) with Retry after.
    reconnect_limit: int = 60
    reconnect_window: float = 10.0


@dataclass(frozen=True)
class OverloadConfig:
    """[overload]: when msgd refuses new work rather than queue it (docs/protocol.md §7)."""

    enabled: bool = True
    # Seconds of queued work (writer queue and answers owed, at the measured drain rate)
    # above which new entries get SERVER_BUSY.
    max_delay: float = 0.25
    # Event-loop lag (seconds) above which new work is refused whatever the queue holds.
    max_loop_lag: float = 0.05
    # Backlog always admitted, whatever the measured drain rate (a daemon just started has no
    # measurement yet); two full bulk windows, so that a bulk or two alone is never refused.
    min_backlog: int = 8192
    # Bounds of the Retry after msgd computes (seconds).
    min_retry_after: float = 0.05
    max_retry_after: float = 30.0
    # Seconds without a refusal before an overload episode ends (log line, metric, and new
    # sessions accepted again: during one, HELLO gets GOODBYE(OVERLOADED)).
    quiet: float = 1.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None
    host: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class ControlConfig:
    socket: Path | None = None


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class GatewayPolicy:
    identity: str
    # False: a trusted gateway (TS 33.501 Y.6); UE credentials are then optional.
    ue_authentication: bool = True
    bulk_allowed: bool = True


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    tls: TlsConfig
    registry: RegistryConfig
    provisioning: ProvisioningConfig
    limits: LimitsConfig
    metrics: MetricsConfig
    control: ControlConfig
    log: LogConfig
    gateways: dict[str, GatewayPolicy]
    path: Path | None = None
    overload: OverloadConfig = OverloadConfig()


def parse_listen(text: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into (host, port); ValueError says what is wrong.

    Port 0 is accepted so tests can ask the kernel for a free port.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError("must be HOST:PORT, with an IPv6 address as [ADDRESS]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("must have an IPv6 address inside [ ], as [::1]:7554") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError("must be HOST:PORT")
        if ":" in host:
            raise ValueError("must have an IPv6 address in brackets, as [ADDRESS]:PORT")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > U16_MAX:
        raise ValueError("must end in a port number from 0 to 65535")
    return host, int(port_text)


def load_config(path: Path | str) -> Config:
    """Read and check the configuration file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: not UTF-8 text") from None
    return parse_config(text, path.parent, path=path)


def parse_config(
    text: str, base_dir: Path, *, path: Path | None = None, check_files: bool = True
) -> Config:
    """Parse configuration text; relative paths are taken relative to `base_dir`.

    `check_files=False` skips the checks that named files exist (for tools that only need
    the layout, such as msgctl finding the control socket).
    """
    reader = _Reader(path, Path(base_dir), check_files)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise reader.error(f"not valid TOML: {exc}") from None
    return reader.config(data, path)


def _show(value: Any) -> str:
    """Render a configured value for an error message, TOML-like and short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "an array"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Reader:
    """Turns the parsed TOML into dataclasses; every problem becomes one ConfigError line."""

    def __init__(self, path: Path | None, base_dir: Path, check_files: bool) -> None:
        self.prefix = f"config {path}" if path is not None else "config"
        self.base_dir = base_dir
        self.check_files = check_files

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.prefix}: {message}")

    def bad(self, key: str, expectation: str, value: Any) -> ConfigError:
        return self.error(f"{key} must be {expectation} (got {_show(value)})")

    # -- structure ------------------------------------------------------------------------

    def table(self, data: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> dict:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.bad(name, "a table", value)
        self.known(value, name, allowed)
        return value

    def known(self, table: Mapping[str, Any], section: str, allowed: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean {section}.{hint[0]}?)" if hint else ""
                raise self.error(f"unknown key {section}.{key}{suggestion}")

    # -- scalar values --------------------------------------------------------------------

    def integer(
        self, table: Mapping[str, Any], key: str, name: str, default: int | None, lo: int, hi: int
    ) -> int:
        value = table.get(name, default)
        if value is None:
            raise self.error(f"{key} is required")
        # bool is an int subclass in Python; `true` must not pass as 1.
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.bad(key, f"an integer from {lo} to {hi}", value)
        return value

    def seconds(
        self, table: Mapping[str, Any], key: str, name: str, default: float, *, zero_ok: bool
    ) -> float:
        value = table.get(name, default)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        in_range = number and math.isfinite(value) and 0 <= value <= MAX_SECONDS
        if not in_range or (value == 0 and not zero_ok):
            span = f"from 0 to {MAX_SECONDS}" if zero_ok else f"above 0, at most {MAX_SECONDS}"
            raise self.bad(key, f"a number of seconds {span}", value)
        return float(value)

    def number(
        self, table: Mapping[str, Any], key: str, name: str, default: float, hi: float
    ) -> float:
        value = table.get(name, default)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not 0 <= value <= hi:
            raise self.bad(key, f"a number from 0 to {hi:g}", value)
        return float(value)

    def boolean(self, table: Mapping[str, Any], key: str, name: str, default: bool) -> bool:
        value = table.get(name, default)
        if not isinstance(value, bool):
            raise self.bad(key, "true or false", value)
        return value

    def string(
        self, table: Mapping[str, Any], key: str, name: str, default: str | None = None
    ) -> str:
        value = table.get(name, default)
        if value is None:
            raise self.error(f"{key} is required")
        if not isinstance(value, str) or not value:
            raise self.bad(key, "a non-empty string", value)
        return value

    def choice(
        self, table: Mapping[str, Any], key: str, name: str, default: str, options: tuple[str, ...]
    ) -> str:
        value = table.get(name, default)
        if not isinstance(value, str) or value.lower() not in options:
            quoted = [f'"{option}"' for option in options]
            listed = ", ".join(quoted[:-1]) + " or " + quoted[-1]
            hint = ", as a quoted string" if isinstance(value, int | float) else ""
            raise self.bad(key, f"one of {listed}{hint}", value)
        return value.lower()

    def text(self, table: Mapping[str, Any], key: str, name: str, default: str, limit: int) -> str:
        value = self.string(table, key, name, default)
        if len(value.encode("utf-8")) > limit or any(_is_control(ch) for ch in value):
            raise self.bad(key, f"1 to {limit} UTF-8 octets without control characters", value)
        return value

    def listen(
        self, table: Mapping[str, Any], key: str, name: str, default: str | None
    ) -> tuple[str, str, int] | None:
        value = table.get(name, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.bad(key, 'a string "HOST:PORT"', value)
        try:
            host, port = parse_listen(value)
        except ValueError as exc:
            raise self.error(f"{key} {exc} (got {_show(value)})") from None
        return value, host, port

    def path(
        self,
        table: Mapping[str, Any],
        key: str,
        name: str,
        *,
        required: bool,
        must_exist: bool = False,
        default: str | None = None,
    ) -> Path | None:
        value = table.get(name, default)
        if value is None:
            if required:
                raise self.error(f"{key} is required")
            return None
        if not isinstance(value, str) or not value or "\0" in value:
            raise self.bad(key, "a file path string", value)
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        if must_exist and self.check_files:
            # Say which key names the missing file: "server.pem missing" alone is a riddle.
            if not path.exists():
                raise self.error(f"{key}: file {path} does not exist")
            if not path.is_file():
                raise self.error(f"{key}: {path} is not a regular file")
            if not os.access(path, os.R_OK):
                raise self.error(f"{key}: file {path} is not readable by this user")
        return path

    # -- sections -------------------------------------------------------------------------

    def config(self, data: dict[str, Any], path: Path | None) -> Config:
        self.known_top(data)
        return Config(
            server=self.server(data),
            tls=self.tls(data),
            registry=self.registry(data),
            provisioning=self.provisioning(data),
            limits=self.limits(data),
            metrics=self.metrics(data),
            control=self.control(data),
            log=self.log(data),
            gateways=self.gateways(data),
            path=path,
            overload=self.overload(data),
        )

    def known_top(self, data: Mapping[str, Any]) -> None:
        for key in data:
            if key not in _SECTIONS:
                hint = difflib.get_close_matches(key, _SECTIONS, n=1)
                suggestion = f" (did you mean {hint[0]}?)" if hint else ""
                raise self.error(f"unknown section or key {key}{suggestion}")

    def server(self, data: Mapping[str, Any]) -> ServerConfig:
        table = self.table(data, "server", ("listen", "node_name"))
        listen = self.listen(table, "server.listen", "listen", "127.0.0.1:7554")
        assert listen is not None  # there is a default
        node_name = self.text(table, "server.node_name", "node_name", "msgd", NODE_NAME_MAX)
        return ServerConfig(listen=listen[0], host=listen[1], port=listen[2], node_name=node_name)

    def tls(self, data: Mapping[str, Any]) -> TlsConfig:
        table = self.table(
            data, "tls", ("certificate", "private_key", "gateway_ca", "crl", "min_version")
        )
        files: dict[str, Path] = {}
        for name in ("certificate", "private_key", "gateway_ca"):
            found = self.path(table, f"tls.{name}", name, required=True, must_exist=True)
            assert found is not None  # required
            files[name] = found
        crl = self.path(table, "tls.crl", "crl", required=False, must_exist=True)
        # wire-v1 §1: TLS 1.3, 1.2 only when configured, never lower.
        min_version = self.choice(table, "tls.min_version", "min_version", "1.3", TLS_VERSIONS)
        return TlsConfig(crl=crl, min_version=min_version, **files)

    def registry(self, data: Mapping[str, Any]) -> RegistryConfig:
        table = self.table(data, "registry", _REGISTRY_KEYS)
        backend = self.choice(table, "registry.backend", "backend", "sqlite", REGISTRY_BACKENDS)
        if backend == "postgresql":
            return self.postgresql_registry(table)
        for name in ("dsn", "statement_timeout", "connect_timeout", "max_batch"):
            if name in table:
                raise self.error(f'registry.{name} is only used with backend = "postgresql"')
        path = self.path(table, "registry.path", "path", required=True)
        assert path is not None  # required
        if self.check_files and not path.parent.is_dir():
            raise self.error(f"registry.path: directory {path.parent} does not exist")
        synchronous = self.choice(
            table, "registry.synchronous", "synchronous", "full", SYNCHRONOUS_MODES
        )
        d = RegistryConfig(path=path)
        return RegistryConfig(
            path=path,
            synchronous=synchronous,
            compact_journal_changes=self.integer(
                table, "registry.compact_journal_changes", "compact_journal_changes",
                d.compact_journal_changes, 0, U32_MAX),
            compact_journal_ratio=self.number(
                table, "registry.compact_journal_ratio", "compact_journal_ratio",
                d.compact_journal_ratio, MAX_RATIO),
            compact_min_interval=self.seconds(
                table, "registry.compact_min_interval", "compact_min_interval",
                d.compact_min_interval, zero_ok=True),
        )

    def postgresql_registry(self, table: Mapping[str, Any]) -> RegistryConfig:
        for name in ("path", "synchronous", "compact_journal_changes", "compact_journal_ratio",
                     "compact_min_interval"):
            if name in table:
                raise self.error(f'registry.{name} is not used with backend = "postgresql" '
                                 "(remove it)")
        dsn = table.get("dsn")
        if dsn is None:
            raise self.error('registry.dsn is required with backend = "postgresql"')
        # Never echo the value: a DSN may hold a password.
        if not isinstance(dsn, str) or not dsn.strip() or not _dsn_parses(dsn):
            raise self.error("registry.dsn must be a PostgreSQL connection string (URI or "
                             "key=value) that libpq can parse; value not shown")
        return RegistryConfig(
            path=None, backend="postgresql", dsn=dsn,
            statement_timeout=self.seconds(table, "registry.statement_timeout",
                                           "statement_timeout", 5.0, zero_ok=False),
            connect_timeout=self.seconds(table, "registry.connect_timeout", "connect_timeout",
                                         5.0, zero_ok=False),
            max_batch=self.integer(table, "registry.max_batch", "max_batch", 2_000, 1,
                                   1_000_000),
        )

    def provisioning(self, data: Mapping[str, Any]) -> ProvisioningConfig:
        table = self.table(data, "provisioning", ("file",))
        file = self.path(table, "provisioning.file", "file", required=True, must_exist=True)
        assert file is not None  # required
        return ProvisioningConfig(file=file)

    def limits(self, data: Mapping[str, Any]) -> LimitsConfig:
        table = self.table(data, "limits", _LIMIT_KEYS)
        d = LimitsConfig()

        def integer(name: str, lo: int, hi: int) -> int:
            return self.integer(table, f"limits.{name}", name, getattr(d, name), lo, hi)

        def seconds(name: str, *, zero_ok: bool) -> float:
            return self.seconds(table, f"limits.{name}", name, getattr(d, name), zero_ok=zero_ok)

        return LimitsConfig(
            # wire-v1 §3: Maximum bulk entries is a u32, Maximum outstanding a u16.
            max_bulk_entries=integer("max_bulk_entries", 1, U32_MAX),
            max_frame_size=integer("max_frame_size", 1, MAX_FRAME_SIZE_LIMIT),
            max_outstanding=integer("max_outstanding", 1, U16_MAX),
            keepalive_interval=integer("keepalive_interval", 1, U32_MAX),
            hello_timeout=seconds("hello_timeout", zero_ok=False),
            max_connections=integer("max_connections", 1, 10_000_000),
            bulk_window=integer("bulk_window", 1, U32_MAX),
            shutdown_grace=seconds("shutdown_grace", zero_ok=True),
            max_pending_writes=integer("max_pending_writes", 1, U32_MAX),
            frame_timeout=seconds("frame_timeout", zero_ok=False),
            reconnect_limit=integer("reconnect_limit", 1, U32_MAX),
            reconnect_window=seconds("reconnect_window", zero_ok=False),
        )

    def overload(self, data: Mapping[str, Any]) -> OverloadConfig:
        table = self.table(data, "overload", _OVERLOAD_KEYS)
        d = OverloadConfig()

        def seconds(name: str, *, zero_ok: bool) -> float:
            return self.seconds(table, f"overload.{name}", name, getattr(d, name),
                                zero_ok=zero_ok)

        config = OverloadConfig(
            enabled=self.boolean(table, "overload.enabled", "enabled", d.enabled),
            max_delay=seconds("max_delay", zero_ok=False),
            max_loop_lag=seconds("max_loop_lag", zero_ok=False),
            min_backlog=self.integer(table, "overload.min_backlog", "min_backlog",
                                     d.min_backlog, 1, U32_MAX),
            min_retry_after=seconds("min_retry_after", zero_ok=False),
            max_retry_after=seconds("max_retry_after", zero_ok=False),
            quiet=seconds("quiet", zero_ok=True),
        )
        if config.min_retry_after > config.max_retry_after:
            raise self.error("overload.min_retry_after must not exceed "
                             "overload.max_retry_after")
        return config

    def metrics(self, data: Mapping[str, Any]) -> MetricsConfig:
        table = self.table(data, "metrics", ("listen",))
        listen = self.listen(table, "metrics.listen", "listen", None)
        if listen is None:
            return MetricsConfig()
        return MetricsConfig(listen=listen[0], host=listen[1], port=listen[2])

    def control(self, data: Mapping[str, Any]) -> ControlConfig:
        table = self.table(data, "control", ("socket",))
        socket = self.path(table, "control.socket", "socket", required=False)
        if socket is not None and len(os.fsencode(socket)) > UNIX_PATH_MAX:
            raise self.error(
                f"control.socket: path {socket} is longer than the {UNIX_PATH_MAX} octets "
                "a unix socket address can hold"
            )
        return ControlConfig(socket=socket)

    def log(self, data: Mapping[str, Any]) -> LogConfig:
        table = self.table(data, "log", ("level",))
        return LogConfig(level=self.choice(table, "log.level", "level", "info", LOG_LEVELS))

    def gateways(self, data: Mapping[str, Any]) -> dict[str, GatewayPolicy]:
        entries = data.get("gateways", [])
        if not isinstance(entries, list):
            raise self.bad("gateways", "an array of tables, written [[gateways]]", entries)
        policies: dict[str, GatewayPolicy] = {}
        first_index: dict[str, int] = {}
        for index, entry in enumerate(entries):
            section = f"gateways[{index}]"
            if not isinstance(entry, dict):
                raise self.bad(section, "a table, written [[gateways]]", entry)
            self.known(entry, section, ("identity", "ue_authentication", "bulk_allowed"))
            identity = self.string(entry, f"{section}.identity", "identity")
            if (
                len(identity) > CN_MAX
                or identity != identity.strip()
                or any(_is_control(ch) for ch in identity)
            ):
                raise self.bad(
                    f"{section}.identity",
                    f"a certificate common name: 1 to {CN_MAX} characters, no control "
                    "characters or surrounding spaces",
                    identity,
                )
            if identity in policies:
                raise self.error(
                    f"{section}.identity {_show(identity)} duplicates "
                    f"gateways[{first_index[identity]}].identity"
                )
            policies[identity] = GatewayPolicy(
                identity=identity,
                ue_authentication=self.boolean(
                    entry, f"{section}.ue_authentication", "ue_authentication", True
                ),
                bulk_allowed=self.boolean(entry, f"{section}.bulk_allowed", "bulk_allowed", True),
            )
            first_index[identity] = index
        return policies


_SECTIONS = (
    "server",
    "tls",
    "registry",
    "provisioning",
    "limits",
    "overload",
    "metrics",
    "control",
    "log",
    "gateways",
)
_LIMIT_KEYS = tuple(LimitsConfig.__dataclass_fields__)
_OVERLOAD_KEYS = tuple(OverloadConfig.__dataclass_fields__)
_REGISTRY_KEYS = tuple(RegistryConfig.__dataclass_fields__)


def _is_control(ch: str) -> bool:
    # wire-v1 §3: C0 and C1 control characters (and DEL) are not allowed in names.
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F


def _dsn_parses(dsn: str) -> bool:
    """Whether libpq can parse `dsn` (psycopg is imported only for this backend)."""
    try:
        from psycopg import Error
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # no driver: the registry says so when it opens
        return True
    try:
        conninfo_to_dict(dsn)
    except Error:
        return False
    return True
