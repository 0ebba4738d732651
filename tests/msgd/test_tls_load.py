"""load_server_tls and is_revoked at their edges (real certificates made for the run)."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from msgd.tls.contexts import is_revoked, load_server_tls
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_gateway_ca_bundle_with_non_ascii_comments_loads(tmp_path, pki):
    """Bundles such as Mozilla's carry comment lines in UTF-8 between the certificates."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# Certificat d’autorité — passerelles\n".encode()
                       + pki.ca.read_bytes())
    tls = load_server_tls(dataclasses.replace(pki.tls_config(), gateway_ca=bundle))
    assert [role for role, _subject, _when in tls.inventory].count("gateway_ca") == 1


def test_a_certificate_that_cannot_be_parsed_counts_as_revoked(pki):
    crl = x509.load_pem_x509_crl(pki.crl(["gw2.example"]).read_bytes())
    gw1 = x509.load_pem_x509_certificate(pki.gateway_cert("gw1.example").read_bytes())
    assert not is_revoked(crl, gw1.public_bytes(Encoding.DER))
    assert is_revoked(crl, b"\x30\x03\x02\x01\x00")  # DER, but no certificate
    assert not is_revoked(None, b"\x30\x03\x02\x01\x00")  # no CRL: nothing is revoked
