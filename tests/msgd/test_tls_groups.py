"""msgd.tls_groups: msgd offers only the X25519, P-256 and P-384 key-exchange groups.

The server side is checked with real handshakes against msgd's server_context on 127.0.0.1,
made by `openssl s_client -groups ...` (Python's ssl cannot choose a client's groups, and an
independent client keeps the test from trusting the code it checks). The client side is
checked by reading the supported_groups and key_share extensions of the ClientHello that
msgd's client_context writes.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from msgd.errors import TLSSetupError
from msgd.tls import groups as tls_groups
from msgd.tls.contexts import client_context, server_context
from msgd.tls.groups import ALLOWED_GROUPS, restrict_groups, set_groups
from wire.constants import ALPN_PROTOCOL

try:
    from tests.pki import Pki, make_pki
except ModuleNotFoundError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.pki import Pki, make_pki

TIMEOUT = 10.0
# TLS NamedGroup code points (RFC 8446 4.2.7).
CODEPOINTS = {
    "X25519": 0x001D,
    "P-256": 0x0017,
    "P-384": 0x0018,
    "P-521": 0x0019,
    "X448": 0x001E,
    "ffdhe2048": 0x0100,
}
ALLOWED_CODEPOINTS = [CODEPOINTS[name] for name in ALLOWED_GROUPS]
# How `openssl s_client` names the server's key share in "Server Temp Key:".
TEMP_KEY = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tool(name: str, debian_package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"this test needs the `{name}` program: install the Debian package "
                    f"{debian_package!r}")
    return path


# -- a real msgd TLS listener and a real openssl client -----------------------------------


@dataclass
class ServerSide:
    version: str | None = None
    error: BaseException | None = None


@contextmanager
def listener(server_ctx: ssl.SSLContext) -> Iterator[tuple[int, ServerSide]]:
    """Accept one TLS connection on 127.0.0.1 with `server_ctx`; yield (port, outcome)."""
    outcome = ServerSide()
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = sock.accept()
        except OSError as exc:
            outcome.error = exc
            return
        conn.settimeout(TIMEOUT)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                outcome.version = tls.version()
                tls.sendall(b"ok")
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            outcome.error = exc
        finally:
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield sock.getsockname()[1], outcome
    finally:
        thread.join(TIMEOUT)
        sock.close()
    assert not thread.is_alive()


def s_client(pki: Pki, port: int, groups: str) -> subprocess.CompletedProcess[str]:
    """A mutual-TLS 1.3 gateway handshake by `openssl s_client` offering only `groups`."""
    return subprocess.run(
        [
            tool("openssl", "openssl"), "s_client",
            "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-tls1_3", "-groups", groups, "-alpn", ALPN_PROTOCOL,
            "-CAfile", str(pki.ca), "-verify_return_error",
            "-cert", str(pki.gateway_cert("gw1.example")),
            "-key", str(pki.gateway_key("gw1.example")),
        ],
        input="",  # EOF on stdin: s_client closes the connection after the handshake
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize("group", ["X25519", "P-256", "P-384"])
def test_server_accepts_client_offering_only_an_allowed_group(pki: Pki, group: str) -> None:
    with listener(server_context(pki.tls_config())) as (port, server):
        client = s_client(pki, port, group)
    assert client.returncode == 0, client.stdout + client.stderr
    assert server.error is None, server.error
    assert server.version == "TLSv1.3"
    temp_key = re.search(r"^Server Temp Key: (.*)$", client.stdout, re.MULTILINE)
    assert temp_key is not None, client.stdout
    assert TEMP_KEY[group] in temp_key.group(1)


@pytest.mark.parametrize("group", ["X448", "P-521", "ffdhe2048"])
def test_server_refuses_client_offering_only_another_group(pki: Pki, group: str) -> None:
    with listener(server_context(pki.tls_config())) as (port, server):
        client = s_client(pki, port, group)
    output = client.stdout + client.stderr
    assert client.returncode != 0, output
    # The server ends the handshake with a handshake_failure alert (40).
    assert "alert handshake failure" in output, output
    assert "SSL alert number 40" in output, output
    assert isinstance(server.error, ssl.SSLError), server.error
    assert server.version is None
    assert "Server Temp Key" not in client.stdout


def test_server_refuses_other_groups_when_tls12_is_enabled(pki: Pki) -> None:
    # min_version = "1.2" must not widen the TLS 1.3 groups either.
    with listener(server_context(pki.tls_config(min_version="1.2"))) as (port, server):
        client = s_client(pki, port, "X448:P-521")
    assert client.returncode != 0, client.stdout + client.stderr
    assert "SSL alert number 40" in client.stdout + client.stderr
    assert isinstance(server.error, ssl.SSLError), server.error


# -- the gateway client's ClientHello -----------------------------------------------------


def client_hello_groups(ctx: ssl.SSLContext) -> tuple[list[int], list[int]]:
    """(supported_groups, key_share groups) of the ClientHello that `ctx` sends."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    data = outgoing.read()
    assert data[0] == 22 and data[5] == 1, "not a handshake record with a ClientHello"
    body = data[9:]
    pos = 2 + 32  # legacy_version, random
    pos += 1 + body[pos]  # legacy_session_id
    pos += 2 + int.from_bytes(body[pos : pos + 2])  # cipher_suites
    pos += 1 + body[pos]  # legacy_compression_methods
    end = pos + 2 + int.from_bytes(body[pos : pos + 2])
    pos += 2
    extensions: dict[int, bytes] = {}
    while pos < end:
        kind = int.from_bytes(body[pos : pos + 2])
        size = int.from_bytes(body[pos + 2 : pos + 4])
        extensions[kind] = body[pos + 4 : pos + 4 + size]
        pos += 4 + size
    supported = extensions[10]  # supported_groups
    groups = [
        int.from_bytes(supported[i : i + 2])
        for i in range(2, 2 + int.from_bytes(supported[:2]), 2)
    ]
    key_share = extensions[51]  # key_share: (group, length, key)...
    shares, pos = [], 2
    while pos < 2 + int.from_bytes(key_share[:2]):
        shares.append(int.from_bytes(key_share[pos : pos + 2]))
        pos += 4 + int.from_bytes(key_share[pos + 2 : pos + 4])
    return groups, shares


@pytest.mark.parametrize("min_version", ["1.3", "1.2"])
def test_gateway_client_offers_only_allowed_groups(pki: Pki, min_version: str) -> None:
    ctx = client_context(
        pki.gateway_cert("gw1.example"), pki.gateway_key("gw1.example"), pki.ca,
        min_version=min_version,
    )
    groups, shares = client_hello_groups(ctx)
    assert groups == ALLOWED_CODEPOINTS
    assert shares and set(shares) <= set(ALLOWED_CODEPOINTS)


def test_gateway_client_handshakes_with_msgd(pki: Pki) -> None:
    server_ctx = server_context(pki.tls_config())
    client_ctx = client_context(
        pki.gateway_cert("gw1.example"), pki.gateway_key("gw1.example"), pki.ca
    )
    with (
        listener(server_ctx) as (port, server),
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(2) == b"ok"
    assert server.error is None and server.version == "TLSv1.3"


# -- the mechanism ------------------------------------------------------------------------


def test_set_groups_changes_what_a_client_offers() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    assert CODEPOINTS["X448"] in client_hello_groups(ctx)[0]  # OpenSSL's default offers it
    set_groups(ctx, ["P-384", "X448"])
    assert client_hello_groups(ctx)[0] == [CODEPOINTS["P-384"], CODEPOINTS["X448"]]
    restrict_groups(ctx)
    assert client_hello_groups(ctx)[0] == ALLOWED_CODEPOINTS


def test_unknown_group_is_a_setup_error_and_leaves_no_openssl_error() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(TLSSetupError, match=r"returned 0"):
        set_groups(ctx, ["X25519", "no-such-group"])
    # The thread's OpenSSL error queue was emptied: a stale entry could be blamed on a later
    # OpenSSL call made through Python's ssl.
    peek = tls_groups._libssl().ERR_peek_error
    peek.argtypes, peek.restype = [], ctypes.c_ulong
    assert peek() == 0


@pytest.mark.parametrize("groups", [[], ["X25519:X448"], ["X25519", ""]])
def test_malformed_group_lists_are_refused(groups: list[str]) -> None:
    with pytest.raises(TLSSetupError, match="not a list of group names"):
        set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), groups)


def test_look_alike_ssl_ctx_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two contexts with the same options: the pointer check must tell them apart.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert ctx.options == other.options
    real = tls_groups._read_ctx_field
    monkeypatch.setattr(tls_groups, "_read_ctx_field", lambda _ctx: real(other))
    with pytest.raises(TLSSetupError, match="does not follow its options"):
        restrict_groups(ctx)
    assert ctx.options == other.options  # the probe bit was put back


def test_other_openssl_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls_groups, "_lib", None)
    monkeypatch.setattr(tls_groups.ssl, "OPENSSL_VERSION_NUMBER", 0x10101000)
    with pytest.raises(TLSSetupError, match="is version"):
        restrict_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))


def test_server_context_fails_loudly_when_groups_cannot_be_restricted(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable() -> None:
        raise TLSSetupError("TLS groups: cannot reach the OpenSSL functions (test)")

    monkeypatch.setattr(tls_groups, "_libssl", unavailable)
    with pytest.raises(TLSSetupError, match="TLS groups"):
        server_context(pki.tls_config())
    with pytest.raises(TLSSetupError, match="TLS groups"):
        client_context(pki.gateway_cert("gw1.example"), pki.gateway_key("gw1.example"), pki.ca)


def test_native_set_groups_is_used_when_python_has_it() -> None:
    class Native(ssl.SSLContext):
        seen: str | None = None

        def set_groups(self, groups: str) -> None:
            self.seen = groups

    ctx = Native(ssl.PROTOCOL_TLS_SERVER)
    restrict_groups(ctx)
    assert ctx.seen == "X25519:P-256:P-384"


def test_calls_go_to_the_libssl_python_ssl_is_linked_against() -> None:
    import _ssl

    ldd = subprocess.run(
        [tool("ldd", "libc-bin"), _ssl.__file__], capture_output=True, text=True, check=True
    ).stdout
    linked = re.search(r"^\s*libssl\S*\s+=>\s+(\S+)", ldd, re.MULTILINE)
    assert linked is not None, ldd

    class DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    info = DlInfo()
    address = ctypes.cast(tls_groups._libssl().SSL_CTX_ctrl, ctypes.c_void_p)
    assert ctypes.CDLL(None).dladdr(address, ctypes.byref(info)) != 0
    assert Path(info.dli_fname.decode()).resolve() == Path(linked.group(1)).resolve()
