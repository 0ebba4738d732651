"""`msgctl gateway`: argument rules without starting anything, then the real command line
against a real msgd made by `msgctl demo init`, as the README tells a new user to run it."""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from msgd.cli.gateway import _run, parse_server, run
from msgd.cli.main import parse_args
from tests.harness import ChildServer, demo_deployment

COMMON = ["--server", "127.0.0.1:7554", "--cert", "c.pem", "--key", "c.key", "--ca", "ca.pem",
          "--ues", "ues.csv"]


def test_parse_args_defaults():
    args = parse_args(["gateway", "register", *COMMON])
    assert args.func is run and args.operation == "register"
    assert args.server == ("127.0.0.1", 7554)
    assert args.cert == Path("c.pem") and args.ues == "ues.csv"
    assert (args.mode, args.only, args.json, args.reconnect, args.busy_retries) == (
        "auto", None, False, 6, 3)
    assert parse_args(["gateway", "deregister", *COMMON, "--single"]).mode == "single"
    assert parse_args(["gateway", "deregister", *COMMON, "--bulk"]).mode == "bulk"


@pytest.mark.parametrize("argv", [
    pytest.param(["gateway", "register", *COMMON, "--bulk", "--single"], id="bulk-and-single"),
    pytest.param(["gateway", "register", *COMMON[2:]], id="no-server"),
    pytest.param(["gateway", "register", *COMMON[:-2]], id="no-ues"),
    pytest.param(["gateway", "register", *COMMON, "--only"], id="only-without-ids"),
    pytest.param(["gateway", "register", *COMMON, "--timeout", "0"], id="zero-timeout"),
    pytest.param(["gateway", "register", *COMMON, "--reconnect", "-1"], id="negative-count"),
    pytest.param(["gateway", "unregister", *COMMON], id="unknown-action"),
    pytest.param(["gateway", *COMMON], id="no-action"),
])
def test_parse_args_refuses(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_server_addresses():
    assert parse_server("gw.example") == ("gw.example", 7554)
    assert parse_server("10.0.0.1:8000") == ("10.0.0.1", 8000)
    assert parse_server("[::1]:9000") == ("::1", 9000)
    assert parse_server("[::1]") == ("::1", 7554)
    for bad in ("h:0", "h:65536", "h:x", "::1", ":80", "[::1", "[::1]x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_server(bad)


def test_only_reads_ids_from_a_file(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("ue-0001@gw1.example\nue-0003@gw1.example\n")
    args = parse_args(["gateway", "register", *COMMON, "--only", "ue-0009@gw1.example",
                       "--only", f"@{ids}"])
    assert args.only == ["ue-0009@gw1.example", "ue-0001@gw1.example", "ue-0003@gw1.example"]


# --- the command against the demo -----------------------------------------------------------


def _msgctl(cwd: Path, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msgd.cli", *argv], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`msgctl demo init state` in a fresh directory, served by a real msgd child process."""
    cwd = tmp_path_factory.mktemp("newuser")
    made = _msgctl(cwd, "demo", "init", "state")
    assert made.returncode == 0, made.stderr
    child = ChildServer(demo_deployment(cwd / "state"))
    child.start()
    try:
        yield cwd, child.port
    finally:
        assert child.terminate() == 0


def _gateway(demo, action: str, *extra: str, server: str | None = None, stdin=None):
    cwd, port = demo
    # Exactly the README's command line (with the test's port instead of 7554).
    return _msgctl(cwd, "gateway", action, "--server", server or f"127.0.0.1:{port}",
                   "--cert", "state/certs/gw1.example.pem",
                   "--key", "state/certs/gw1.example.key",
                   "--ca", "state/certs/ca.pem", "--ues", "state/gw1-ues.csv", *extra,
                   stdin=stdin)


DEMO_UES = [f"ue-{n:04d}@gw1.example" for n in range(1, 6)]


def test_cli_against_the_demo(demo):
    first = _gateway(demo, "register")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0].startswith(
        "register: 5 UEs, 5 succeeded, 0 failed, 0 without a result")
    assert "  SUCCESS" in first.stdout and first.stderr == ""

    again = _gateway(demo, "register", "--json", "--single")
    assert again.returncode == 0, again.stderr
    rows = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["ue_service_id"] for r in rows] == DEMO_UES
    assert all(r["ok"] and r["cause"] is None and r["attempts"] == 1 for r in rows)
    assert "5 succeeded" in again.stderr  # with --json the summary goes to stderr

    some = _gateway(demo, "deregister", "--only", DEMO_UES[0], DEMO_UES[1])
    assert some.returncode == 0, some.stderr
    assert "deregister: 2 UEs, 2 succeeded" in some.stdout

    rest = _gateway(demo, "deregister", "--json")
    assert rest.returncode == 1  # two UEs were no longer registered
    rows = [json.loads(line) for line in rest.stdout.splitlines()]
    assert [(r["ue_service_id"], r["cause"]) for r in rows] == [
        (DEMO_UES[0], "NOT_REGISTERED"), (DEMO_UES[1], "NOT_REGISTERED"),
        *((uid, None) for uid in DEMO_UES[2:])]
    assert "NOT_REGISTERED                 2" in rest.stderr


def test_cli_reads_standard_input(demo):
    cwd, port = demo
    out = _msgctl(cwd, "gateway", "register", "--server", f"127.0.0.1:{port}",
                  "--cert", "state/certs/gw1.example.pem", "--key", "state/certs/gw1.example.key",
                  "--ca", "state/certs/ca.pem", "--ues", "-",
                  stdin=(cwd / "state" / "gw1-ues.csv").read_text())
    assert out.returncode == 0, out.stderr
    assert "register: 5 UEs, 5 succeeded" in out.stdout


def test_cli_refused_connection_is_one_clear_line(demo):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    refused = _gateway(demo, "register", server=f"127.0.0.1:{closed}")
    assert refused.returncode == 3
    assert refused.stderr == (
        f"msgctl gateway: cannot connect: 127.0.0.1:{closed}: connection refused\n")
    assert refused.stdout == ""


@pytest.mark.parametrize(("argv", "code", "message"), [
    pytest.param(["--cert", "state/certs/missing.pem"], 2,
                 "--cert state/certs/missing.pem: cannot read", id="missing-cert"),
    pytest.param(["--cert", "state/certs/ca.pem"], 2, "not usable", id="cert-key-mismatch"),
    pytest.param(["--ues", "bad.csv"], 2, "bad.csv line 2: key must be 64 hex digits",
                 id="bad-ue-file"),
    pytest.param(["--ues", "state/nothing.csv"], 2, "state/nothing.csv: cannot open",
                 id="missing-ue-file"),
    pytest.param(["--only", "nobody@gw1.example"], 2,
                 "--only: not in state/gw1-ues.csv: nobody", id="only-unknown"),
    # gw2.example is a trusted gateway without bulk in the demo configuration.
    pytest.param(["--cert", "state/certs/gw2.example.pem", "--key",
                  "state/certs/gw2.example.key", "--bulk"], 3, "does not allow bulk",
                 id="bulk-refused"),
    pytest.param(["--ca", "state/certs/gw1.example.pem"], 3, "server certificate not accepted",
                 id="wrong-ca"),
])
async def test_cli_errors_are_one_clear_line(demo, monkeypatch, argv, code, message):
    """The command's body in this process (the subprocess path is shown above)."""
    cwd, port = demo
    (cwd / "bad.csv").write_text("ue_service_id,key\nue-0001@gw1.example,00ff\n")
    monkeypatch.chdir(cwd)
    args = parse_args(["gateway", "register", "--server", f"127.0.0.1:{port}",
                       "--cert", "state/certs/gw1.example.pem",
                       "--key", "state/certs/gw1.example.key", "--ca", "state/certs/ca.pem",
                       "--ues", "state/gw1-ues.csv", *argv])
    out, err = io.StringIO(), io.StringIO()
    assert await _run(args, out, err) == code, err.getvalue()
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and message in lines[0], err.getvalue()
    assert out.getvalue() == ""
