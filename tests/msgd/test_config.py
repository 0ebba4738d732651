"""msgd.config: the operator contract, and one clear line naming the key for every mistake."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from msgd.cli.demo import init_demo
from msgd.config import Config, load_config, parse_config, parse_listen
from msgd.errors import ConfigError
from msgd.registry.provisioning import read_provisioning_csv

REPO = Path(__file__).resolve().parents[2]

BASE = """\
[server]
listen = "127.0.0.1:7554"
node_name = "msgd-1"

[tls]
certificate = "server.pem"
private_key = "server.key"
gateway_ca = "ca.pem"

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

[control]

[log]

[[gateways]]
identity = "gw1.example"
ue_authentication = true
bulk_allowed = true
"""

FILES = ("server.pem", "server.key", "ca.pem", "ues.csv", "crl.pem")


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    # load_config only checks that named files exist and are readable; contents are TLS's job.
    for name in FILES:
        (tmp_path / name).write_text("placeholder\n")
    return tmp_path


def write(conf_dir: Path, text: str) -> Path:
    path = conf_dir / "msgd.toml"
    path.write_text(text)
    return path


def load_error(conf_dir: Path, text: str) -> str:
    path = write(conf_dir, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message, "one line per error"
    assert message.startswith(f"config {path}: ")
    assert info.value.exit_code == 2
    return message.removeprefix(f"config {path}: ")


def test_base_config_loads_with_defaults(conf_dir: Path) -> None:
    path = write(conf_dir, BASE)
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.path == path
    assert (cfg.server.host, cfg.server.port, cfg.server.node_name) == ("127.0.0.1", 7554, "msgd-1")
    # Relative paths are relative to the configuration file's directory.
    assert cfg.tls.certificate == conf_dir / "server.pem"
    assert cfg.tls.private_key == conf_dir / "server.key"
    assert cfg.tls.gateway_ca == conf_dir / "ca.pem"
    assert cfg.tls.crl is None
    assert cfg.tls.min_version == "1.3"
    assert cfg.registry.path == conf_dir / "registry.sqlite"
    assert cfg.registry.synchronous == "full"
    assert cfg.provisioning.file == conf_dir / "ues.csv"
    limits = cfg.limits
    assert (limits.max_bulk_entries, limits.max_frame_size, limits.max_outstanding) == (
        1_000_000,
        65_535,
        64,
    )
    assert (limits.keepalive_interval, limits.hello_timeout) == (30, 10.0)
    assert (limits.max_connections, limits.bulk_window) == (10_000, 4096)
    assert (limits.shutdown_grace, limits.max_pending_writes) == (10.0, 200_000)
    assert cfg.metrics.listen is None and cfg.metrics.port is None
    assert cfg.control.socket is None
    assert cfg.log.level == "info"
    assert list(cfg.gateways) == ["gw1.example"]
    policy = cfg.gateways["gw1.example"]
    assert (policy.identity, policy.ue_authentication, policy.bulk_allowed) == (
        "gw1.example",
        True,
        True,
    )


def test_every_optional_key(conf_dir: Path) -> None:
    text = (
        BASE.replace(
            'gateway_ca = "ca.pem"', 'gateway_ca = "ca.pem"\ncrl = "crl.pem"\nmin_version = "1.2"'
        )
        .replace(
            'path = "registry.sqlite"', f'path = "{conf_dir}/db/r.sqlite"\nsynchronous = "NORMAL"'
        )
        .replace(
            "hello_timeout = 10",
            "hello_timeout = 2.5\nmax_connections = 5\nbulk_window = 7\n"
            "shutdown_grace = 0\nmax_pending_writes = 9",
        )
        .replace("[metrics]", '[metrics]\nlisten = "[::1]:9554"')
        .replace("[control]", '[control]\nsocket = "run/msgd.ctl"')
        .replace("[log]", '[log]\nlevel = "debug"')
        + '\n[[gateways]]\nidentity = "gw2.example"\nue_authentication = false\n'
        "bulk_allowed = false\n"
    )
    (conf_dir / "db").mkdir()
    cfg = load_config(write(conf_dir, text))
    assert cfg.tls.crl == conf_dir / "crl.pem"
    assert cfg.tls.min_version == "1.2"
    assert cfg.registry.path == conf_dir / "db" / "r.sqlite"
    assert cfg.registry.synchronous == "normal"
    assert cfg.limits.hello_timeout == 2.5
    assert (cfg.limits.max_connections, cfg.limits.bulk_window) == (5, 7)
    assert (cfg.limits.shutdown_grace, cfg.limits.max_pending_writes) == (0.0, 9)
    assert (cfg.metrics.listen, cfg.metrics.host, cfg.metrics.port) == ("[::1]:9554", "::1", 9554)
    assert cfg.control.socket == conf_dir / "run" / "msgd.ctl"
    assert cfg.log.level == "debug"
    gw2 = cfg.gateways["gw2.example"]
    assert (gw2.ue_authentication, gw2.bulk_allowed) == (False, False)


def test_parse_config_uses_base_dir_and_can_skip_file_checks(tmp_path: Path) -> None:
    cfg = parse_config(BASE, tmp_path / "elsewhere", check_files=False)
    assert cfg.path is None
    assert cfg.tls.certificate == tmp_path / "elsewhere" / "server.pem"
    with pytest.raises(ConfigError, match=r"^config: tls\.certificate: file .* does not exist$"):
        parse_config(BASE, tmp_path / "elsewhere")


def test_example_file_parses() -> None:
    example = REPO / "systemd" / "msgd.toml.example"
    cfg = parse_config(example.read_text(), Path("/etc/msgd"), check_files=False)
    assert cfg.tls.certificate == Path("/etc/msgd/server.pem")
    assert cfg.tls.private_key == Path("/etc/msgd/server.key")
    assert cfg.provisioning.file == Path("/etc/msgd/ues.csv")
    assert cfg.registry.path == Path("/var/lib/msgd/registry.sqlite")
    assert cfg.control.socket == Path("/run/msgd/msgd.ctl")
    assert set(cfg.gateways) == {"gw1.example", "gw2.example"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7554", ("127.0.0.1", 7554)),
        ("[::1]:7554", ("::1", 7554)),
        ("[::]:0", ("::", 0)),
        ("msgd.example:65535", ("msgd.example", 65535)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "::1:7554",
        "[::1]7554",
        "[::1",
        "[nothost]:1",
        "h:65536",
        "h:-1",
        "h:x",
        ":7554",
        "h:",
        "h:٣",
    ],
)
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def sub(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new, 1)


# (configuration text, the whole message after "config PATH: ")
EXACT = [
    pytest.param(
        sub("max_frame_size = 65535", "max_frame_size = 0"),
        "limits.max_frame_size must be an integer from 1 to 16777215 (got 0)",
        id="frame-size-0",
    ),
    pytest.param(
        sub("max_frame_size = 65535", "max_frame_size = 16777216"),
        "limits.max_frame_size must be an integer from 1 to 16777215 (got 16777216)",
        id="frame-size-too-big",
    ),
    pytest.param(
        sub("max_outstanding = 64", "max_outstanding = 65536"),
        "limits.max_outstanding must be an integer from 1 to 65535 (got 65536)",
        id="outstanding-u16",
    ),
    pytest.param(
        sub("max_bulk_entries = 1000000", "max_bulk_entries = true"),
        "limits.max_bulk_entries must be an integer from 1 to 4294967295 (got true)",
        id="bool-is-not-int",
    ),
    pytest.param(
        sub("keepalive_interval = 30", 'keepalive_interval = "30"'),
        'limits.keepalive_interval must be an integer from 1 to 4294967295 (got "30")',
        id="string-is-not-int",
    ),
    pytest.param(
        sub("hello_timeout = 10", "hello_timeout = 0"),
        "limits.hello_timeout must be a number of seconds above 0, at most 3600 (got 0)",
        id="hello-timeout-0",
    ),
    pytest.param(
        sub("[tls]", '[tls]\nmin_version = "1.1"'),
        'tls.min_version must be one of "1.2" or "1.3" (got "1.1")',
        id="tls-1.1",
    ),
    pytest.param(
        sub("[tls]", "[tls]\nmin_version = 1.3"),
        'tls.min_version must be one of "1.2" or "1.3", as a quoted string (got 1.3)',
        id="tls-version-number",
    ),
    pytest.param(
        sub("max_frame_size = 65535", "max_frame_sise = 65535"),
        "unknown key limits.max_frame_sise (did you mean limits.max_frame_size?)",
        id="typo",
    ),
    pytest.param(
        BASE + '\n[[gateways]]\nidentity = "gw1.example"\n',
        'gateways[1].identity "gw1.example" duplicates gateways[0].identity',
        id="duplicate-gateway",
    ),
    pytest.param(
        sub('certificate = "server.pem"\n', ""),
        "tls.certificate is required",
        id="certificate-required",
    ),
    pytest.param(
        sub('file = "ues.csv"\n', ""),
        "provisioning.file is required",
        id="provisioning-required",
    ),
    pytest.param(
        sub("[limits]", "[limit]\nx = 1\n[limits]"),
        "unknown section or key limit (did you mean limits?)",
        id="unknown-section",
    ),
]


@pytest.mark.parametrize(("text", "message"), EXACT)
def test_error_message_exact(conf_dir: Path, text: str, message: str) -> None:
    assert load_error(conf_dir, text) == message


# (configuration text, the key the message must start with)
NAMED = [
    pytest.param(
        sub("hello_timeout = 10", "hello_timeout = nan"), "limits.hello_timeout", id="nan"
    ),
    pytest.param(
        sub("[limits]", "[limits]\nshutdown_grace = -1"), "limits.shutdown_grace", id="grace"
    ),
    pytest.param(sub("[limits]", "[limits]\nbulk_window = 0"), "limits.bulk_window", id="window"),
    pytest.param(
        sub("[limits]", "[limits]\nmax_connections = 0"), "limits.max_connections", id="conns"
    ),
    pytest.param(
        sub("[limits]", "[limits]\nmax_pending_writes = 1.5"),
        "limits.max_pending_writes",
        id="writes",
    ),
    pytest.param(
        sub("keepalive_interval = 30", "keepalive_interval = 0"),
        "limits.keepalive_interval",
        id="ka0",
    ),
    pytest.param(
        sub('path = "registry.sqlite"', 'path = "registry.sqlite"\nsynchronous = "off"'),
        "registry.synchronous",
        id="synchronous",
    ),
    pytest.param(sub("[log]", '[log]\nlevel = "verbose"'), "log.level", id="log-level"),
    pytest.param(
        sub('node_name = "msgd-1"', 'node_name = ""'), "server.node_name", id="name-empty"
    ),
    pytest.param(
        sub('node_name = "msgd-1"', 'node_name = "a\\u0001b"'),
        "server.node_name",
        id="name-control",
    ),
    pytest.param(
        sub('node_name = "msgd-1"', f'node_name = "{"é" * 128}"'), "server.node_name", id="name-256"
    ),
    pytest.param(sub('listen = "127.0.0.1:7554"', 'listen = "nope"'), "server.listen", id="listen"),
    pytest.param(
        sub('listen = "127.0.0.1:7554"', "listen = 7554"), "server.listen", id="listen-int"
    ),
    pytest.param(
        sub("[metrics]", '[metrics]\nlisten = "::1:9554"'), "metrics.listen", id="metrics"
    ),
    pytest.param(
        sub("[control]", f'[control]\nsocket = "{"s" * 120}"'), "control.socket", id="sock"
    ),
    pytest.param(
        sub("bulk_allowed = true", "bulk_alowed = true"),
        "unknown key gateways[0].bulk_alowed",
        id="gateway-typo",
    ),
    pytest.param(
        sub('identity = "gw1.example"\n', ""), "gateways[0].identity is required", id="no-id"
    ),
    pytest.param(
        sub('identity = "gw1.example"', 'identity = " gw1"'), "gateways[0].identity", id="sp"
    ),
    pytest.param(
        sub('identity = "gw1.example"', f'identity = "{"g" * 65}"'),
        "gateways[0].identity",
        id="id-too-long",
    ),
    pytest.param(
        sub("ue_authentication = true", 'ue_authentication = "yes"'),
        "gateways[0].ue_authentication",
        id="auth-not-bool",
    ),
    pytest.param(
        sub("[[gateways]]", "[gateways]"),
        "gateways must be an array of tables",
        id="gateways-table",
    ),
    pytest.param(
        sub("[server]", "server = 5\n[serverx]"), "unknown section or key serverx", id="sec"
    ),
    pytest.param("server = 5\n" + BASE.split("\n", 3)[3], "server must be a table", id="not-table"),
    pytest.param(
        sub('certificate = "server.pem"', 'certificate = "absent.pem"'),
        "tls.certificate: file",
        id="cert-missing",
    ),
    pytest.param(
        sub('private_key = "server.key"', 'private_key = "absent.key"'),
        "tls.private_key: file",
        id="key-missing",
    ),
    pytest.param(
        sub('gateway_ca = "ca.pem"', 'gateway_ca = "absent.pem"'),
        "tls.gateway_ca: file",
        id="ca-missing",
    ),
    pytest.param(sub("[tls]", '[tls]\ncrl = "absent.pem"'), "tls.crl: file", id="crl-missing"),
    pytest.param(
        sub('file = "ues.csv"', 'file = "absent.csv"'), "provisioning.file: file", id="ues"
    ),
    pytest.param(
        sub('certificate = "server.pem"', 'certificate = "."'), "tls.certificate: ", id="dir"
    ),
    pytest.param(
        sub('certificate = "server.pem"', "certificate = 3"),
        "tls.certificate must be",
        id="path-int",
    ),
    pytest.param(
        sub('path = "registry.sqlite"', 'path = "no/such/dir/r.sqlite"'),
        "registry.path: directory",
        id="registry-dir",
    ),
    pytest.param(BASE + "\n[server\n", "not valid TOML", id="toml"),
]


@pytest.mark.parametrize(("text", "key"), NAMED)
def test_error_names_the_key(conf_dir: Path, text: str, key: str) -> None:
    assert load_error(conf_dir, text).startswith(key)


def test_missing_file_message_says_which_path(conf_dir: Path) -> None:
    message = load_error(conf_dir, sub('private_key = "server.key"', 'private_key = "keys/k.pem"'))
    assert message == f"tls.private_key: file {conf_dir / 'keys' / 'k.pem'} does not exist"


def test_unreadable_file(tmp_path: Path) -> None:
    """A key file this user cannot read. Root reads any file, so as root the check runs in a
    forked child that has dropped to an unprivileged uid (real permission check, no skip)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="msgd-unreadable-"))
    try:
        base.chmod(0o755)
        for name in FILES:
            (base / name).write_text("placeholder\n")
            (base / name).chmod(0o644)
        (base / "server.key").chmod(0)
        config = write(base, BASE)
        config.chmod(0o644)
        expected = f"config {config}: tls.private_key: file {base / 'server.key'} is not " \
                   "readable by this user"
        if os.geteuid() != 0:
            with pytest.raises(ConfigError) as info:
                load_config(config)
            assert str(info.value) == expected
            return
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop privileges, report the message, exit without cleanup
            try:
                os.close(read_end)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    load_config(config)
                    message = "loaded"
                except ConfigError as exc:
                    message = str(exc)
                os.write(write_end, message.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode()
        os.waitpid(pid, 0)
        assert message == expected
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config {path}: cannot read: No such file or directory"


def test_zero_gateways_is_allowed(conf_dir: Path) -> None:
    text = BASE.split("[[gateways]]")[0]
    assert load_config(write(conf_dir, text)).gateways == {}


def test_config_is_frozen(conf_dir: Path) -> None:
    cfg = load_config(write(conf_dir, BASE))
    with pytest.raises(AttributeError):
        cfg.limits.max_frame_size = 1  # type: ignore[misc]


# -- the demo directory (msgd.demo) is built for this loader -----------------------------


def test_demo_config_loads_and_is_idempotent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config_path = init_demo(state, ues=3, quiet=True)
    cfg = load_config(config_path)
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 7554)
    assert cfg.registry.path == state / "registry.sqlite"
    assert cfg.provisioning.file == state / "ues.csv"
    assert cfg.control.socket == state / "msgd.ctl"
    assert (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9554)
    assert cfg.gateways["gw1.example"].ue_authentication is True
    assert cfg.gateways["gw1.example"].bulk_allowed is True
    assert "gw2.example" in cfg.gateways
    for name in (
        "ues.csv",
        "gw1-ues.csv",
        "certs/ca.key",
        "certs/server.key",
        "certs/gw1.example.key",
        "certs/gw2.example.key",
    ):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name

    # The server's file parses with the provisioning reader and the gateway's has the same keys.
    rows = list(read_provisioning_csv(cfg.provisioning.file))
    assert [row.ue_service_id for row in rows] == [f"ue-000{n}@gw1.example" for n in (1, 2, 3)]
    assert all(row.gateways == frozenset({"gw1.example"}) for row in rows)
    gateway_lines = (state / "gw1-ues.csv").read_text().splitlines()
    assert gateway_lines[0] == "ue_service_id,key"
    assert gateway_lines[1:] == [f"{row.ue_service_id},{row.key.hex()}" for row in rows]
    assert len({row.key for row in rows}) == 3

    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    init_demo(state, ues=3, quiet=True)
    after = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    assert after == before


def test_demo_rebuilds_missing_gateway_file_from_server_file(tmp_path: Path) -> None:
    init_demo(tmp_path, ues=2, quiet=True)
    original = (tmp_path / "gw1-ues.csv").read_text()
    (tmp_path / "gw1-ues.csv").unlink()
    init_demo(tmp_path, ues=2, quiet=True)
    assert (tmp_path / "gw1-ues.csv").read_text() == original
