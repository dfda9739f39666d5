"""One server's part of a client's inference session: its stream, its place in the chain, what it was sent."""

from __future__ import annotations

import logging

import torch

from swarm.client.remote_forward import span_request
from swarm.client.routing import Hop
from swarm.client.sequence_manager import SequenceManager
from swarm.compression import is_serialized_tensor, serialize_tensor
from swarm.rpc import protocol
from swarm.rpc.client import PeerUnavailable, Stream
from swarm.settlement import ReceiptBook

logger = logging.getLogger(__name__)


class HopSession:
    def __init__(self, hop: Hop, stream: Stream, session_id: str, output_codec: str):
        self.hop, self.span, self.stream, self.session_id = hop, hop.span, stream, session_id
        self.output_codec = output_codec
        self.inputs: torch.Tensor | None = None  # (batch, position, hidden): everything sent so far, for replays
        self.manager: SequenceManager | None = None
        self.receipts: ReceiptBook | None = None  # with settlement: what this server may bill, and its receipts

    @classmethod
    async def open(cls, manager: SequenceManager, hop: Hop, batch_size: int, max_length: int, output_codec: str,
                   upstream: str | None) -> HopSession:
        """Reserve the server's cache; ``upstream``: the server allowed to push steps into this session."""
        span = hop.span
        stream = await Stream.open(manager.p2p, span.peer_id, protocol.INFERENCE, manager.config.connect_timeout)
        try:
            reply = await stream.request({"type": "open", "start": span.start, "end": span.end,
                                          "max_length": max_length, "batch_size": batch_size,
                                          "output_codec": output_codec, "upstream": upstream},
                                         timeout=manager.config.request_timeout)
        except BaseException:
            stream.close()
            raise
        session = cls(hop, stream, reply["session_id"], output_codec)
        session.manager = manager
        if manager.settlement is not None:
            max_price = manager.config.settlement_options.get("max_price")
            session.receipts = ReceiptBook(span.peer_id, manager.identity.peer_id, manager.model_id, span.start,
                                           span.end, session.session_id,
                                           None if max_price is None else int(max_price))
        return session

    async def send_step(self, hidden: dict, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position: int, hypo_ids: torch.Tensor | None, step_id: int, push: bool,
                        trace: bool = False) -> None:
        """Send encoded ``hidden`` for positions from ``position``; ``push``: the server hands its output on to
        the next one itself; ``trace``: the server reports its own timing in the reply."""
        extra = {"type": "step", "session_id": self.session_id, "position": position, "step_id": step_id,
                 "push": push}
        if trace:
            extra["trace"] = True
        if hypo_ids is not None:
            extra["hypo_ids"] = serialize_tensor(hypo_ids)
        if self.manager is not None and not self.manager.config.server_batching:
            extra["batch"] = False  # keep this session's steps out of the server's cross-session batches
        if self.receipts is not None and self.receipts.due(self.manager.config.receipt_interval):
            receipt = self._countersign()
            if receipt is not None:
                extra["receipt"] = receipt
        await self.stream.send(span_request(self.span, hidden, position_ids, attention_mask, self.output_codec,
                                            **extra))

    async def receive_step(self, step_id: int, timeout: float, tokens: int = 0) -> dict:
        """The server's reply to step ``step_id``: its ``hidden`` output, and whether it is ``pushing`` it on.
        ``tokens``: batch rows x new positions the step carried (what the server may bill for it)."""
        reply = await self._receive(step_id, "hidden", timeout)
        if not is_serialized_tensor(reply.get("hidden")):
            raise PeerUnavailable(f"server {self.span} sent a step reply without hidden states", self.span.peer_id)
        if self.receipts is not None:
            self.receipts.count(step_id, tokens)
            if "receipt" in reply and self.receipts.offer(reply["receipt"]) is None:
                logger.warning(f"Refused a receipt from {self.span}: {self.receipts.rejected[-1]}")
        return reply

    async def receive_push_status(self, step_id: int, timeout: float) -> bool:
        """Whether the server handed step ``step_id``'s output to the next server (sent after its reply)."""
        return bool((await self._receive(step_id, "pushed", timeout))["pushed"])

    async def _receive(self, step_id: int, field: str, timeout: float) -> dict:
        while True:
            reply = await self.stream.receive(timeout)
            # replies to earlier steps can only be leftovers of a relayed duplicate: skip them
            if reply.get("step_id") == step_id and field in reply:
                return reply

    async def link(self, downstream: HopSession | None, upstream: HopSession | None, timeout: float) -> None:
        """Tell the server where to push its outputs and whose pushes to accept."""
        target = None if downstream is None else {"peer": downstream.span.peer_id, "session_id": downstream.session_id,
                                                  "start": downstream.span.start, "end": downstream.span.end}
        await self.stream.request({"type": "link", "downstream": target,
                                   "upstream": None if upstream is None else upstream.span.peer_id}, timeout=timeout)

    async def close(self) -> None:
        message = {"type": "close"}
        if self.receipts is not None and self.receipts.due(1):
            receipt = self._countersign()
            if receipt is not None:
                message["receipt"] = receipt  # the final usage of this session, for the server to settle
        try:
            await self.stream.send(message)
        except PeerUnavailable:
            pass
        finally:
            self.stream.close()

    def _countersign(self) -> dict | None:
        try:
            receipt = self.receipts.countersign(self.manager.identity, self.manager.settlement)
        except ValueError as e:  # e.g. a backend missing an option: settlement fails, serving goes on
            logger.warning(f"Could not countersign a receipt from {self.span}: {e}")
            return None
        if receipt is None:
            logger.warning(f"Refused a receipt from {self.span}: {self.receipts.rejected[-1]}")
        return receipt
