"""The server's RPCs for any kind of blocks: info, sessions (session_loop.py), pushes, one-shot forward/backward.

Every request is checked before it reaches the blocks or a session: by the blocks (swarm/blocks/served.py: inputs,
memory, predicted cost) and by the admission of its caller (admission.py: pace, session counts, memory share). A
bad request gets an error reply for its caller only; other callers and their sessions are never touched. Compute
runs on one thread shared in pieces between peers (compute.py); work whose caller has gone is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial

import torch
from hivemind.p2p import P2P

from swarm.blocks.served import Bounds, Prepared, ServedBlocks, SpanSpeed
from swarm.blocks.span import read_codec
from swarm.compression import PayloadError, serialize_tensor
from swarm.rpc import protocol
from swarm.rpc.framing import MalformedMessage, MessageTooLarge, read_message, write_message
from swarm.rpc.protocol import RequestError
from swarm.server.admission import Admission, PeerLimits, RateLimited, Refused
from swarm.server.batching import DecodeBatches
from swarm.server.compute import ComputeQueue
from swarm.server.sessions import Busy, ServerSession, SessionTable
from swarm.trust.commitment import commit
from swarm.trust.faults import Faults

logger = logging.getLogger(__name__)


@dataclass
class Limits:
    max_message_bytes: int = 256 * 1024**2  # refused from the header alone
    max_batch_tokens: int = 8192  # batch rows x new tokens in one request
    max_session_length: int = 8192  # prompt + generated positions of one inference session
    session_timeout: float = 300.0  # a session idle this long is closed and its memory freed
    open_timeout: float = 30.0  # a stream must send its first message within this
    max_diffusion_sessions: int = 16  # U-Net servers: session memory is this many generations at the model's size
    batch_decode: bool = True  # run waiting decode steps of several sessions as one call (batching.py)
    max_decode_batch: int = 32  # rows in one such call
    max_request_seconds: float = 120.0  # predicted compute time of one request, refused beyond (split it)
    max_attention_tokens: int = 128 * 128  # U-Net: positions one image attends over at a level
    max_encoder_tokens: int = 4096  # U-Net: cross-attention keys per row
    peers: PeerLimits = field(default_factory=PeerLimits)  # what one caller may ask (admission.py)

    def bounds(self) -> Bounds:
        return Bounds(max_batch_tokens=self.max_batch_tokens, max_session_length=self.max_session_length,
                      max_request_seconds=self.max_request_seconds, max_attention_tokens=self.max_attention_tokens,
                      max_encoder_tokens=self.max_encoder_tokens)


class Handler:
    """Serves one kind of blocks (``blocks.kind``): a span's or levels' sessions, pushes, forward and backward."""

    DISCARD_SECONDS = 2.0
    LINGER_SECONDS = 1.0
    ERROR_WRITE_SECONDS = 10.0  # a caller that does not read its error reply must not hold the stream forever

    def __init__(self, blocks: ServedBlocks, sessions: SessionTable, limits: Limits, info: Callable[[], dict],
                 compute_queue: ComputeQueue | None = None):
        self.blocks, self.sessions, self.limits, self.info = blocks, sessions, limits, info
        self.bounds = limits.bounds()
        self.admission = Admission(limits.peers, sessions)
        self.served: dict[str, int] = {kind: 0 for kind in (*blocks.one_shots, *blocks.session_steps)}
        self.steps_served = 0  # session steps, shown by info
        self.failures = 0  # requests that failed with an unexpected exception (internal errors), shown by info
        self.cost_refusals = 0  # requests refused because their peer had too much compute queued, shown by info
        self.pushes = {"sent": 0, "failed": 0, "received": 0}  # server-to-server hand-offs, shown by info
        self.faults = Faults.from_env()  # tests only: see swarm/trust/faults.py
        self.settlement = None  # a SessionSettlement with --settlement (swarm/server/settlement.py)
        self.prover = None  # a Prover with --zk (swarm/server/proofs.py)
        self.p2p: P2P | None = None
        batching = limits.batch_decode and blocks.kind == "span"
        # One compute thread, shared fairly between peers in pieces (compute.py); the event loop stays free for I/O.
        self.compute_queue = compute_queue or ComputeQueue()
        self.compute_queue.batch_runner = DecodeBatches(self.served) if batching else None
        self.compute_queue.max_batch = max(1, limits.max_decode_batch)
        if self.faults.active:
            logger.warning(f"This server misbehaves on purpose for tests: {self.faults}")

    # ---- registration

    def rpcs(self) -> dict[str, Callable[..., Awaitable[None]]]:
        from swarm.server import session_loop

        rpcs = {protocol.INFO: self.rpc_info, protocol.PUSH: partial(session_loop.rpc_push, self),
                protocol.SESSION_RPCS[self.blocks.kind]: partial(session_loop.serve_session, self)}
        if "forward" in self.blocks.one_shots:
            rpcs[protocol.FORWARD] = partial(self.rpc_one_shot, "forward", "hidden")
        if "backward" in self.blocks.one_shots:
            rpcs[protocol.BACKWARD] = partial(self.rpc_one_shot, "backward", "grad_input")
        rpcs[protocol.PROOF] = self.rpc_proof
        return rpcs

    async def register(self, p2p: P2P) -> None:
        self.p2p = p2p  # also for calling other servers (pushes)
        for name, rpc in self.rpcs().items():
            # pushes pace their callers themselves (session_loop.rpc_push): a busy upstream server pushes for many
            await p2p.add_binary_stream_handler(name, partial(self._serve, rpc, name != protocol.PUSH))

    def set_blocks(self, blocks: ServedBlocks) -> None:
        """Serve new requests and sessions from ``blocks``; sessions already open keep the blocks they opened on."""
        self.blocks = blocks

    # kept for the rebalancing code's sake (a span moved to other blocks)
    set_span = set_blocks

    @property
    def pending(self) -> int:
        """Requests waiting for or running on the compute thread: the load a server announces."""
        return self.compute_queue.pending

    def measured_speed(self) -> SpanSpeed | None:
        """For blocks whose speed follows the requests served (U-Net levels: measured at start where possible, then
        on each evaluation), that speed (announced like a measured one)."""
        speed = getattr(self.blocks, "announced_speed", None)
        return speed() if speed is not None else None

    def shutdown(self) -> None:
        self.compute_queue.stop()
        if self.prover is not None:
            self.prover.shutdown()

    # ---- every request

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
            await self.send_error(writer, e)
            # Closing at once would reset the stream under a caller still writing, losing our reply: swallow
            # what it sends for a short, bounded time instead.
            with suppress(Exception):
                await asyncio.wait_for(self._discard(reader), self.DISCARD_SECONDS)
        except (RequestError, MalformedMessage) as e:
            logger.info(f"Rejected a request from {peer[-8:]}: {e}")
            await self.send_error(writer, e)
        except (ConnectionError, asyncio.IncompleteReadError):
            logger.debug(f"Connection from {peer[-8:]} broke", exc_info=True)
        except Exception as e:
            logger.exception(f"Failed to serve a request from {peer[-8:]}")
            self.failures += 1  # a bug, not a bad request: shown by info
            await self.send_error(writer, RuntimeError(f"internal error: {type(e).__name__}: {e}"))
        finally:
            # Closing right after the reply sometimes lost it (about 1 info call in 500 under concurrent load):
            # wait briefly for the caller to close its side first, which it does once it has read the reply.
            with suppress(Exception):
                await asyncio.wait_for(self._discard(reader), self.LINGER_SECONDS)
            with suppress(Exception):
                writer.close()

    @staticmethod
    async def _discard(reader: asyncio.StreamReader) -> None:
        while await reader.read(2**16):
            pass

    @classmethod
    async def send_error(cls, writer: asyncio.StreamWriter, error: BaseException) -> None:
        with suppress(Exception):
            await asyncio.wait_for(write_message(writer, error_reply(error)), cls.ERROR_WRITE_SECONDS)

    async def read_request(self, reader: asyncio.StreamReader, timeout: float | None = None) -> dict | None:
        """The next message; with ``timeout``, a caller that does not send it in time is refused (a stream opened
        and left silent would otherwise be held forever)."""
        try:
            return await asyncio.wait_for(read_message(reader, self.limits.max_message_bytes), timeout)
        except TimeoutError:
            raise RequestError(f"no complete request within {timeout:.0f} s") from None

    async def rpc_info(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.read_request(reader, self.limits.open_timeout)
        await write_message(writer, self.info())

    # ---- computing a request

    async def run(self, peer: str, kind: str, message: dict, session: ServerSession | None,
                  gone: asyncio.Event | None = None) -> tuple[dict, list | dict]:
        """Check ``message`` (a ``kind`` request, in ``session`` or one-shot), compute it in ``peer``'s turns, and
        build its reply; returns the reply and its main output encoded (what a push carries). If ``gone`` is set
        before the work is done (its caller went away), the work is dropped and ``ConnectionError`` raised."""
        blocks = session.state.blocks if session is not None else self.blocks
        if self.faults.black_hole:  # tests only: a server that takes requests and never answers
            await asyncio.Event().wait()
        prepared = blocks.prepare(kind, message, session.state if session is not None else None, self.bounds)
        codec = read_codec(message, "output_codec", default=session.output_codec if session else "none")
        cost = self.charge(peer, prepared, blocks)
        timing: dict = {}
        run = self.faults.slowed(prepared.run)
        # submitted in this turn of the loop, right after its cost was checked: another request's check sees it
        job = self.compute_queue.submit(peer, run, batch_key=prepared.batch_key, payload=prepared.payload, cost=cost,
                                        serial=prepared.serial)
        work = asyncio.ensure_future(self.compute_queue.result(job, timing))
        try:
            if gone is None:
                result = await work
            else:
                waiter = asyncio.ensure_future(gone.wait())
                try:
                    await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if not work.done():
                    work.cancel()  # the compute thread drops it at its next piece
                    raise ConnectionError("the caller went away; its work was dropped")
                result = work.result()
        except blocks.input_errors as e:  # what the blocks still cannot take is the request's fault
            raise RequestError(blocks.input_error_message(e)) from None
        finally:
            if not work.done():
                work.cancel()
            if not job.future.done():  # also if its waiter was cancelled before it started
                job.future.cancel()
        computed = time.perf_counter()
        fields, tensors = prepared.finish(result)
        blocks.measured_request(prepared.flops, timing.get("compute", 0.0))
        reply, main = self._encode(fields, tensors, prepared, codec)
        self.served[kind] = self.served.get(kind, 0) + 1
        if session is not None:
            session.tokens_processed += prepared.usage
            session.steps += 1
            self.steps_served += 1
        if message.get("trace") is True:  # the client's timeline (swarm/client/trace.py)
            now = time.perf_counter()
            received = message.get("_received")
            # durations (queue, compute, encode), then this host's clock when the request arrived and when its
            # reply was ready: comparable with the client's own clock only when both run on one machine
            reply["timing"] = [timing.get("queued", 0.0), timing.get("compute", 0.0), now - computed,
                               received if isinstance(received, float) else None, now]
        return reply, main

    def charge(self, peer: str, prepared: Prepared, blocks: ServedBlocks) -> float:
        """The request's predicted compute seconds, refused as busy if ``peer`` already has that much queued: a
        flood of expensive requests is turned away before it is queued, whatever their number."""
        rate = blocks.flops_per_second
        cost = prepared.flops / rate if rate else 0.0
        queued = self.compute_queue.queued_cost.get(peer, 0.0)
        limit = self.limits.peers.max_queued_seconds
        if queued > 0 and queued + cost > limit:
            self.cost_refusals += 1
            raise Busy(f"busy: your requests waiting here already take about {queued:.1f} s of compute (limit "
                       f"{limit:g} s per peer); send more once they are answered")
        return cost

    def _encode(self, fields: dict, tensors: dict[str, torch.Tensor], prepared: Prepared,
                codec: str) -> tuple[dict, list | dict]:
        reply, main = dict(fields), None
        for index, (name, tensor) in enumerate(tensors.items()):
            if index == 0:  # the main output: what a faulty server corrupts, and what a commitment covers
                tensor = self.faults.corrupt(tensor)
                reply["commitment"] = commit(tensor)
            try:
                reply[name] = serialize_tensor(tensor.to(prepared.dtype), codec)
            except PayloadError as e:  # e.g. the blocks produced inf in float16
                raise RequestError(f"cannot encode the output: {e}") from None
            if index == 0:
                main = reply[name]
        return reply, main

    async def rpc_one_shot(self, kind: str, output: str, peer: str, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """Forward or backward: one request, one reply. A caller that closes its stream before the reply (it gave
        up) has its work dropped."""
        message = await self.read_request(reader, self.limits.session_timeout)
        if message is None:
            return
        if self.settlement is not None and self.settlement.require_payment:
            raise RequestError(f"payment required: this server bills inference sessions only, so it does not serve "
                               f"{kind} requests")
        challenged = kind == "forward" and message.get("challenge") is True
        job: tuple | str = "this server makes no proofs (it runs without --zk)"
        if challenged and self.prover is not None:  # checked before computing: the input is the caller's
            job = self.prover.admit(peer, self.blocks, message, self.bounds)
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_eof(reader, gone))
        try:
            reply, _ = await self.run(peer, kind, message, None, gone)
        finally:
            watcher.cancel()
        if kind == "backward":
            reply.pop("commitment", None)  # a gradient is not checked against commitments
        if challenged:  # the proof is made after this reply, in the prover's worker process
            if isinstance(job, tuple):
                reply["proof_ticket"] = self.prover.submit(peer, job)
            else:
                reply["proof_refused"] = job
        await write_message(writer, reply)

    async def rpc_proof(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The proof of a challenged forward, by its ticket (see swarm/server/proofs.py)."""
        message = await self.read_request(reader, self.limits.open_timeout)
        if message is None:
            return
        if self.prover is None:
            raise RequestError("this server makes no proofs (it runs without --zk)")
        await write_message(writer, await self.prover.reply(peer, message))


def error_reply(error: BaseException) -> dict:
    """An error for its caller: ``busy`` tells a client that the server is full for now (try another, no fault)."""
    reply = {"error": str(error)}
    if isinstance(error, Busy):
        reply["busy"] = True
    return reply


async def _watch_eof(reader: asyncio.StreamReader, gone: asyncio.Event) -> None:
    """Set ``gone`` when the caller closes its side (after its request, a caller sends nothing more)."""
    with suppress(Exception):
        while await reader.read(2**16):
            pass
    gone.set()

