"""Fixtures of the hostile-world suite: a PKI with a gateway per role in the abuse cases."""

from __future__ import annotations

import pytest

from tests.pki import Pki, make_pki

# gw1: the abuser (and the owner of the "stolen" certificate); gw2: the well-behaved witness
# and gateway B of the stolen-certificate case; gw3: the reconnect storm.
GATEWAYS = ("gw1.example", "gw2.example", "gw3.example")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), gateways=GATEWAYS)
