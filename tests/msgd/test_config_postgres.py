"""[registry] backend = "postgresql": the keys of issue 14, their defaults, and mistakes named
in one line that never shows the DSN (it may hold a password)."""

from __future__ import annotations

from pathlib import Path

import pytest

from msgd.config import load_config
from msgd.errors import ConfigError
from tests.msgd.test_config import BASE, conf_dir  # noqa: F401 - the fixture

PG = BASE.replace('[registry]\npath = "registry.sqlite"\n',
                  '[registry]\nbackend = "postgresql"\n'
                  'dsn = "postgresql://msgd:pw-in-dsn@db1,db2/msgd'
                  '?target_session_attrs=read-write"\n')


def test_postgresql_keys_and_defaults(conf_dir: Path) -> None:  # noqa: F811
    path = conf_dir / "msgd.toml"
    path.write_text(PG)
    registry = load_config(path).registry
    assert registry.backend == "postgresql" and registry.path is None
    assert registry.dsn is not None and registry.dsn.endswith("target_session_attrs=read-write")
    assert (registry.statement_timeout, registry.connect_timeout, registry.max_batch) == (
        5.0, 5.0, 2_000)
    assert "pw-in-dsn" not in repr(registry)
    path.write_text(PG.replace("[provisioning]", "statement_timeout = 2.5\nconnect_timeout = 1\n"
                               "max_batch = 500\n[provisioning]"))
    registry = load_config(path).registry
    assert (registry.statement_timeout, registry.connect_timeout, registry.max_batch) == (
        2.5, 1.0, 500)


def test_sqlite_stays_the_default(conf_dir: Path) -> None:  # noqa: F811
    path = conf_dir / "msgd.toml"
    path.write_text(BASE)
    registry = load_config(path).registry
    assert registry.backend == "sqlite" and registry.path == conf_dir / "registry.sqlite"


@pytest.mark.parametrize(("registry", "message"), [
    ('backend = "postgresql"\n', 'registry.dsn is required with backend = "postgresql"'),
    ('backend = "postgresql"\ndsn = "host=db1 password=pw-in-dsn port=notaport x"\n',
     "registry.dsn must be a PostgreSQL connection string (URI or key=value) that libpq can "
     "parse; value not shown"),
    ('backend = "postgresql"\ndsn = "host=db1"\npath = "r.sqlite"\n',
     'registry.path is not used with backend = "postgresql" (remove it)'),
    ('path = "r.sqlite"\ndsn = "host=db1"\n',
     'registry.dsn is only used with backend = "postgresql"'),
    ('backend = "mysql"\n', 'registry.backend must be one of "sqlite" or "postgresql"'),
])
def test_mistakes_name_the_key_and_hide_the_dsn(
        conf_dir: Path, registry: str, message: str) -> None:  # noqa: F811
    path = conf_dir / "msgd.toml"
    path.write_text(BASE.replace('[registry]\npath = "registry.sqlite"\n',
                                 f"[registry]\n{registry}"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and "pw-in-dsn" not in str(info.value)
