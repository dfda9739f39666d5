"""Streaming inference through a chain of servers, each keeping its part of the KV cache.

The client keeps, per hop, every hidden state it sent. If a server becomes unreachable mid-session, its blocks are
routed to other servers and that history is replayed to them (one prefill), so generation continues with the same
output. Every step carries its start position, so a client can also rewind (regenerate from an earlier point).
"""

from __future__ import annotations

import logging
import time

import torch

from swarm.client.remote_forward import span_request
from swarm.client.routing import Hop, RemoteSpan, RouteRequest
from swarm.client.sequence_manager import SequenceManager
from swarm.compression import deserialize_tensor, serialize_tensor
from swarm.rpc import protocol
from swarm.rpc.client import PeerUnavailable, RemoteError, Stream

logger = logging.getLogger(__name__)


class _HopSession:
    """One server's part of the session: its stream and the inputs it has been sent."""

    def __init__(self, hop: Hop, stream: Stream, session_id: str):
        self.hop, self.span, self.stream, self.session_id = hop, hop.span, stream, session_id
        self.inputs: torch.Tensor | None = None  # (batch, position, hidden): everything sent so far

    @classmethod
    async def open(cls, manager: SequenceManager, hop: Hop, batch_size: int, max_length: int) -> _HopSession:
        span = hop.span
        stream = await Stream.open(manager.p2p, span.peer_id, protocol.INFERENCE, manager.config.connect_timeout)
        try:
            reply = await stream.request({"type": "open", "start": span.start, "end": span.end,
                                          "max_length": max_length, "batch_size": batch_size},
                                         timeout=manager.config.request_timeout)
        except BaseException:
            stream.close()
            raise
        return cls(hop, stream, reply["session_id"])

    async def step(self, hidden: dict, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position: int, hypo_ids: torch.Tensor | None, output_codec: str, timeout: float) -> dict:
        """Send encoded ``hidden``; returns the server's encoded output."""
        extra = {"type": "step", "session_id": self.session_id, "position": position}
        if hypo_ids is not None:
            extra["hypo_ids"] = serialize_tensor(hypo_ids)
        reply = await self.stream.request(
            span_request(self.span, hidden, position_ids, attention_mask, output_codec, **extra), timeout=timeout)
        if not isinstance(reply.get("hidden"), dict):
            raise PeerUnavailable(f"server {self.span} sent a step reply without hidden states", self.span.peer_id)
        return reply["hidden"]

    async def close(self) -> None:
        try:
            await self.stream.send({"type": "close"})
        except PeerUnavailable:
            pass
        finally:
            self.stream.close()


class InferenceSession:
    """``with remote.inference_session(max_length=...) as session: session.step(hidden, position_ids, mask)``."""

    def __init__(self, manager: SequenceManager, max_length: int):
        self.manager, self.max_length = manager, max_length
        self.position = 0  # positions every server has cached
        self.batch_size: int | None = None
        self.hops: list[_HopSession] = []
        self.position_ids: torch.Tensor | None = None  # (batch, position) history, for replays
        self.attention_mask: torch.Tensor | None = None  # (batch, position) history, for replays
        self.token_ids: torch.Tensor | None = None  # kept by the causal LM to detect rewinds and beam reorders
        self._pending_hypo_ids: torch.Tensor | None = None
        self.closed = False

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def chain(self) -> list[RemoteSpan]:
        return [hop.span for hop in self.hops]

    def rewind(self, position: int) -> None:
        """Forget positions from ``position`` on; the next step overwrites them on every server."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to {position}: the session holds {self.position} positions")
        self.position = position
        for name in ("position_ids", "attention_mask", "token_ids"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[:, :position])
        for hop in self.hops:
            if hop.inputs is not None:
                hop.inputs = hop.inputs[:, :position]

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Row i continues the hypothesis of row ``hypo_ids[i]`` (beam search); applied with the next step."""
        hypo_ids = hypo_ids.long()
        for name in ("position_ids", "attention_mask", "token_ids"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[hypo_ids])
        for hop in self.hops:
            if hop.inputs is not None:
                hop.inputs = hop.inputs[hypo_ids]
        previous = self._pending_hypo_ids
        self._pending_hypo_ids = hypo_ids if previous is None else previous[hypo_ids]

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run new positions (batch, tokens, hidden) through every block; returns the last block's output.

        ``attention_mask`` covers all positions so far plus the new ones (0 at padding), or is None.
        """
        if self.closed:
            raise RuntimeError("this inference session is closed")
        batch, tokens, _ = hidden.shape
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(f"the session was started with batch size {self.batch_size}, got {batch}")
        if self.position + tokens > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded: {self.position} positions cached, "
                             f"{tokens} more requested; open a session with a larger max_length")
        if attention_mask is not None and attention_mask.shape != (batch, self.position + tokens):
            raise ValueError(f"attention_mask must have shape ({batch}, {self.position + tokens}), "
                             f"got {tuple(attention_mask.shape)}")
        self.batch_size = batch
        output = self.manager.loop.run(self._step(hidden.detach(), position_ids.long(), attention_mask))
        self.position += tokens
        self.position_ids = self._extend(self.position_ids, position_ids.long())
        if attention_mask is not None:
            self.attention_mask = attention_mask.long()
        elif self.attention_mask is not None:
            self.attention_mask = self._extend(self.attention_mask, torch.ones(batch, tokens, dtype=torch.long))
        return output

    @staticmethod
    def _extend(history: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return new if history is None else torch.cat([history, new], dim=1)

    async def _step(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not self.hops:
            self.hops = await self._open_chain(0, self.manager.num_blocks)
        config = self.manager.config
        hypo_ids, self._pending_hypo_ids = self._pending_hypo_ids, None
        reordered_before = set(self.hops)  # replacement hops replay an already reordered history
        sent: dict[_HopSession, dict] = {}  # recorded in the histories only once every hop succeeded
        payload = serialize_tensor(hidden, config.edge_codec)  # encoded once; servers' outputs are relayed as is
        failures, index, last_error = 0, 0, None
        while index < len(self.hops):
            hop = self.hops[index]
            codec = config.edge_codec if index == len(self.hops) - 1 else config.compression
            started = time.perf_counter()
            try:
                output = await hop.step(payload, position_ids, attention_mask, self.position,
                                        hypo_ids if hop in reordered_before else None, codec,
                                        config.request_timeout)
            except (PeerUnavailable, RemoteError) as e:
                # A server that dies, stalls past the timeout or errs mid-generation is replaced; an error that
                # its replacement repeats on the same step is ours to report.
                failures += 1
                if failures > config.max_retries or (isinstance(e, RemoteError) and isinstance(last_error,
                                                                                              RemoteError)):
                    raise
                last_error = e
                logger.warning(f"Server {hop.span} failed ({e}); routing its blocks elsewhere and replaying")
                await self._replace_hop(index)
                continue
            if hidden.shape[1] == 1:  # decode steps calibrate the per-hop overhead routing expects
                self.manager.record_hop_time(hop.hop, time.perf_counter() - started)
            sent[hop] = payload
            payload, index = output, index + 1
        for hop, inputs in sent.items():
            hop.inputs = self._extend(hop.inputs, deserialize_tensor(inputs))
        return deserialize_tensor(payload)

    async def _open_chain(self, start: int, end: int) -> list[_HopSession]:
        """Sessions on a chain covering blocks [start, end). A server that cannot be reached is banned and the
        chain chosen again, up to ``max_retries`` times."""
        failures = 0
        while True:
            request = RouteRequest(mode="latency", batch_size=self.batch_size, max_length=self.max_length)
            chain, opened = await self.manager.route(start, end, request), []
            try:
                for hop in chain:
                    opened.append(await _HopSession.open(self.manager, hop, self.batch_size, self.max_length))
                return opened
            except BaseException as e:
                for hop in opened:
                    await hop.close()
                failures += 1
                # unreachable, or refused (e.g. its cache filled up since it announced): try another server
                if not isinstance(e, (PeerUnavailable, RemoteError)) or failures > self.manager.config.max_retries:
                    raise
                logger.warning(f"Cannot open a session on {chain[len(opened)].span} ({e}); choosing another server")
                self.manager.ban(getattr(e, "peer", None) or chain[len(opened)].span.peer_id)

    async def _replace_hop(self, index: int) -> None:
        """Route the failed hop's blocks to other servers and replay its history there (one prefill each)."""
        started = time.perf_counter()
        failed = self.hops.pop(index)
        failed.stream.close()
        self.manager.ban(failed.span.peer_id)
        failures = 0
        while True:
            hops = await self._open_chain(failed.span.start, failed.span.end)
            try:
                await self._replay(hops, failed.inputs)
            except (PeerUnavailable, RemoteError) as e:
                for hop in hops:
                    await hop.close()
                failures += 1
                if failures > self.manager.config.max_retries:
                    raise
                logger.warning(f"Replay failed ({e}); choosing other servers")
                self.manager.ban(e.peer or hops[0].span.peer_id)
                continue
            self.hops[index:index] = hops
            self.manager.record_failover_time(time.perf_counter() - started)
            return

    async def _replay(self, hops: list[_HopSession], history: torch.Tensor | None) -> None:
        """Rebuild the replacement hops' caches: the first gets the lost hop's inputs exactly (uncompressed)."""
        if history is None or self.position == 0:
            return
        mask = self.attention_mask[:, : self.position] if self.attention_mask is not None else None
        payload = serialize_tensor(history, "none")
        for hop in hops:
            output = await hop.step(payload, self.position_ids, mask, 0, None, self.manager.config.compression,
                                    self.manager.config.request_timeout)
            hop.inputs = deserialize_tensor(payload)
            payload = output

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        async def _close_all() -> None:
            for hop in self.hops:
                await hop.close()

        try:
            self.manager.loop.run(_close_all(), timeout=10)
        except Exception:
            logger.debug("Failed to close an inference session cleanly", exc_info=True)
        self.hops = []
