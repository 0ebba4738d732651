"""The Message Gateway side of wire-v1: a client that registers Non-MSGin5G UEs with an MSGin5G
Server (TS 23.554 8.2.3, 8.2.4, 8.2.X). What a gateway needs is importable from here:

    ctx = client_context("gw1.pem", "gw1.key", "ca.pem")
    async with GatewaySession("msgin5g.example", 7554, ssl_context=ctx) as gw:
        result = await gw.register(GatewayUe("ue-0001@gw1.example", key))
        async for result in gw.bulk_register(read_ues("gw1-ues.csv")):
            print(result.ue_service_id, result.cause_name)

The modules, from the top down:

* `reconnecting`: `GatewaySession`, what a gateway runs: reconnects with jittered back-off
  (`Backoff`, no sooner than a GOODBYE's Retry after) and resumes a bulk run with exactly the
  UEs that had no result;
* `client`: `GatewayClient`, ONE connection (mutual TLS, ALPN msgin5g-gw/1, HELLO, keepalive,
  GOODBYE); when it ends, a run raises `ConnectionLost` naming every UE without a result;
* `procedures`: `register`, `deregister`, `bulk_register`, `bulk_deregister`, written once
  for both of the above;
* `scheduler`: how a run streams UEs over one connection (window, bulk splitting, overload);
* `values` (`GatewayUe`, `UeResult`, `Trace`) and `errors` (`ClientError` and its subclasses);
* `batching`: the bulking policy of 8.2.X step 1 (`Batcher`); `ue_file`: the gateway's UE file.

Bulk runs stream: UEs are pulled from the caller's iterable only as the window allows, each
result is yielded as it arrives, and nothing holds the whole list (memory is bounded by
`window` + `bulk_size` UEs whatever the count). A run splits its UEs into bulk transactions of
at most the server's Maximum bulk entries, keeps up to Maximum outstanding transactions open,
lets the session cut fragments to the server's Maximum frame size, and computes each UE's
credential proof (wire-v1 §6) from its key and this connection's nonce. When HELLO ACK says
bulk is not allowed it uses individual procedures instead (8.2.X step 1).

Overload (wire-v1 §5): a UE answered SERVER_BUSY is sent again once its Retry after has passed
(at most `busy_retries` times; the last answer is what you get), and no new transaction starts
before then; a transaction ended by ERROR(OVERLOADED) is treated the same way.

Results come in request order, except that a UE sent again (SERVER_BUSY, or a reconnect) gets
its result when the later attempt is answered. `UeResult.attempts` says how many times a UE
was sent: a de-registration answered NOT_REGISTERED after more than one attempt may mean an
earlier attempt, whose answer was lost with its connection, took effect.
"""

from msgd.gateway.batching import Batcher, BulkingPolicy
from msgd.gateway.client import GatewayClient, client_context
from msgd.gateway.errors import (
    ClientError,
    ConnectionLost,
    HandshakeError,
    TransactionError,
    UeSourceError,
)
from msgd.gateway.reconnecting import Backoff, GatewaySession
from msgd.gateway.ue_file import GatewayConfigError, read_ues, scan_ues, write_ues
from msgd.gateway.values import GatewayUe, Trace, UeResult

__all__ = [
    "Backoff",
    "Batcher",
    "BulkingPolicy",
    "ClientError",
    "ConnectionLost",
    "GatewayClient",
    "GatewayConfigError",
    "GatewaySession",
    "GatewayUe",
    "HandshakeError",
    "Trace",
    "TransactionError",
    "UeResult",
    "UeSourceError",
    "client_context",
    "read_ues",
    "scan_ues",
    "write_ues",
]
