"""A gateway damped by the server's reconnect-storm limit learns the Retry after and obeys it."""

from __future__ import annotations

import pytest

from msgd.gateway import GatewaySession, HandshakeError
from tests.harness import Gw, connect, make_deployment, running_server
from wire.constants import ErrorCause


async def test_goodbye_overloaded_before_hello_ack_carries_retry_after(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki, ues={"u@example": ["gw1.example"]},
                          gateways=(Gw("gw1.example"),),
                          limits={"reconnect_limit": 1, "reconnect_window": 5})
    async with running_server(dep) as server:
        first = await connect(dep, server.address)
        with pytest.raises(HandshakeError) as refused:
            await connect(dep, server.address)
        assert refused.value.cause == ErrorCause.OVERLOADED
        assert refused.value.retry_after is not None and refused.value.retry_after > 0
        assert refused.value.retryable
        await first.close()
        # The reconnecting session waits at least that long before its next attempt.
        delays: list[float] = []
        session = GatewaySession(*server.address, ssl_context=dep.client_ctx(),
                                 server_hostname="localhost", max_attempts=2,
                                 on_reconnect=lambda _where, delay: delays.append(delay))
        result = await session.register(dep.ue("u@example"))
        await session.close()
        assert result.ok
        # Damped on its first attempt (the window is still full), it waited the announced
        # Retry after before trying again, and then got in.
        assert delays, "the session was not damped"
        # Back-off alone after one failure is at most 0.5 s; only Retry after (the rest of
        # the 5 s window) makes it wait 2 s or more.
        assert delays[0] >= 2.0
