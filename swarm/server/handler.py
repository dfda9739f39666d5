"""The server's RPCs: info, forward, backward, and (in inference.py) streaming inference and push.

Every request is validated before it reaches the blocks or a cache. A bad request gets an error reply for its
caller only; other callers and their sessions are never touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial

import torch
from hivemind.p2p import P2P

from swarm.blocks.span import BlockSpan
from swarm.compression import CODECS, PayloadError, serialize_tensor
from swarm.rpc import protocol
from swarm.rpc.framing import MalformedMessage, MessageTooLarge, read_message, write_message
from swarm.rpc.protocol import RequestError, get_field
from swarm.server.admission import Admission, PeerLimits, RateLimited, Refused
from swarm.server.batching import DecodeBatches, DecodeStep
from swarm.server.compute import ComputeQueue, Work, single
from swarm.server.inference import accept_push, serve_session
from swarm.server.sessions import SessionTable
from swarm.server.throughput import SpanSpeed
from swarm.server.validation import (
    read_attention_mask,
    read_block_range,
    read_hidden,
    read_position_ids,
)
from swarm.trust.commitment import commit
from swarm.trust.faults import Faults

logger = logging.getLogger(__name__)


@dataclass
class Limits:
    max_message_bytes: int = 256 * 1024**2  # refused from the header alone
    max_batch_tokens: int = 8192  # batch rows x new tokens in one request
    max_session_length: int = 8192  # prompt + generated positions of one inference session
    session_timeout: float = 300.0  # an inference session idle this long is closed and its cache freed
    max_diffusion_sessions: int = 16  # generations a U-Net server serves at once (each keeps skips per step)
    batch_decode: bool = True  # run waiting decode steps of several sessions as one call (batching.py)
    max_decode_batch: int = 32  # rows in one such call
    peers: PeerLimits = field(default_factory=PeerLimits)  # what one caller may ask (admission.py)


class HandlerBase:
    """What every kind of server handler shares: error handling per request, the compute thread, codecs."""

    # RPCs that pace their callers themselves instead of paying at stream open (see BlockHandler.rpc_push)
    SELF_PACED: tuple[str, ...] = ()

    def __init__(self, span: torch.nn.Module, sessions: SessionTable, limits: Limits, info: Callable[[], dict]):
        self.span, self.sessions, self.limits, self.info = span, sessions, limits, info
        self.admission = Admission(limits.peers, sessions)
        self.served: dict[str, int] = {}  # requests answered, by kind, shown by info
        # One compute thread, shared fairly between peers in pieces (compute.py); the event loop stays free for I/O.
        self.compute_queue = ComputeQueue(batch_runner=self.batch_runner(), max_batch=limits.max_decode_batch)
        self.steps_served = 0  # inference steps (transformer blocks only), shown by info
        self.pushes: dict[str, int] = {}  # server-to-server hand-offs (transformer blocks only), shown by info
        self.faults = Faults.from_env()  # tests only: see swarm/trust/faults.py
        self.settlement = None  # a SessionSettlement with --settlement (swarm/server/settlement.py)
        if self.faults.active:
            logger.warning(f"This server misbehaves on purpose for tests: {self.faults}")

    def rpcs(self) -> dict[str, Callable[..., Awaitable[None]]]:
        return {protocol.INFO: self.rpc_info}

    def batch_runner(self) -> Callable | None:
        """What runs merged jobs (decode steps) on the compute thread; None: nothing is merged."""
        return None

    @property
    def pending(self) -> int:
        """Requests waiting for or running on the compute thread: the load a server announces."""
        return self.compute_queue.pending

    def measured_speed(self) -> SpanSpeed | None:
        """A speed measured on the requests served, for spans not measured at start (U-Net levels)."""
        return None

    async def register(self, p2p: P2P) -> None:
        self.p2p = p2p  # also for calling other servers (pushes)
        for name, rpc in self.rpcs().items():
            await p2p.add_binary_stream_handler(name, partial(self._serve, rpc, name not in self.SELF_PACED))

    def set_span(self, span: torch.nn.Module) -> None:
        """Serve new requests and sessions from ``span``; sessions already open keep the span they started on."""
        self.span = span

    def count(self, kind: str) -> None:
        self.served[kind] = self.served.get(kind, 0) + 1

    def shutdown(self) -> None:
        self.compute_queue.stop()

    async def _serve(self, rpc: Callable[..., Awaitable[None]], paced: bool, stream_info,
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id.to_base58()
        try:
            if paced:  # before reading a byte of the request
                await self.admission.throttle(peer)
            await rpc(peer, reader, writer)
        except (MessageTooLarge, Refused) as e:
            log = logger.debug if isinstance(e, RateLimited) else logger.info
            log(f"Rejected a request from {peer[-8:]}: {e}")
            await self._send_error(writer, str(e))
            # Closing at once would reset the stream under a caller still writing, losing our reply: swallow
            # what it sends for a short, bounded time instead.
            with suppress(Exception):
                await asyncio.wait_for(self._discard(reader), self.DISCARD_SECONDS)
        except (RequestError, MalformedMessage) as e:
            logger.info(f"Rejected a request from {peer[-8:]}: {e}")
            await self._send_error(writer, str(e))
        except (ConnectionError, asyncio.IncompleteReadError):
            logger.debug(f"Connection from {peer[-8:]} broke", exc_info=True)
        except Exception as e:
            logger.exception(f"Failed to serve a request from {peer[-8:]}")
            await self._send_error(writer, f"internal error: {type(e).__name__}: {e}")
        finally:
            # Closing right after the reply sometimes lost it (about 1 info call in 500 under concurrent load):
            # wait briefly for the caller to close its side first, which it does once it has read the reply.
            with suppress(Exception):
                await asyncio.wait_for(self._discard(reader), self.LINGER_SECONDS)
            with suppress(Exception):
                writer.close()

    DISCARD_SECONDS = 2.0
    LINGER_SECONDS = 1.0

    @staticmethod
    async def _discard(reader: asyncio.StreamReader) -> None:
        while await reader.read(2**16):
            pass

    ERROR_WRITE_SECONDS = 10.0  # a caller that does not read its error reply must not hold the stream forever

    @classmethod
    async def _send_error(cls, writer: asyncio.StreamWriter, message: str) -> None:
        with suppress(Exception):
            await asyncio.wait_for(write_message(writer, {"error": message}), cls.ERROR_WRITE_SECONDS)

    async def compute(self, peer: str, work: Work, **options: object) -> torch.Tensor:
        """``work`` (a generator function: pieces, see compute.py) on the compute thread, in ``peer``'s turn."""
        return await self.compute_queue.run(peer, work, **options)

    async def compute_decode(self, peer: str, step: DecodeStep) -> torch.Tensor:
        """A decode step on the compute thread, merged with other sessions' waiting steps when the server allows
        it (else alone, like ``compute``)."""
        if not self.limits.batch_decode:
            return await self.compute(peer, step.run_alone)
        return await self.compute(peer, step.run_alone, batch_key=step.key, payload=step)

    async def read_request(self, reader: asyncio.StreamReader, timeout: float | None = None) -> dict | None:
        """The next message; with ``timeout``, a caller that does not send it in time is refused (a stream opened
        and left silent would otherwise be held forever)."""
        try:
            return await asyncio.wait_for(read_message(reader, self.limits.max_message_bytes), timeout)
        except TimeoutError:
            raise RequestError(f"no complete request within {timeout:.0f} s") from None

    async def read_one_request(self, reader: asyncio.StreamReader) -> dict | None:
        """The request of a one-shot RPC (or a session's ``open``)."""
        return await self.read_request(reader, self.limits.session_timeout)

    @staticmethod
    def encode(tensor: torch.Tensor, codec: str) -> dict:
        try:
            return serialize_tensor(tensor, codec)
        except PayloadError as e:  # e.g. the blocks produced inf in float16
            raise RequestError(f"cannot encode the output: {e}") from None

    @staticmethod
    def output_codec(message: dict, default: str = "none") -> str:
        codec = get_field(message, "output_codec", str, default=default)
        if codec not in CODECS:
            raise RequestError(f"unknown output codec {codec!r}; known: {sorted(CODECS)}")
        return codec

    async def rpc_info(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.read_one_request(reader)
        await write_message(writer, self.info())


class BlockHandler(HandlerBase):
    """Transformer blocks: forward, backward, inference sessions and pushes between servers."""

    SELF_PACED = (protocol.PUSH,)

    def __init__(self, span: BlockSpan, sessions: SessionTable, limits: Limits, info: Callable[[], dict]):
        super().__init__(span, sessions, limits, info)
        self.steps_served = 0
        self.pushes = {"sent": 0, "failed": 0, "received": 0}  # server-to-server hand-offs, shown by info
        self.served.update(forward=0, backward=0)
        self.max_position = getattr(span.config, "max_position_embeddings", None) or 2**31 - 1

    def batch_runner(self) -> Callable | None:
        return DecodeBatches(self.served) if self.limits.batch_decode else None

    def rpcs(self) -> dict[str, Callable[..., Awaitable[None]]]:
        return {**super().rpcs(), protocol.FORWARD: self.rpc_forward, protocol.BACKWARD: self.rpc_backward,
                protocol.INFERENCE: self.rpc_inference, protocol.PUSH: self.rpc_push}

    def read_span_inputs(self, message: dict, span: BlockSpan, past: int = 0):
        """Local layer range in ``span``, hidden states, positions and mask of a forward/backward/step request."""
        start, end = read_block_range(message, span.start, span.end)
        hidden = read_hidden(message, span.hidden_size, self.limits.max_batch_tokens)
        batch, tokens, _ = hidden.shape
        positions = read_position_ids(message, batch, tokens, self.max_position)
        mask = read_attention_mask(message, batch, past + tokens)
        return start - span.start, end - span.start, hidden, positions, mask

    async def rpc_forward(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message = await self.read_one_request(reader)
        if message is None:
            return
        span = self.span
        first, last, hidden, positions, mask = self.read_span_inputs(message, span)
        codec = self.output_codec(message)

        def run():
            return (yield from span.forward_pieces(hidden.to(span.dtype), positions, mask, None, first, last))

        output = self.faults.corrupt(await self.compute(peer, run))
        self.count("forward")
        await write_message(writer, {"hidden": self.encode(output.to(hidden.dtype), codec),
                                     "commitment": commit(output)})

    async def rpc_backward(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Gradient of the span's output w.r.t. its input, recomputing the forward (nothing is kept between calls)."""
        message = await self.read_one_request(reader)
        if message is None:
            return
        span = self.span
        first, last, hidden, positions, mask = self.read_span_inputs(message, span)
        grad_output = read_hidden(message, span.hidden_size, self.limits.max_batch_tokens, name="grad_output")
        if grad_output.shape != hidden.shape:
            raise RequestError(f"grad_output has shape {list(grad_output.shape)}, hidden {list(hidden.shape)}")
        codec = self.output_codec(message)

        def run() -> torch.Tensor:
            with torch.enable_grad():
                inputs = hidden.to(span.dtype).requires_grad_(True)
                outputs = span(inputs, positions, mask, None, first, last)
                (grad,) = torch.autograd.grad(outputs, inputs, grad_output.to(outputs.device, outputs.dtype))
            return grad

        grad = await self.compute(peer, single(run))  # one piece: grad mode must not leak to others' pieces
        self.count("backward")
        await write_message(writer, {"grad_input": self.encode(grad.to(hidden.dtype), codec)})

    async def rpc_inference(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_session(self, peer, reader, writer)

    async def rpc_push(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A server pushes the steps of every client whose chain goes on to us: each pushed step is paced by its
        # session's client (in serve_session), not by the pusher's own bucket, which would throttle a busy server
        # for all of its clients at once. A peer that no session named as its upstream pays like any caller.
        named = self.sessions.names_upstream(peer)
        if not named:
            await self.admission.throttle(peer)
        message = await self.read_one_request(reader)
        if message is None:
            return
        try:
            reply = await accept_push(self, peer, message)
        except RequestError:
            if named:  # a refused push costs its sender
                await self.admission.throttle(peer)
            raise
        await write_message(writer, reply)
