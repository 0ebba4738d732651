"""Development PKI for msgd: a CA, a server certificate, gateway client certificates and a CRL.

wire-v1 §1 needs mutual TLS: the server presents a certificate, each gateway presents one
whose subject CN is its gateway identity, both chain to a CA, and revoked gateways appear on a
CRL. This module makes such a set for development, tests and the demo; production operators
bring their own PKI. Keys are EC P-256 (fast handshakes) and are written 0600 from the first
instant; an existing key is never overwritten unless asked (force=True / --force).

    python -m msgd.tls.devpki init DIR [--gateway NAME ...] [--server-name NAME ...] [--force]
    python -m msgd.tls.devpki gateway DIR NAME [NAME ...] [--force]
    python -m msgd.tls.devpki crl DIR --revoke gw2.example.pem [--revoke ...] [--days N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertPaths",
    "DevPki",
    "init_dir",
    "main",
    "make_ca",
    "make_crl",
    "make_gateway_cert",
    "make_server_cert",
    "parse_args",
    "write_file",
]

DEFAULT_GATEWAYS = ("gw1.example", "gw2.example")
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")
CA_DAYS = 3650
LEAF_DAYS = 825
CRL_DAYS = 30
CRL_NAME = "crl.pem"
# Certificates start a little in the past so a peer whose clock lags still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class CertPaths:
    """A certificate file and the file holding its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPki:
    """What init_dir wrote: the CA, the server certificate and one certificate per gateway."""

    dir: Path
    ca: CertPaths
    server: CertPaths
    gateways: dict[str, CertPaths]


def write_file(path: Path, data: bytes, *, mode: int, force: bool = False) -> None:
    """Write `data` to `path` atomically, with permissions `mode` from the first instant.

    The bytes go to a fresh temporary file created O_EXCL with `mode` (so a key is never
    world-readable, even briefly, whatever the umask), then take the final name: os.replace
    when `force`, else os.link, which fails if the name exists, so nothing is overwritten
    even by a concurrent writer. Readers never see a half-written file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, mode)
    try:
        try:
            # os.open applied the umask; set the exact mode (an umask of 0277 would leave 0400).
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(
                    errno.EEXIST, "refusing to overwrite an existing file (use --force)", str(path)
                ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def make_ca(
    dir: Path, name: str = "msgd dev CA", days: int = CA_DAYS, *, force: bool = False
) -> CertPaths:
    """Make a self-signed CA as dir/ca.pem and dir/ca.key."""
    paths = CertPaths(Path(dir) / "ca.pem", Path(dir) / "ca.key")
    _refuse_existing([paths.key], force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(paths, cert, key, force)
    return paths


def make_server_cert(
    ca: CertPaths,
    dir: Path,
    cn: str = "localhost",
    sans: Sequence[str] = DEFAULT_SERVER_NAMES,
    *,
    days: int = LEAF_DAYS,
    stem: str = "server",
    force: bool = False,
) -> CertPaths:
    """Make a TLS server certificate dir/server.pem + .key; `sans` are DNS names or IPs."""
    alt_names: list[x509.GeneralName] = []
    for name in sans:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    return _make_leaf(
        ca,
        dir,
        stem,
        cn,
        ExtendedKeyUsageOID.SERVER_AUTH,
        x509.SubjectAlternativeName(alt_names) if alt_names else None,
        days,
        force,
    )


def make_gateway_cert(
    ca: CertPaths, dir: Path, identity: str, *, days: int = LEAF_DAYS, force: bool = False
) -> CertPaths:
    """Make a gateway client certificate dir/<identity>.pem + .key with subject CN = identity.

    wire-v1 §1: the gateway identity is the client certificate subject's Common Name.
    """
    return _make_leaf(
        ca, dir, identity, identity, ExtendedKeyUsageOID.CLIENT_AUTH, None, days, force
    )


def make_crl(
    ca: CertPaths,
    revoked_cert_paths: Iterable[Path],
    path: Path,
    *,
    days: int = CRL_DAYS,
    merge: bool = False,
) -> Path:
    """Write a PEM CRL signed by `ca` that revokes the given certificates.

    With `merge`, entries already in an existing CRL at `path` stay revoked, so revoking one
    more gateway does not silently un-revoke the earlier ones. The file is replaced
    atomically so a server reloading at that instant never reads half a CRL.
    """
    ca_cert, ca_key = _load_issuer(ca)
    now = _now()
    revoked: dict[int, dt.datetime] = {}
    number = int(now.timestamp())
    path = Path(path)
    if merge and path.exists():
        old = x509.load_pem_x509_crl(path.read_bytes())
        if old.issuer != ca_cert.subject or not old.is_signature_valid(ca_cert.public_key()):
            raise ValueError(f"{path} was not issued by the CA {ca.cert}")
        for entry in old:
            revoked[entry.serial_number] = entry.revocation_date_utc
        with contextlib.suppress(x509.ExtensionNotFound):
            old_number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            number = max(number, old_number + 1)
    for cert_path in revoked_cert_paths:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        # Check the signature, not just the issuer name: two dev CAs share the default name.
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError(f"{cert_path} was not issued by the CA {ca.cert}") from None
        revoked.setdefault(cert.serial_number, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    write_file(path, crl.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE, force=True)
    return path


def init_dir(
    dir: Path,
    gateways: Sequence[str] = DEFAULT_GATEWAYS,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    *,
    force: bool = False,
    keep_existing: bool = False,
) -> DevPki:
    """Write ca.pem/.key, server.pem/.key and <gateway>.pem/.key into `dir`.

    Refuses (FileExistsError, before writing anything) when any of those keys exists, unless
    `force` (make everything afresh) or `keep_existing` (reuse the CA and any certificate
    whose .pem and .key are both present; make only what is missing; but when the CA itself
    is missing, the new CA re-issues every certificate, since the old ones no longer chain).
    """
    dir = Path(dir)
    if not server_names:
        raise ValueError("at least one server name is needed")
    for name in gateways:
        _check_stem(name)
    dir.mkdir(parents=True, exist_ok=True)
    ca = CertPaths(dir / "ca.pem", dir / "ca.key")
    server = CertPaths(dir / "server.pem", dir / "server.key")
    gw_paths = {name: CertPaths(dir / f"{name}.pem", dir / f"{name}.key") for name in gateways}
    every = [ca, server, *gw_paths.values()]
    if not force and not keep_existing:
        _refuse_existing([paths.key for paths in every], force)

    def wanted(paths: CertPaths) -> bool:
        return force or not (keep_existing and paths.cert.exists() and paths.key.exists())

    if wanted(ca):
        make_ca(dir, force=force)
        # A new CA invalidates every certificate the old one signed.
        force_leaves = force or keep_existing
    else:
        force_leaves = force
    if force_leaves or wanted(server):
        make_server_cert(ca, dir, server_names[0], server_names, force=force_leaves)
    for name, paths in gw_paths.items():
        if force_leaves or wanted(paths):
            make_gateway_cert(ca, dir, name, force=force_leaves)
    return DevPki(dir=dir, ca=ca, server=server, gateways=gw_paths)


# -- command line -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m msgd.tls.devpki",
        description="Make a development PKI for msgd (CA, server, gateway certificates, CRL).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="make ca, server and gateway certificates in DIR")
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument(
        "--gateway",
        action="append",
        metavar="NAME",
        help="gateway identity (certificate CN); repeat for more "
        f"(default: {' '.join(DEFAULT_GATEWAYS)})",
    )
    init.add_argument(
        "--server-name",
        action="append",
        metavar="NAME",
        help="server DNS name or IP address for the certificate; the first is the CN "
        f"(default: {' '.join(DEFAULT_SERVER_NAMES)})",
    )
    init.add_argument("--force", action="store_true", help="overwrite existing keys")
    gateway = commands.add_parser("gateway", help="add gateway certificates signed by DIR/ca")
    gateway.add_argument("dir", type=Path, metavar="DIR")
    gateway.add_argument("names", nargs="+", metavar="NAME")
    gateway.add_argument("--force", action="store_true", help="overwrite existing keys")
    crl = commands.add_parser("crl", help=f"write DIR/{CRL_NAME} revoking certificates")
    crl.add_argument("dir", type=Path, metavar="DIR")
    crl.add_argument(
        "--revoke",
        action="append",
        default=[],
        type=Path,
        metavar="CERT",
        help="certificate file to revoke (relative names are looked up in DIR first)",
    )
    crl.add_argument("--days", type=int, default=CRL_DAYS, help="validity of the CRL")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "init":
            pki = init_dir(
                args.dir,
                gateways=args.gateway or DEFAULT_GATEWAYS,
                server_names=args.server_name or DEFAULT_SERVER_NAMES,
                force=args.force,
            )
            written = [pki.ca, pki.server, *pki.gateways.values()]
        elif args.command == "gateway":
            ca = CertPaths(args.dir / "ca.pem", args.dir / "ca.key")
            written = [
                make_gateway_cert(ca, args.dir, name, force=args.force) for name in args.names
            ]
        else:
            ca = CertPaths(args.dir / "ca.pem", args.dir / "ca.key")
            revoke = [
                args.dir / p if not p.is_absolute() and (args.dir / p).exists() else p
                for p in args.revoke
            ]
            crl = make_crl(ca, revoke, args.dir / CRL_NAME, days=args.days, merge=True)
            print(f"wrote {crl} ({len(revoke)} certificate(s) added)")
            return 0
    except (OSError, ValueError) as exc:
        print(f"msgd: certs: {_describe(exc)}", file=sys.stderr)
        return 1
    for paths in written:
        print(f"wrote {paths.cert} and {paths.key} (key mode 0600)")
    return 0


# -- helpers ------------------------------------------------------------------------------


def _make_leaf(
    ca: CertPaths,
    dir: Path,
    stem: str,
    cn: str,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
    days: int,
    force: bool,
) -> CertPaths:
    _check_stem(stem)
    paths = CertPaths(Path(dir) / f"{stem}.pem", Path(dir) / f"{stem}.key")
    _refuse_existing([paths.key], force)
    ca_cert, ca_key = _load_issuer(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    _write_pair(paths, builder.sign(ca_key, hashes.SHA256()), key, force)
    return paths


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_issuer(ca: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(Path(ca.cert).read_bytes())
    key = serialization.load_pem_private_key(Path(ca.key).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key}: expected an EC private key")
    return cert, key


def _write_pair(
    paths: CertPaths, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, force: bool
) -> None:
    # Key first: if it is refused, no certificate is left without its key.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file(paths.key, key_pem, mode=PRIVATE_MODE, force=force)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    write_file(paths.cert, cert_pem, mode=PUBLIC_MODE, force=True)


def _refuse_existing(keys: Iterable[Path], force: bool) -> None:
    if force:
        return
    for key in keys:
        if os.path.lexists(key):
            raise FileExistsError(
                errno.EEXIST, "refusing to overwrite an existing key (use --force)", str(key)
            )


def _check_stem(name: str) -> None:
    # The identity becomes a file name: no path separators, no hidden or odd names.
    if not _STEM.fullmatch(name):
        raise ValueError(
            f"{name!r} cannot be used as a file name (letters, digits, '.', '_', '-'; "
            "at most 64 characters)"
        )


def _fsync_dir(dir: Path) -> None:
    try:
        fd = os.open(dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


if __name__ == "__main__":
    raise SystemExit(main())
