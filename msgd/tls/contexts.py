"""TLS contexts for the gateway interface (wire-v1 §1) and the checks made after a handshake.

The server context requires TLS 1.3 (1.2 only when configured, never lower), a client
certificate chaining to the gateway CA and, when a CRL is configured, not revoked; it offers
ALPN "msgin5g-gw/1". Python's ssl cannot make a server fail a handshake in which the client
offered no ALPN at all, so the daemon calls negotiated_alpn_ok() right after the handshake and
closes the connection when it is False. The gateway identity is the peer certificate's subject
CN (peer_identity). Every problem with the files becomes a TLSSetupError that names the
configuration key and never quotes key material.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from msgd.config import TlsConfig
from msgd.errors import TLSSetupError
from msgd.tls.groups import restrict_groups
from wire.constants import ALPN_PROTOCOL

__all__ = [
    "ServerTls",
    "certificate_not_after",
    "client_context",
    "crl_next_update",
    "days_until_expiry",
    "is_revoked",
    "load_server_tls",
    "negotiated_alpn_ok",
    "peer_identity",
    "server_context",
]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# Only used when TLS 1.2 is enabled (1.3 suites are not set by set_ciphers): forward secret
# AEAD suites, as the TLS 1.3 ones are.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """Everything the listener uses from [tls], built from one read of each file.

    A reload checks this whole object before switching anything, and what it checked is what
    it uses: the context, the CRL that revoked sessions are checked against, and the
    certificate dates for metrics all come from the same octets.
    """

    context: ssl.SSLContext
    crl: x509.CertificateRevocationList | None
    # (role, subject, not_after) of the server chain and every gateway CA (metrics).
    inventory: list[tuple[str, str, dt.datetime]]
    certificate_serial: str


def server_context(tls: TlsConfig, *, now: dt.datetime | None = None) -> ssl.SSLContext:
    """Build the listener's SSLContext from the [tls] configuration; TLSSetupError if unusable.

    `now` (for tests) is the instant against which certificate and CRL dates are checked.
    """
    return load_server_tls(tls, now=now).context


def load_server_tls(tls: TlsConfig, *, now: dt.datetime | None = None) -> ServerTls:
    """Read every [tls] file once, check it, and build the listener's TLS state from those
    octets (OpenSSL is given the same octets through private in-memory files, never the
    path again: a file replaced meanwhile cannot slip in unchecked). TLSSetupError if unusable.

    Long on purpose: read, check and build in one function, so every octet checked is the one
    OpenSSL loads.
    """
    now = now or dt.datetime.now(dt.UTC)
    cert_pem = _read(tls.certificate, "tls.certificate")
    certs = _parse_certificates(cert_pem, tls.certificate, "tls.certificate")
    leaf = certs[0]
    if leaf.not_valid_after_utc < now:
        raise TLSSetupError(
            f"tls.certificate {tls.certificate}: expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    key_pem = _read(tls.private_key, "tls.private_key")
    key = _parse_private_key(key_pem, tls.private_key)
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise TLSSetupError(
            f"tls.private_key {tls.private_key}: does not match tls.certificate {tls.certificate}"
        )
    ca_pem = _read(tls.gateway_ca, "tls.gateway_ca")
    ca_certs = _parse_certificates(ca_pem, tls.gateway_ca, "tls.gateway_ca")
    crl_pem = crl = None
    if tls.crl is not None:
        crl_pem = _read(tls.crl, "tls.crl")
        crl = _parse_crl(crl_pem, tls.crl)
        _check_crl(crl, tls.crl, ca_certs, now)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = _VERSIONS.get(tls.min_version)
    if version is None:
        raise TLSSetupError(f'tls.min_version must be "1.2" or "1.3" (got {tls.min_version!r})')
    ctx.minimum_version = version
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(_TLS12_CIPHERS)
    # No TLS 1.2 renegotiation (a DoS lever); no compression (CRIME).
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    # No session tickets: gateway connections are long-lived, so resumption saves little, and
    # a resumed session would skip the CRL check of the certificate it was made with.
    ctx.num_tickets = 0
    # wire-v1 §1: mutual authentication; the client certificate must chain to the gateway CA.
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        with _memory_file(cert_pem) as cert_path, _memory_file(key_pem) as key_path:
            ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        # The library message for a key can mention the PEM data; give our own words instead.
        raise TLSSetupError(
            f"tls.certificate / tls.private_key: OpenSSL refused the pair ({_reason(exc)})"
        ) from None
    try:
        # The certificates parsed and checked above, as DER: what was checked is what loads
        # (and a bundle with non-ASCII comment lines loads as it did from a file).
        ctx.load_verify_locations(cadata=b"".join(
            ca.public_bytes(serialization.Encoding.DER) for ca in ca_certs))
    except (ssl.SSLError, OSError) as exc:
        raise TLSSetupError(
            f"tls.gateway_ca {tls.gateway_ca}: not usable ({_reason(exc)})"
        ) from None
    if crl_pem is not None:
        try:
            # load_verify_locations reads CRLs as well as certificates from a PEM file (cadata
            # takes certificates only).
            with _memory_file(crl_pem) as crl_path:
                ctx.load_verify_locations(cafile=crl_path)
        except (ssl.SSLError, OSError) as exc:
            raise TLSSetupError(f"tls.crl {tls.crl}: not usable ({_reason(exc)})") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    restrict_groups(ctx)
    inventory = [
        ("server" if index == 0 else "server_chain", cert.subject.rfc4514_string(),
         cert.not_valid_after_utc)
        for index, cert in enumerate(certs)
    ] + [("gateway_ca", ca.subject.rfc4514_string(), ca.not_valid_after_utc) for ca in ca_certs]
    return ServerTls(ctx, crl, inventory, f"{leaf.serial_number:x}")


def is_revoked(crl: x509.CertificateRevocationList | None, peer_der: bytes | None) -> bool:
    """Whether `crl` revokes the certificate (DER) a peer connected with. Serial numbers are
    unique per issuer only, so the issuer must be the CRL's too. A certificate OpenSSL took
    but that cannot be parsed here counts as revoked: unproven is not allowed (fail closed)."""
    if crl is None or not peer_der:
        return False
    try:
        cert = x509.load_der_x509_certificate(peer_der)
    except ValueError:
        return True
    if cert.issuer != crl.issuer:
        return False
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def client_context(
    cert: Path | str | None,
    key: Path | str | None,
    ca: Path | str,
    *,
    check_hostname: bool = True,
    min_version: str = "1.3",
    alpn_protocols: Sequence[str] = (ALPN_PROTOCOL,),
) -> ssl.SSLContext:
    """Build a gateway's SSLContext: verify the server against `ca`, present cert/key.

    cert and key None means no client certificate (the server refuses that; useful in tests).
    """
    version = _VERSIONS.get(min_version)
    if version is None:
        raise TLSSetupError(f'min_version must be "1.2" or "1.3" (got {min_version!r})')
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = version
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TLSSetupError(f"CA file {ca}: not usable ({_reason(exc)})") from None
    if (cert is None) != (key is None):
        raise TLSSetupError("a client certificate needs both the certificate and the key file")
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise TLSSetupError(
                f"client certificate {cert} with key {key}: not usable ({_reason(exc)})"
            ) from None
    if alpn_protocols:
        ctx.set_alpn_protocols(list(alpn_protocols))
    if os.environ.get("SSLKEYLOGFILE"):  # as ssl.create_default_context: for Wireshark only
        ctx.keylog_filename = os.environ["SSLKEYLOGFILE"]  # (docs/wireshark.md); unset: none
    restrict_groups(ctx)
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """Return the subject CN of the verified peer certificate (the gateway identity), or None.

    getpeercert() yields a decoded certificate only after verification succeeded, so an
    unverified peer gives None. A subject with several CNs is ambiguous and also gives None.
    """
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, ssl.SSLError):
        return None
    if not cert:
        return None
    names = [
        value for rdn in cert.get("subject", ()) for attr, value in rdn if attr == "commonName"
    ]
    return names[0] if len(names) == 1 and names[0] else None


def negotiated_alpn_ok(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bool:
    """True when the handshake selected ALPN "msgin5g-gw/1" (wire-v1 §1 requires it)."""
    return ssl_object.selected_alpn_protocol() == ALPN_PROTOCOL


def certificate_not_after(path: Path | str) -> dt.datetime:
    """The expiry instant (UTC, aware) of the first certificate in a PEM file."""
    return _read_certificates(Path(path), "certificate")[0].not_valid_after_utc


def days_until_expiry(path: Path | str, now: dt.datetime | None = None) -> float:
    """Days (fractional, negative once expired) until the certificate at `path` expires."""
    now = now or dt.datetime.now(dt.UTC)
    return (certificate_not_after(path) - now).total_seconds() / 86400


def crl_next_update(path: Path | str) -> dt.datetime | None:
    """When the CRL at `path` must be replaced (UTC, aware); None when it gives no date."""
    return _read_crl(Path(path)).next_update_utc


# -- helpers ------------------------------------------------------------------------------


def _check_crl(
    crl: x509.CertificateRevocationList, path: Path, ca_certs: list[x509.Certificate],
    now: dt.datetime,
) -> None:
    # A CRL from another issuer would make OpenSSL refuse every gateway with "unable to get
    # certificate CRL"; an expired one likewise. Say so now rather than at each handshake.
    issuers = [ca for ca in ca_certs if ca.subject == crl.issuer]
    if not any(_crl_signed_by(crl, ca.public_key()) for ca in issuers):
        raise TLSSetupError(f"tls.crl {path}: not signed by a CA in tls.gateway_ca")
    if crl.next_update_utc is not None and crl.next_update_utc < now:
        raise TLSSetupError(
            f"tls.crl {path}: expired on {crl.next_update_utc:%Y-%m-%d %H:%M} UTC; "
            "every gateway would be refused"
        )


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds `data` and nothing else can replace: an anonymous
    in-memory file (memfd), removed when the block ends. Key octets never touch a disk."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        raise TLSSetupError("msgd needs Linux (memfd_create) to load TLS files")
    fd = memfd_create("msgd-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _crl_signed_by(crl: x509.CertificateRevocationList, key: Any) -> bool:
    try:
        return crl.is_signature_valid(key)
    except (TypeError, ValueError):
        return False


def _read_crl(path: Path) -> x509.CertificateRevocationList:
    return _parse_crl(_read(path, "tls.crl"), path)


def _parse_crl(data: bytes, path: Path) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError:
        raise TLSSetupError(f"tls.crl {path}: not a PEM certificate revocation list") from None


def _read_certificates(path: Path, key_name: str) -> list[x509.Certificate]:
    return _parse_certificates(_read(path, key_name), path, key_name)


def _parse_certificates(data: bytes, path: Path, key_name: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSSetupError(f"{key_name} {path}: no PEM certificate in the file") from None
    return certs


def _parse_private_key(data: bytes, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSSetupError(
            f"tls.private_key {path}: the key is encrypted; msgd needs an unencrypted key "
            "(protect it with file permissions or systemd LoadCredential=)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        # Never include the parser's message: it may quote the file's content.
        raise TLSSetupError(f"tls.private_key {path}: not a PEM private key") from None


def _read(path: Path, key_name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSSetupError(f"{key_name} {path}: cannot read ({exc.strerror or exc})") from None


def _public_der(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
