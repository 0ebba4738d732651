"""msgd.certs: the dev PKI's files, their modes, refusal to overwrite keys, CRLs and the CLI."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from msgd.tls.devpki import (
    CertPaths,
    init_dir,
    main,
    make_ca,
    make_crl,
    make_gateway_cert,
    parse_args,
    write_file,
)

REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def common_name(cert: x509.Certificate) -> str:
    (attr,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attr.value)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277], ids=["umask-000", "umask-022", "umask-277"])
def test_init_dir_writes_keys_0600_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        pki = init_dir(tmp_path, gateways=["gw1.example", "gw2.example"])
    keys = [pki.ca.key, pki.server.key, *(p.key for p in pki.gateways.values())]
    certs = [pki.ca.cert, pki.server.cert, *(p.cert for p in pki.gateways.values())]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keys + certs)
    for key in keys:
        assert mode(key) == 0o600, key
    for cert in certs:
        assert mode(cert) == 0o644, cert


def test_certificates_have_the_right_shape(tmp_path: Path) -> None:
    pki = init_dir(tmp_path, gateways=["gw1.example"], server_names=["msgd.example", "192.0.2.7"])
    ca = load_cert(pki.ca.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.subject == ca.issuer

    server = load_cert(pki.server.cert)
    server.verify_directly_issued_by(ca)
    assert common_name(server) == "msgd.example"
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["msgd.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    gateway = load_cert(pki.gateways["gw1.example"].cert)
    gateway.verify_directly_issued_by(ca)
    assert common_name(gateway) == "gw1.example"  # wire-v1 §1: identity = subject CN
    eku = gateway.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert gateway.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    for paths in (pki.ca, pki.server, pki.gateways["gw1.example"]):
        key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        assert key.public_key() == load_cert(paths.cert).public_key()
    assert gateway.not_valid_after_utc <= ca.not_valid_after_utc


def test_refuses_to_overwrite_keys(tmp_path: Path) -> None:
    init_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="refusing to overwrite") as info:
        init_dir(tmp_path)
    assert info.value.filename == str(tmp_path / "ca.key")
    with pytest.raises(FileExistsError):
        make_gateway_cert(
            CertPaths(tmp_path / "ca.pem", tmp_path / "ca.key"), tmp_path, "gw1.example"
        )
    with pytest.raises(FileExistsError):
        make_ca(tmp_path)
    # Nothing changed, and no temporary file was left behind.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_refuses_before_writing_anything(tmp_path: Path) -> None:
    # Only the last gateway's key exists: the CA must not be replaced before the refusal.
    (tmp_path / "gw2.example.key").write_text("an operator's key\n")
    with pytest.raises(FileExistsError):
        init_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["gw2.example.key"]


def test_force_replaces_keys(tmp_path: Path) -> None:
    pki = init_dir(tmp_path)
    old_key = pki.server.key.read_bytes()
    old_ca = pki.ca.cert.read_bytes()
    init_dir(tmp_path, force=True)
    assert pki.server.key.read_bytes() != old_key
    assert pki.ca.cert.read_bytes() != old_ca
    assert mode(pki.server.key) == 0o600
    load_cert(pki.server.cert).verify_directly_issued_by(load_cert(pki.ca.cert))


def test_keep_existing_adds_only_what_is_missing(tmp_path: Path) -> None:
    pki = init_dir(tmp_path, gateways=["gw1.example"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = init_dir(tmp_path, gateways=["gw1.example", "gw3.example"], keep_existing=True)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {"gw3.example.pem", "gw3.example.key"}
    load_cert(again.gateways["gw3.example"].cert).verify_directly_issued_by(load_cert(pki.ca.cert))


def test_gateway_identity_must_be_a_file_name(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    for bad in ("../evil", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="file name"):
            make_gateway_cert(ca, tmp_path, bad)


def test_write_file_never_overwrites_without_force(tmp_path: Path) -> None:
    target = tmp_path / "k"
    write_file(target, b"one", mode=0o600)
    with pytest.raises(FileExistsError):
        write_file(target, b"two", mode=0o600)
    assert target.read_bytes() == b"one"
    write_file(target, b"three", mode=0o600, force=True)
    assert target.read_bytes() == b"three"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_crl_revokes_and_merges(tmp_path: Path) -> None:
    pki = init_dir(tmp_path, gateways=["gw1.example", "gw2.example", "gw3.example"])
    serial = {name: load_cert(p.cert).serial_number for name, p in pki.gateways.items()}
    crl_path = make_crl(pki.ca, [pki.gateways["gw2.example"].cert], tmp_path / "crl.pem")
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert crl.is_signature_valid(load_cert(pki.ca.cert).public_key())
    assert crl.get_revoked_certificate_by_serial_number(serial["gw2.example"]) is not None
    assert crl.get_revoked_certificate_by_serial_number(serial["gw1.example"]) is None

    make_crl(pki.ca, [pki.gateways["gw3.example"].cert], crl_path, merge=True)
    merged = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert {entry.serial_number for entry in merged} == {
        serial["gw2.example"],
        serial["gw3.example"],
    }
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    new_number = merged.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert new_number > number

    make_crl(pki.ca, [pki.gateways["gw3.example"].cert], crl_path)  # no merge: only gw3
    assert {e.serial_number for e in x509.load_pem_x509_crl(crl_path.read_bytes())} == {
        serial["gw3.example"]
    }


def test_crl_refuses_a_certificate_of_another_ca(tmp_path: Path) -> None:
    pki = init_dir(tmp_path / "a")
    other = init_dir(tmp_path / "b")
    with pytest.raises(ValueError, match="not issued by the CA"):
        make_crl(pki.ca, [other.gateways["gw1.example"].cert], tmp_path / "crl.pem")
    assert not (tmp_path / "crl.pem").exists()


def test_cli_init_refuse_force_gateway_and_crl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "pki"
    argv = ["init", str(d), "--gateway", "a.example", "--server-name", "srv.example"]
    assert main(argv) == 0
    assert sorted(p.name for p in d.iterdir()) == sorted(
        f"{stem}.{ext}" for stem in ("ca", "server", "a.example") for ext in ("pem", "key")
    )
    assert common_name(load_cert(d / "server.pem")) == "srv.example"
    capsys.readouterr()

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "--force" in err

    assert main([*argv, "--force"]) == 0
    assert main(["gateway", str(d), "b.example"]) == 0
    assert common_name(load_cert(d / "b.example.pem")) == "b.example"
    assert mode(d / "b.example.key") == 0o600

    assert main(["crl", str(d), "--revoke", "b.example.pem"]) == 0
    crl = x509.load_pem_x509_crl((d / "crl.pem").read_bytes())
    assert [e.serial_number for e in crl] == [load_cert(d / "b.example.pem").serial_number]
    assert main(["crl", str(d), "--revoke", str(d / "absent.pem")]) == 1


def test_parse_args_defaults() -> None:
    args = parse_args(["init", "x"])
    assert (args.command, args.dir, args.gateway, args.force) == ("init", Path("x"), None, False)
    with pytest.raises(SystemExit):
        parse_args([])


def test_make_dev_certs_wrapper(tmp_path: Path) -> None:
    script = REPO / "certs" / "make-dev-certs"
    assert os.access(script, os.X_OK)
    # Run from elsewhere, as an operator would: the wrapper finds the tree by itself.
    done = subprocess.run(
        [str(script), "init", str(tmp_path / "dev"), "--gateway", "gw9.example"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert common_name(load_cert(tmp_path / "dev" / "gw9.example.pem")) == "gw9.example"
    assert mode(tmp_path / "dev" / "gw9.example.key") == 0o600
