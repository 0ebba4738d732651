from __future__ import annotations

import logging

from msgd.log import setup_logging


def pytest_configure(config):
    # The daemon's own log format, so captured logs show event fields (and the secret
    # scan of issue 5 sees exactly what operators would).
    setup_logging("debug")
    logging.getLogger("wire.session").setLevel(logging.INFO)
