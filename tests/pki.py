"""A throwaway PKI for tests, made in a temporary directory (no key is ever committed).

    @pytest.fixture(scope="session")
    def pki(tmp_path_factory):
        return make_pki(tmp_path_factory.mktemp("pki"))

gives the gateway CA, a server certificate for localhost/127.0.0.1, one client certificate
per gateway (CN = identity) and, for negative tests, a second CA with its own certificate for
the first gateway identity: same CN, wrong issuer, so the server must refuse it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from msgd.config import TlsConfig
from msgd.tls.devpki import CertPaths, init_dir, make_ca, make_crl, make_gateway_cert

__all__ = ["Pki", "make_pki"]


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    gateways: dict[str, CertPaths]
    # Another CA and a certificate from it whose CN is the first gateway's identity.
    other_ca: Path
    other_ca_key: Path
    other_gateway: CertPaths

    def gateway_cert(self, identity: str) -> Path:
        return self.gateways[identity].cert

    def gateway_key(self, identity: str) -> Path:
        return self.gateways[identity].key

    def crl(self, revoked: Iterable[str], name: str = "crl.pem") -> Path:
        """Write a CRL from the gateway CA revoking these gateway identities."""
        ca = CertPaths(self.ca, self.ca_key)
        certs = [self.gateways[identity].cert for identity in revoked]
        return make_crl(ca, certs, self.dir / name)

    def tls_config(self, *, crl: Path | None = None, min_version: str = "1.3") -> TlsConfig:
        return TlsConfig(
            certificate=self.server_cert,
            private_key=self.server_key,
            gateway_ca=self.ca,
            crl=crl,
            min_version=min_version,
        )


def make_pki(tmp: Path, gateways: Sequence[str] = ("gw1.example", "gw2.example")) -> Pki:
    tmp = Path(tmp)
    pki = init_dir(tmp, gateways=gateways, server_names=("localhost", "127.0.0.1", "::1"))
    other_dir = tmp / "other"
    other_dir.mkdir(exist_ok=True)
    other = make_ca(other_dir, name="msgd other CA")
    other_gateway = make_gateway_cert(other, other_dir, gateways[0])
    return Pki(
        dir=tmp,
        ca=pki.ca.cert,
        ca_key=pki.ca.key,
        server_cert=pki.server.cert,
        server_key=pki.server.key,
        gateways=pki.gateways,
        other_ca=other.cert,
        other_ca_key=other.key,
        other_gateway=other_gateway,
    )
