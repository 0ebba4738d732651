"""Online compaction as an operator sees it: `msgctl registry compact`, `msgctl status`, the
metrics, and the [registry] compact_* keys, against a real msgd process."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from msgd.config import load_config
from msgd.errors import ConfigError
from tests.harness import ChildServer, Deployment, Gw, connect, make_deployment
from tests.ops.msgctl import Msgctl, control_ready

UES = {f"ue-{i}@gw1.example": ["gw1.example"] for i in range(600)}


def _deployment(tmp_path: Path, pki, sock_dir: Path, registry_keys: str) -> Deployment:
    dep = make_deployment(
        tmp_path / "d", pki, ues=UES, gateways=(Gw("gw1.example"),),
        extra=f'[control]\nsocket = "{sock_dir / "ctl"}"\n[metrics]\nlisten = "127.0.0.1:0"\n')
    text = dep.config_path.read_text()
    dep.config_path.write_text(text.replace('[registry]\npath = "registry.sqlite"\n',
                                            f'[registry]\npath = "registry.sqlite"\n'
                                            f"{registry_keys}\n"))
    return dep


def _scrape(child: ChildServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    (address,) = re.findall(r"event=metrics\.listening address=(127\.0\.0\.1:\d+)",
                            child.log_text())[-1:]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    with opener.open(f"http://{address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def _churn(dep: Deployment, child: ChildServer) -> int:
    """600 bulk registrations, 200 de-registrations and 100 single re-registrations."""
    ues = [dep.ue(uid) for uid in UES]
    async with await connect(dep, child.address) as gw:
        assert all([r.ok async for r in gw.bulk_register(ues)])
        assert all([r.ok async for r in gw.bulk_deregister(ues[:200])])
        for ue in ues[:100]:
            assert (await gw.register(ue)).ok
    return 900


async def test_msgctl_registry_compact_and_what_it_shows(tmp_path, pki, sock_dir, capsys):
    dep = _deployment(tmp_path, pki, sock_dir, "compact_journal_changes = 0")  # only by hand
    msgctl = Msgctl(sock_dir / "ctl", capsys)
    child = ChildServer(dep)
    await asyncio.to_thread(child.start)
    await control_ready(child)
    try:
        changes = await _churn(dep, child)
        before = await asyncio.to_thread(_scrape, child)
        assert _value(before, "msgd_registry_journal_changes") == changes
        assert _value(before, "msgd_registry_journal_rows") >= 3
        assert _value(before, "msgd_registry_journal_bytes") > 900 * 20
        assert _value(before, "msgd_registry_file_bytes", file="main") > 0
        assert _value(before, "msgd_registry_compactions_total", result="success") == 0
        assert _value(before, "msgd_registry_last_compaction_timestamp_seconds") is None
        code, out, err = await msgctl("status")
        assert code == 0 and f"journal      {changes} changes in" in out, err

        code, result = await msgctl.json("registry", "compact")
        assert code == 0, result
        assert result["ok"] and result["trigger"] == "manual"
        assert result["changes_folded"] == changes
        assert result["registrations"] == 500
        assert result["before"]["journal"]["changes"] == changes
        assert result["after"]["journal"] == {"changes": 0, "rows": 0, "bytes": 0}
        assert result["garbage_rows_deleted"] >= result["journal_rows_folded"] > 0

        after = await asyncio.to_thread(_scrape, child)
        assert _value(after, "msgd_registry_journal_changes") == 0
        assert _value(after, "msgd_registry_compactions_total", result="success") == 1
        assert _value(after, "msgd_registry_last_compaction_changes") == changes
        ended = _value(after, "msgd_registry_last_compaction_timestamp_seconds")
        assert ended is not None and abs(ended - time.time()) < 60
        assert _value(after, "msgd_registry_last_compaction_duration_seconds") > 0
        assert _value(after, "msgd_registry_compaction_running") == 0
        assert _value(after, "msgd_event_loop_lag_sample_seconds_count") > 0
        code, out, _err = await msgctl("status")
        assert "journal      0 changes in 0 rows" in out and "last compaction" in out

        # Human output; an empty journal has nothing to fold.
        code, out, err = await msgctl("registry", "compact")
        assert code == 0 and out.startswith("nothing to fold"), err
        # What was folded is what a restart finds.
        child.kill9()
        await asyncio.to_thread(child.start)
        assert "500 registrations" in child.log_text().rsplit("event=server.listening", 1)[0]
    finally:
        assert child.terminate() == 0


async def test_compact_keys_start_compactions_on_their_own(tmp_path, pki, sock_dir, capsys):
    dep = _deployment(tmp_path, pki, sock_dir, "compact_journal_changes = 500\n"
                      "compact_journal_ratio = 0\ncompact_min_interval = 3600")
    msgctl = Msgctl(sock_dir / "ctl", capsys)
    child = ChildServer(dep)
    await asyncio.to_thread(child.start)
    await control_ready(child)
    try:
        await _churn(dep, child)
        deadline = time.monotonic() + 20
        # The line of its end, not of its start ("... started: ..."): status counts a
        # compaction once it has succeeded.
        while "online compaction (journal) folded" not in child.log_text():
            assert time.monotonic() < deadline, child.log_text()[-2000:]
            await asyncio.sleep(0.05)  # polling the log for a condition, bounded
        status = (await msgctl.json("status"))[1]["registry"]
        # One on its own, then no more within compact_min_interval however the journal grows.
        assert status["compaction"]["succeeded"] == 1
        assert status["compaction"]["last"]["trigger"] == "journal"
        await _churn(dep, child)
        status = (await msgctl.json("status"))[1]["registry"]
        assert status["compaction"]["succeeded"] == 1 and status["journal"]["changes"] >= 900
        # By hand it runs whatever the interval says.
        code, result = await msgctl.json("registry", "compact")
        assert code == 0 and result["changes_folded"] >= 900
    finally:
        assert child.terminate() == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("compact_journal_changes = -1",
         "registry.compact_journal_changes must be an integer from 0 to 4294967295 (got -1)"),
        ("compact_journal_ratio = -0.5",
         "registry.compact_journal_ratio must be a number from 0 to 1000 (got -0.5)"),
        ('compact_journal_ratio = "half"',
         'registry.compact_journal_ratio must be a number from 0 to 1000 (got "half")'),
        ("compact_min_interval = 3601",
         "registry.compact_min_interval must be a number of seconds from 0 to 3600 (got 3601)"),
        ("compact_journal_rows = 5",
         "unknown key registry.compact_journal_rows (did you mean "
         "registry.compact_journal_ratio?)"),
    ],
)
def test_compact_keys_refused_naming_the_key(tmp_path, pki, sock_dir, line, message):
    dep = _deployment(tmp_path, pki, sock_dir, line)
    with pytest.raises(ConfigError) as info:
        load_config(dep.config_path)
    assert str(info.value) == f"config {dep.config_path}: {message}"


def test_compact_keys_defaults(tmp_path, pki, sock_dir):
    registry = load_config(_deployment(tmp_path, pki, sock_dir, "").config_path).registry
    assert (registry.compact_journal_changes, registry.compact_journal_ratio,
            registry.compact_min_interval) == (100_000, 0.25, 10.0)


def test_example_documents_the_compact_keys_with_their_defaults(tmp_path, pki, sock_dir):
    example = (Path(__file__).resolve().parents[2] / "systemd" / "msgd.toml.example").read_text()
    defaults = load_config(_deployment(tmp_path, pki, sock_dir, "").config_path).registry
    for key in ("compact_journal_changes", "compact_journal_ratio", "compact_min_interval"):
        match = re.search(rf"^# {key} = (\S+)$", example, re.MULTILINE)
        assert match, f"{key} is not shown in msgd.toml.example"
        assert float(match.group(1)) == getattr(defaults, key)
