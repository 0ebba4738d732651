"""The [limits] keys added for hostile peers: frame_timeout, reconnect_limit, reconnect_window.

Written in the style of tests/msgd/test_config.py: defaults, values, and one line naming the
key for each mistake.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from msgd.config import load_config, parse_config
from msgd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

BASE = """\
[tls]
certificate = "server.pem"
private_key = "server.key"
gateway_ca = "ca.pem"

[registry]
path = "registry.sqlite"

[provisioning]
file = "ues.csv"

[limits]
"""


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    for name in ("server.pem", "server.key", "ca.pem", "ues.csv"):
        (tmp_path / name).write_text("placeholder\n")
    return tmp_path


def load(conf_dir: Path, limits: str):
    path = conf_dir / "msgd.toml"
    path.write_text(BASE + limits)
    return load_config(path)


def test_defaults(conf_dir: Path) -> None:
    limits = load(conf_dir, "").limits
    assert limits.frame_timeout == 10.0
    assert (limits.reconnect_limit, limits.reconnect_window) == (60, 10.0)


def test_values(conf_dir: Path) -> None:
    limits = load(conf_dir, "frame_timeout = 0.5\nreconnect_limit = 3\n"
                            "reconnect_window = 2.5\n").limits
    assert (limits.frame_timeout, limits.reconnect_limit, limits.reconnect_window) == (
        0.5, 3, 2.5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("frame_timeout = 0",
         "limits.frame_timeout must be a number of seconds above 0, at most 3600 (got 0)"),
        ("frame_timeout = 3601",
         "limits.frame_timeout must be a number of seconds above 0, at most 3600 (got 3601)"),
        ('frame_timeout = "10"',
         'limits.frame_timeout must be a number of seconds above 0, at most 3600 (got "10")'),
        ("reconnect_limit = 0",
         "limits.reconnect_limit must be an integer from 1 to 4294967295 (got 0)"),
        ("reconnect_limit = 2.5",
         "limits.reconnect_limit must be an integer from 1 to 4294967295 (got 2.5)"),
        ("reconnect_limit = true",
         "limits.reconnect_limit must be an integer from 1 to 4294967295 (got true)"),
        ("reconnect_window = -1",
         "limits.reconnect_window must be a number of seconds above 0, at most 3600 (got -1)"),
        ("reconnect_window = nan",
         "limits.reconnect_window must be a number of seconds above 0, at most 3600 (got nan)"),
        ("reconect_limit = 5",
         "unknown key limits.reconect_limit (did you mean limits.reconnect_limit?)"),
    ],
)
def test_mistakes_name_the_key(conf_dir: Path, line: str, message: str) -> None:
    path = conf_dir / "msgd.toml"
    path.write_text(BASE + line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "\n" not in text and info.value.exit_code == 2
    assert text == f"config {path}: {message}"


def test_example_documents_the_keys_with_their_defaults() -> None:
    example = (REPO / "systemd" / "msgd.toml.example").read_text()
    defaults = parse_config(BASE, Path("/etc/msgd"), check_files=False).limits
    for key in ("frame_timeout", "reconnect_limit", "reconnect_window"):
        match = re.search(rf"^# {key} = (\S+)$", example, re.MULTILINE)
        assert match, f"{key} is not shown in msgd.toml.example"
        assert float(match.group(1)) == getattr(defaults, key)
        # And the example's value parses as that key.
        limits = parse_config(BASE + f"{key} = {match.group(1)}\n", Path("/etc/msgd"),
                              check_files=False).limits
        assert getattr(limits, key) == getattr(defaults, key)
