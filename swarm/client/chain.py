"""The chain core every kind of client request shares: inference sessions, U-Net evaluations, forward/backward.

- ``output_codec``: one codec policy, 8-bit (``compression``) between servers and the edge codec (float16 under
  8-bit) for the tensor that comes back to the client;
- ``Attempts``: one failure budget per request, with one rule for whose fault an error is: a refusal that the
  replacement server repeats is the request's (raised, the first server forgiven), any other failure is the
  server's (banned, or left out for a while if it said it is busy), and after ``max_retries`` failures the error
  is raised;
- ``ChainHop``: one server's session in a chain (its stream, session id, output codec and settlement receipts),
  opened by one ``open`` message; spans (hop_session.py) and U-Net levels (diffusion.py) add their own steps;
- ``open_chain``: route blocks [start, end) and open a session on each hop, choosing again around servers that
  cannot be reached or refuse.

What each kind does to recover stays with it: an inference session replays its KV history on the replacement, a
U-Net evaluation runs again, a stateless forward is retried on the re-routed remainder of its chain.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

from swarm.client.config import ClientConfig
from swarm.client.routing import Hop, RouteRequest, RoutingPolicy
from swarm.client.sequence_manager import SequenceManager
from swarm.rpc.client import PeerUnavailable, RemoteError, Stream
from swarm.settlement import ReceiptBook

logger = logging.getLogger(__name__)

RETRYABLE = (PeerUnavailable, RemoteError)  # what another server may not repeat; anything else is raised at once


def output_codec(config: ClientConfig, to_client: bool) -> str:
    """The codec a server encodes its output with: the edge codec for what comes back to the client itself, the
    inter-server codec for what the next server takes."""
    return config.edge_codec if to_client else config.compression


class Attempts:
    """One request's failure budget along a chain (a step, an evaluation, a forward pass, opening a chain)."""

    def __init__(self, manager: SequenceManager, max_retries: int | None = None):
        self.manager = manager
        self.max_retries = manager.config.max_retries if max_retries is None else max_retries
        self.failures = 0
        self.last_error: Exception | None = None

    def failed(self, error: Exception, peer: str | None = None) -> None:
        """Count ``error`` of server ``peer``: raises it if the request is at fault or the budget is spent, else
        holds it against ``peer`` (None: the caller already dealt with the server) so that routing avoids it."""
        self.failures += 1
        if self.manager.request_at_fault(error, self.last_error) or self.failures > self.max_retries:
            raise error
        self.last_error = error
        if peer is not None:
            self.manager.failed(peer, error)


class ChainHop:
    """One server's session in a chain of sessions."""

    def __init__(self, manager: SequenceManager, hop: Hop, stream: Stream, session_id: str | None,
                 output_codec: str):
        self.manager, self.hop, self.span, self.stream = manager, hop, hop.span, stream
        self.session_id, self.output_codec = session_id, output_codec
        self.receipts: ReceiptBook | None = None  # with settlement: what this server may bill, and its receipts
        if manager.settlement is not None and session_id is not None:
            # by default, no more than the price the server advertised when it was chosen
            max_price = manager.config.settlement_options.get("max_price", hop.span.info.price)
            self.receipts = ReceiptBook(hop.span.peer_id, manager.identity.peer_id, manager.model_id,
                                        hop.span.start, hop.span.end, session_id, int(max_price))

    @staticmethod
    async def open_stream(manager: SequenceManager, hop: Hop, handler: str, message: dict) -> tuple[Stream, dict]:
        """A stream to ``hop``'s server with ``message`` (the session's ``open``) sent and answered."""
        if manager.config.settlement:  # servers that require payment open sessions only for clients that settle
            message = {**message, "settlement": manager.config.settlement}
        stream = await Stream.open(manager.p2p, hop.span.peer_id, handler, manager.config.connect_timeout)
        try:
            reply = await stream.request(message, timeout=manager.config.request_timeout)
        except BaseException:
            stream.close()
            raise
        return stream, reply

    def with_receipt(self, message: dict, interval: int) -> dict:
        """``message`` carrying the latest receipt countersigned, if ``interval`` steps passed since the last."""
        if self.receipts is not None and self.receipts.due(interval):
            receipt = self._countersign()
            if receipt is not None:
                message["receipt"] = receipt
        return message

    def take_receipt(self, reply: dict, step: Hashable, usage: int) -> None:
        """Count a step's usage (once per ``step``, however it reached the server) and keep its receipt."""
        if self.receipts is None:
            return
        self.receipts.count(step, usage)
        if "receipt" in reply and self.receipts.offer(reply["receipt"]) is None:
            logger.warning(f"Refused a receipt from {self.span}: {self.receipts.rejected[-1]}")

    async def close(self) -> None:
        # the final usage of this session, for the server to settle
        message = self.with_receipt({"type": "close"}, 1)
        try:
            await self.stream.send(message)
        except PeerUnavailable:
            pass
        finally:
            self.stream.close()

    def _countersign(self) -> dict | None:
        proofs = self.manager.proofs
        if proofs is not None and proofs.unsettled(self.span.peer_id):
            # paid only once its challenged proofs verify: receipts are cumulative, so a later one covers this
            if proofs.failed(self.span.peer_id):
                self.receipts.rejected.append("the server failed a zero-knowledge proof")
            return None
        try:
            receipt = self.receipts.countersign(self.manager.identity, self.manager.settlement)
        except ValueError as e:  # e.g. a backend missing an option: settlement fails, serving goes on
            logger.warning(f"Could not countersign a receipt from {self.span}: {e}")
            return None
        if receipt is None:
            logger.warning(f"Refused a receipt from {self.span}: {self.receipts.rejected[-1]}")
        return receipt


HopT = TypeVar("HopT", bound=ChainHop)


async def open_chain(manager: SequenceManager, start: int, end: int, request: RouteRequest,
                     open_hop: Callable[[Hop, HopT | None], Awaitable[HopT]], policy: RoutingPolicy | None = None,
                     max_retries: int | None = None) -> list[HopT]:
    """Sessions on a chain covering blocks [start, end): ``open_hop(hop, previous)`` opens one (``previous``: the
    session opened before it in this chain). A server that cannot be reached or refuses is held at fault and the
    chain chosen again, within one ``Attempts`` budget."""
    attempts, last = Attempts(manager, max_retries), None
    while True:
        # with nobody left to try, a server's own refusal (say, "payment required") is what the caller gets
        with manager.rerouting_after(*last) if last else contextlib.nullcontext():
            chain = await manager.route(start, end, request, policy)
        opened = []
        try:
            for hop in chain:
                opened.append(await open_hop(hop, opened[-1] if opened else None))
            return opened
        except BaseException as e:
            for session in opened:
                await session.close()
            if not isinstance(e, RETRYABLE):
                raise
            failed = chain[len(opened)].span
            peer = getattr(e, "peer", None) or failed.peer_id
            # unreachable, or refused (e.g. its memory filled up since it announced): try another server
            attempts.failed(e, peer)
            last = (e, peer)
            logger.warning(f"Cannot open a session on {failed} ({e}); choosing another server")
