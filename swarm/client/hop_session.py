"""One server's part of a client's inference session: its steps, its links, everything it was sent (for replays)."""

from __future__ import annotations

from collections import deque

import torch

from swarm.client.chain import ChainHop
from swarm.client.config import ClientConfig
from swarm.client.remote_forward import span_request
from swarm.client.routing import Hop
from swarm.client.sequence_manager import SequenceManager
from swarm.compression import is_serialized_tensor, serialize_tensor
from swarm.rpc import messages, protocol
from swarm.rpc.client import PeerUnavailable, Stream

STALL_SAMPLES = 3  # decode steps a hop answers before its own step times bound the next ones


class HopSession(ChainHop):
    def __init__(self, manager: SequenceManager, hop: Hop, stream: Stream, session_id: str, output_codec: str):
        super().__init__(manager, hop, stream, session_id, output_codec)
        self.inputs: torch.Tensor | None = None  # (batch, position, hidden): everything sent so far, for replays
        self.waits: deque[float] = deque(maxlen=32)  # seconds its recent decode steps took, input ready -> reply

    def stall_bound(self, config: ClientConfig, positions: int = 1, decode: bool = True) -> float:
        """How long to wait for this hop's step of ``positions`` new positions (batch x tokens) before giving it
        up. A decode step: ``stall_factor`` times its slowest recent step, at least ``stall_floor``. Until it has
        answered a few, and for prefills: ``stall_factor`` times what the server's announced speed (and queue)
        predicts, at least ``first_step_floor``; so a server that claims to be fast and does not answer (a black
        hole) costs one short stall. Never more than ``request_timeout``."""
        if decode and config.stall_floor is not None and len(self.waits) >= STALL_SAMPLES:
            return min(config.request_timeout, max(config.stall_floor, config.stall_factor * max(self.waits)))
        claimed = self.claimed_seconds(positions, decode)
        if config.first_step_floor is None or claimed is None:
            return config.request_timeout
        return min(config.request_timeout, max(config.first_step_floor, config.stall_factor * claimed))

    def claimed_seconds(self, positions: int, decode: bool) -> float | None:
        """What this hop's step should take by the speed and load its server announced (None: not announced)."""
        info = self.span.info
        speed = info.inference_rps if decode else info.forward_tps
        if not speed:
            return None
        share = (self.span.end - self.span.start) / max(1, info.end - info.start)  # of the span it measured
        work = share / speed if decode else share * positions / speed
        return work * (1.0 + info.load)  # the requests it had queued when it announced go first

    @classmethod
    async def open(cls, manager: SequenceManager, hop: Hop, batch_size: int, max_length: int, output_codec: str,
                   upstream: str | None, adapter: str | None = None) -> HopSession:
        """Reserve the server's cache; ``upstream``: the server allowed to push steps into this session;
        ``adapter``: the LoRA adapter its steps run with."""
        span = hop.span
        stream, reply = await cls.open_stream(manager, hop, protocol.INFERENCE, messages.open_span(
            span.start, span.end, max_length, batch_size, output_codec, upstream, adapter))
        return cls(manager, hop, stream, reply["session_id"], output_codec)

    async def send_step(self, hidden: dict, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position: int, hypo_ids: torch.Tensor | None, step_id: int, push: bool,
                        trace: bool = False, prompts: torch.Tensor | None = None) -> None:
        """Send encoded ``hidden`` for positions from ``position``; ``push``: the server hands its output on to
        the next one itself; ``trace``: the server reports its own timing in the reply; ``prompts``: this hop's
        deep prompts, added to the step's first positions (sent exactly: they are small)."""
        extra = {"type": "step", "session_id": self.session_id, "position": position, "step_id": step_id,
                 "push": push}
        extra.update(messages.prompts_field(prompts))
        if trace:
            extra["trace"] = True
        if hypo_ids is not None:
            extra["hypo_ids"] = serialize_tensor(hypo_ids)
        if not self.manager.config.server_batching:
            extra["batch"] = False  # keep this session's steps out of the server's cross-session batches
        self.with_receipt(extra, self.manager.config.receipt_interval)
        await self.stream.send(span_request(self.span, hidden, position_ids, attention_mask, self.output_codec,
                                            **extra))

    async def receive_step(self, step_id: int, timeout: float, tokens: int = 0) -> dict:
        """The server's reply to step ``step_id``: its ``hidden`` output, and whether it is ``pushing`` it on.
        ``tokens``: batch rows x new positions the step carried (what the server may bill for it)."""
        reply = await self._receive(step_id, "hidden", timeout)
        if not is_serialized_tensor(reply.get("hidden")):
            raise PeerUnavailable(f"server {self.span} sent a step reply without hidden states", self.span.peer_id)
        self.take_receipt(reply, step_id, tokens)
        self.manager.succeeded(self.span.peer_id)  # on every path, pushed steps included
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
        await self.stream.request(messages.link(target, None if upstream is None else upstream.span.peer_id),
                                  timeout=timeout)
