from __future__ import annotations

import logging

import pytest

from msgd.log import setup_logging
from tests.ops import secret_scan


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path machinery: the scan logs under it
def pytest_configure(config):
    # The daemon's own log format, so captured logs show event fields (and the secret
    # scan of issue 5 sees exactly what operators would).
    setup_logging("debug")
    logging.getLogger("wire.session").setLevel(logging.INFO)
    secret_scan.install(config)


def pytest_sessionfinish(session, exitstatus):
    # After every test of the run: no key, proof or nonce in any msgd log (fails the run).
    secret_scan.finish(session)
