"""A dropped connection's UEs settled with wire v1.1 sync (msgd.gateway.sync.settle): the
server decided a de-registration, its answer never arrived, and the session, reconnected,
learns from one LIST REQUEST that it holds, instead of sending it again (which would be
answered NOT_REGISTERED). Real msgd, real TLS through a TCP relay on 127.0.0.1 that can stop
passing the server's octets and cut the connection."""

from __future__ import annotations

import asyncio

from msgd.gateway import Backoff, GatewaySession
from tests.harness import Gw, make_deployment, running_server

UIDS = [f"ue-{n}@gw1.example" for n in range(3)]


class Relay:
    """Forwards TCP both ways; `swallow()` drops what the server sends on the connections
    open now, `cut()` aborts them. New connections pass normally."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.conns: list[dict] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        conn = {"swallow": False, "writers": (client_w, server_w)}
        self.conns.append(conn)

        async def pump(reader, writer, from_server: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if not (from_server and conn["swallow"]):
                        writer.write(data)
                        await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        await asyncio.gather(pump(client_r, server_w, False), pump(server_r, client_w, True))

    def swallow(self) -> None:
        for conn in self.conns:
            conn["swallow"] = True

    def cut(self) -> None:
        for conn in self.conns:
            for writer in conn["writers"]:
                writer.transport.abort()
        self.conns.clear()

    def close(self) -> None:
        self.server.close()


async def test_a_deregistration_decided_before_the_drop_is_settled_not_sent_again(
        tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki, ues={u: ["gw1.example"] for u in UIDS},
                          gateways=(Gw("gw1.example"),))
    loop = asyncio.get_running_loop()
    async with running_server(dep) as server:
        relay = Relay(server.address)
        port = await relay.start()
        try:
            async with GatewaySession("127.0.0.1", port, ssl_context=dep.client_ctx(),
                                      server_hostname="localhost",
                                      backoff=Backoff(initial=0.05, maximum=0.2)) as session:
                ues = [dep.ue(uid) for uid in UIDS]
                assert all([r.ok async for r in session.bulk_register(ues)])
                relay.swallow()

                async def deregister() -> list:
                    return [r async for r in session.bulk_deregister(ues)]

                task = asyncio.create_task(deregister())
                # Bounded poll of what the server holds: decided and durable, unanswered.
                deadline = loop.time() + 10.0
                registry = server.registry
                while any(registry.registration(u) for u in UIDS) or registry.pending():
                    assert loop.time() < deadline, "the de-registrations were not decided"
                    await asyncio.sleep(0.01)
                relay.cut()
                results = await task
                assert session.connections == 2
        finally:
            relay.close()
    assert sorted(r.ue_service_id for r in results) == UIDS
    assert all(r.ok for r in results), results
