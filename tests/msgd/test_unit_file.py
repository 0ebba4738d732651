"""systemd/msgd.service: required directives, a reason for each, systemd-analyze, and MDWE.

The unit is checked by a small parser here and by systemd-analyze verify, the sysusers snippet by
systemd-sysusers. A missing tool fails its test, naming the Debian package (`make test`
installs them first: .ci/debian-deps); it never skips or passes silently.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "msgd.service"

# directive -> the value it must have (None: must be present, any value).
REQUIRED: dict[str, str | None] = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStart": "/usr/bin/msgd --config /etc/msgd/msgd.toml",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "Restart": "on-failure",
    "WatchdogSec": "30",
    "TimeoutStopSec": None,
    "User": "msgd",
    "Group": "msgd",
    "StateDirectory": "msgd",
    "ConfigurationDirectory": "msgd",
    "RuntimeDirectory": "msgd",
    "LimitNOFILE": "65536",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallArchitectures": "native",
    "LockPersonality": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "UMask": "0077",
}


def tool(name: str, debian_package: str) -> str:
    """The path of program `name`; the test fails, naming the package, when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"this test needs the `{name}` program: install the Debian package "
                    f"{debian_package!r} (`make test` does, as root: .ci/debian-deps)")
    return path


def parse_unit(text: str) -> dict[str, list[tuple[str, str, str | None]]]:
    """Sections -> [(directive, value, the comment line just above or None)]."""
    sections: dict[str, list[tuple[str, str, str | None]]] = {}
    current: list[tuple[str, str, str | None]] | None = None
    comment: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            comment = None
        elif line.startswith(("#", ";")):
            comment = line.lstrip("#; ")
        elif re.fullmatch(r"\[[A-Za-z]+\]", line):
            current = sections.setdefault(line[1:-1], [])
            comment = None
        else:
            match = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", line)
            assert match, f"line {number} is not Directive=value: {raw!r}"
            assert current is not None, f"line {number} is outside any section"
            assert not line.endswith("\\"), f"line {number}: keep directives on one line"
            current.append((match[1], match[2].strip(), comment))
            comment = None
    return sections


def test_unit_has_required_directives_each_with_a_reason() -> None:
    sections = parse_unit(UNIT.read_text())
    assert set(sections) == {"Unit", "Service", "Install"}
    service = sections["Service"]
    values: dict[str, list[str]] = {}
    for name, value, comment in service:
        values.setdefault(name, []).append(value)
        # Every [Service] directive says why it is there, on the line above it.
        assert comment, f"{name}={value} has no comment giving the reason"
    for name, wanted in REQUIRED.items():
        assert name in values, f"[Service] lacks {name}="
        if wanted is not None:
            assert values[name][-1] == wanted, f"{name}={values[name][-1]!r}, want {wanted!r}"
    assert any(v.startswith("@system-service") for v in values["SystemCallFilter"])
    assert int(values["TimeoutStopSec"][-1]) > 10, "must exceed limits.shutdown_grace (10 s)"
    assert ("WantedBy", "multi-user.target") in [(n, v) for n, v, _ in sections["Install"]]
    # SIGHUP must be able to re-read key, certificates and provisioning: no start-time copies
    # (LoadCredential=) and a fixed group that may read them (no DynamicUser=).
    assert "LoadCredential" not in values and "DynamicUser" not in values
    assert values["ExecReload"][0].endswith("--check-config")


def syscall_groups(analyze: str) -> dict[str, list[str]]:
    """systemd's system call groups (`systemd-analyze syscall-filter`): name -> members, which
    may name other groups."""
    listing = subprocess.run([analyze, "syscall-filter", "--no-pager"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    members: list[str] = []
    for line in listing.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.split()[0], [])
        elif line.strip() and not line.lstrip().startswith("#"):
            members.append(line.split()[0])
    return groups


def expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    """The system calls of a group (or the one call) `name`."""
    if not name.startswith("@"):
        return {name}
    return set().union(*(expand(member, groups) for member in groups[name]))


def allowed_syscalls(unit_text: str, groups: dict[str, list[str]]) -> set[str]:
    """What the unit's SystemCallFilter= lines allow, in systemd's order: the first (an allow
    list here) sets the list, each later one adds (`NAME ...`) or takes away (`~NAME ...`)."""
    allowed: set[str] | None = None
    for name, value, _reason in parse_unit(unit_text)["Service"]:
        if name != "SystemCallFilter":
            continue
        deny = value.startswith("~")
        calls = set().union(*(expand(item, groups) for item in value.lstrip("~").split()))
        if allowed is None:
            assert not deny, "the unit's filter starts as an allow list"
            allowed = calls
        elif deny:
            allowed -= calls
        else:
            allowed |= calls
    assert allowed is not None
    return allowed


def test_the_filter_lets_the_compaction_worker_lower_its_priority_only() -> None:
    # msgd/registry/compaction_worker.py:lower_priority; refused, the worker would take the
    # event loop's CPU during every compaction. Raising a priority needs CAP_SYS_NICE, which
    # the empty bounding set keeps from every process of the service.
    groups = syscall_groups(tool("systemd-analyze", "systemd"))
    allowed = allowed_syscalls(UNIT.read_text(), groups)
    assert {"setpriority", "sched_setscheduler"} <= allowed
    assert not allowed & (expand("@resources", groups) - {"setpriority", "sched_setscheduler"})
    assert not allowed & expand("@privileged", groups)
    service = dict((n, v) for n, v, _ in parse_unit(UNIT.read_text())["Service"])
    assert service["CapabilityBoundingSet"] == "" and service["RestrictRealtime"] == "yes"
    assert "LimitNICE" not in service, "RLIMIT_NICE above 0 would let it raise priorities"


def test_sysusers_snippet_creates_the_service_user(tmp_path: Path) -> None:
    snippet = REPO / "systemd" / "msgd.sysusers.conf"
    lines = [line.split() for line in snippet.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert [fields[:3] for fields in lines] == [["u", "msgd", "-"]]
    sysusers = tool("systemd-sysusers", "systemd")
    # Applied to an empty root directory: the real /etc is never touched.
    (tmp_path / "etc").mkdir()
    done = subprocess.run([sysusers, f"--root={tmp_path}", "-"], input=snippet.read_text(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    group = (tmp_path / "etc" / "group").read_text().splitlines()
    (user,) = [line.split(":") for line in passwd if line.startswith("msgd:")]
    assert user[5] == "/var/lib/msgd" and user[6].endswith("nologin")
    assert int(user[2]) < 1000, "a system user"
    assert any(line.split(":")[0] == "msgd" and line.split(":")[2] == user[3] for line in group)


def test_unit_parser_catches_a_missing_reason() -> None:
    broken = "[Service]\n# why\nType=notify\nNotifyAccess=main\n"
    (_, _, first), (_, _, second) = parse_unit(broken)["Service"]
    assert first == "why" and second is None


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    # systemd-analyze insists that ExecStart names an existing executable; msgd may not be
    # installed at /usr/bin, so verify a copy that runs it from this checkout.
    unit = tmp_path / "msgd.service"
    text = UNIT.read_text()
    assert text.count("=/usr/bin/msgd ") == 2  # ExecStart= and the ExecReload= check
    unit.write_text(text.replace("=/usr/bin/msgd ", f"={sys.executable} -m msgd "))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    # Unknown or unparsable directives are only warnings (exit code 0): none may appear.
    ours = [line for line in done.stderr.splitlines() if "msgd.service" in line]
    assert ours == [], "\n".join(ours)

    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for msgd\.service: ([0-9.]+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match[1]) <= 2.0, security.stdout


MDWE_CHECK = textwrap.dedent(
    """
    import ctypes, mmap, os, sys
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        sys.exit("W+X mapping allowed: MDWE is not in force")

    # Now what the daemon does: uvloop, TLS handshake with our contexts, keys, SQLite.
    import asyncio, sqlite3, tempfile, uvloop
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from tests.pki import make_pki
    from msgd.tls.contexts import client_context, peer_identity, server_context

    pki = make_pki(Path(tempfile.mkdtemp()))
    sctx = server_context(pki.tls_config())
    cctx = client_context(pki.gateway_cert("gw1.example"), pki.gateway_key("gw1.example"), pki.ca)

    async def main():
        seen = asyncio.get_running_loop().create_future()
        async def handle(reader, writer):
            seen.set_result(peer_identity(writer.get_extra_info("ssl_object")))
            writer.write(b"ok")
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=cctx, server_hostname="localhost")
        assert await reader.readexactly(2) == b"ok"
        assert await seen == "gw1.example"
        writer.close()
        server.close()

    uvloop.run(main())
    db = sqlite3.connect(str(pki.dir / "r.sqlite"))
    db.execute("pragma journal_mode=wal")
    db.execute("create table t (x)")
    db.commit()
    print("ok")
    """
)


def test_memory_deny_write_execute_does_not_break_msgd() -> None:
    # The unit sets MemoryDenyWriteExecute=yes. The kernel's PR_SET_MDWE (Linux >= 6.3)
    # enforces the same rule (no W+X mappings, no exec gained later) on this process tree.
    assert "MemoryDenyWriteExecute=yes" in UNIT.read_text()
    done = subprocess.run(
        [sys.executable, "-c", MDWE_CHECK, str(REPO)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3): cannot check here")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
