"""Streaming inference sessions on a server, with server-to-server push.

A session lives as long as its client's stream: ``open`` reserves cache and answers with a session id; then
``step`` messages are answered one by one. Steps reach a session from two sources: its client's stream, and
``push`` calls from the server before it in the chain (its ``upstream``, named by the client at open). After a
step, a session that was ``link``ed to a ``downstream`` session sends its output there directly, so a decode step
costs one pass along the chain instead of a client round trip per server. It still answers its client at once (who
keeps every hop's inputs for replays), then tells it whether the push went through, so that the client relays the
step itself otherwise. Steps carry ids: a step that arrives twice (pushed, then relayed) is run once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from swarm.blocks import compat
from swarm.rpc import protocol
from swarm.rpc.client import call
from swarm.rpc.framing import write_message
from swarm.rpc.protocol import RequestError, get_field
from swarm.server.batching import DecodeStep
from swarm.server.sessions import ServerSession
from swarm.server.validation import read_block_range, read_tensor
from swarm.trust.commitment import commit

if TYPE_CHECKING:
    from swarm.server.handler import BlockHandler

logger = logging.getLogger(__name__)

REMEMBERED_STEPS = 64  # step ids kept per session to drop duplicates
INBOX_SIZE = 8  # messages queued per session: past that its client's stream is not read (backpressure)


async def serve_session(handler: BlockHandler, peer: str, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    handler.admission.check_session_count(peer)  # before reading the open message; checked again at open
    message = await handler.read_one_request(reader)
    if message is None:
        return
    kind = get_field(message, "type", str)
    if kind == "step":  # sessions live and die with their stream, so a step on a new stream is always stale
        raise RequestError(f"unknown session {message.get('session_id')!r}: open a session first")
    if kind != "open":
        raise RequestError(f"expected an 'open' message, got {kind!r}")
    session = open_session(handler, peer, message)
    # Bounded: a client sending steps faster than they run (or a flood of pushes) must not pile up in memory.
    inbox: asyncio.Queue = asyncio.Queue(INBOX_SIZE)
    session.inbox = inbox
    pump = asyncio.create_task(_pump_client(handler, reader, inbox))
    timeout = handler.limits.session_timeout

    async def reply(message: dict) -> None:
        # A client that stops reading its replies would otherwise hold the session and its cache forever.
        try:
            await asyncio.wait_for(write_message(writer, message), timeout)
        except TimeoutError:
            raise RequestError(f"replies not read for {timeout:.0f} s; session closed") from None

    try:
        await reply({"session_id": session.session_id, "max_length": session.max_length,
                     "cache_tokens_left": handler.sessions.tokens_left})
        done_steps: deque = deque(maxlen=REMEMBERED_STEPS)
        while True:
            try:
                item = await asyncio.wait_for(inbox.get(), timeout)
            except TimeoutError:
                raise RequestError(f"session idle for {timeout:.0f} s; closed") from None
            if isinstance(item, BaseException):
                raise item  # the client's stream broke or sent something unreadable
            if item is not None and "receipt" in item and handler.settlement is not None:
                handler.settlement.accept(session, item["receipt"])  # countersigned, with a step or the close
            if item is None or item.get("type") == "close":
                return
            if item.get("type") == "link":
                try:
                    await handler.admission.throttle(session.peer)
                    answer = _link(session, item)
                except RequestError as e:  # this link is refused; the session stays as it was
                    answer = {"error": str(e)}
                await reply(answer)
                continue
            step_id = item.get("step_id")
            if step_id is not None and step_id in done_steps:
                continue  # pushed and then relayed too: already answered
            output = None
            try:
                # Pushed steps too are paced by the session's client: they are its steps, and push or relay
                # should cost it the same.
                await handler.admission.throttle(session.peer)
                answer, output = await run_step(handler, session, item)
                if handler.settlement is not None:  # the session's usage so far, signed
                    answer["receipt"] = handler.settlement.issue(session)
                if step_id is not None:
                    done_steps.append(step_id)
                # Only steps with an id are pushed on: the id is what stops a step that a cycle of links (a session
                # linked to itself, or two to each other) brings back, which would otherwise run forever.
                answer["pushing"] = bool(item.get("push") and step_id is not None and session.downstream is not None)
            except RequestError as e:  # this step is refused; the session and its cache stay as they were
                logger.info(f"Refused a step of session {session.session_id[:8]} from {peer[-8:]}: {e}")
                answer = {"error": str(e)}
            answer["step_id"] = step_id
            await reply(answer)
            if answer.get("pushing"):  # after the reply, so a slow next server never delays our answer
                await reply({"step_id": step_id, "pushed": await _push(handler, session, item, output)})
    finally:
        pump.cancel()
        handler.sessions.close(session.session_id)
        if handler.settlement is not None:
            handler.settlement.finish(session)
        logger.debug(f"Closed session {session.session_id[:8]}: {session.tokens_processed} tokens")


async def _pump_client(handler: BlockHandler, reader: asyncio.StreamReader, inbox: asyncio.Queue) -> None:
    try:
        while True:
            message = await handler.read_request(reader)
            if message is not None and message.get("trace") is True:
                message["_received"] = time.perf_counter()  # for the client's timeline (never read from the wire)
            await inbox.put(message)
            if message is None:
                return
    except Exception as e:
        await inbox.put(e)


def open_session(handler: BlockHandler, peer: str, message: dict) -> ServerSession:
    span = handler.span
    start, end = read_block_range(message, span.start, span.end)
    max_length = get_field(message, "max_length", int)
    batch_size = get_field(message, "batch_size", int, default=1)
    limits = handler.limits
    if not 0 < max_length <= limits.max_session_length:
        raise RequestError(f"max_length must be in [1, {limits.max_session_length}], got {max_length}")
    if not 0 < batch_size <= limits.max_batch_tokens:
        raise RequestError(f"batch_size must be in [1, {limits.max_batch_tokens}], got {batch_size}")
    upstream = get_field(message, "upstream", str, default=None)
    output_codec = handler.output_codec(message)
    handler.admission.check_open(peer, batch_size)
    session = handler.sessions.open(peer, start, end, batch_size, max_length, span,
                                    peer_share=limits.peers.max_peer_cache_share)
    session.upstream, session.output_codec = upstream, output_codec
    return session


def _link(session: ServerSession, message: dict) -> dict:
    """Set where this session pushes its outputs, and/or whom it accepts pushes from."""
    if message.get("session_id", session.session_id) != session.session_id:
        raise RequestError(f"unknown session {message.get('session_id')!r}: a stream links only its own session")
    downstream, upstream = session.downstream, session.upstream
    if "downstream" in message:  # every field is checked before any is set: a refused link changes nothing
        downstream = message["downstream"]
        if downstream is not None:
            if not isinstance(downstream, dict):
                raise RequestError("downstream must be a map or null")
            downstream = {key: get_field(downstream, key, kind) for key, kind in
                          (("peer", str), ("session_id", str), ("start", int), ("end", int))}
    if "upstream" in message:
        upstream = get_field(message, "upstream", str, default=None)
    session.downstream, session.upstream = downstream, upstream
    return {"linked": True}


async def accept_push(handler: BlockHandler, peer: str, message: dict) -> dict:
    """A step pushed by the server before us in the chain: queued into that session like a client's step."""
    session = handler.sessions.get(message.get("session_id"))
    if session.upstream != peer:
        raise RequestError("pushes to this session are accepted only from the server its client named")
    step = message.get("step")
    # Only steps: the upstream may feed the session, but not relink or close it (that is its client's say).
    if not isinstance(step, dict) or step.get("type") != "step":
        raise RequestError("a push must carry a step")
    try:
        if step.get("trace") is True:
            step["_received"] = time.perf_counter()
        session.inbox.put_nowait(step)
    except asyncio.QueueFull:  # the session is behind: its client relays this step itself
        raise RequestError("session busy: too many queued steps") from None
    handler.pushes["received"] += 1
    return {"queued": True}


async def _push(handler: BlockHandler, session: ServerSession, step: dict, output: dict) -> bool:
    downstream = session.downstream
    pushed = {key: step[key] for key in ("position", "position_ids", "attention_mask", "hypo_ids", "step_id",
                                         "trace") if key in step}
    pushed.update(type="step", push=True, session_id=downstream["session_id"], start=downstream["start"],
                  end=downstream["end"], hidden=output)
    try:
        await call(handler.p2p, downstream["peer"], protocol.PUSH,
                   {"session_id": downstream["session_id"], "step": pushed}, timeout=protocol.PUSH_TIMEOUT)
        handler.pushes["sent"] += 1
        return True
    except Exception as e:  # unreachable, refused, slow: the client relays this step itself
        logger.info(f"Push to {downstream['peer'][-8:]} failed ({e}); the client will relay")
        handler.pushes["failed"] += 1
        return False


async def run_step(handler: BlockHandler, session: ServerSession, message: dict) -> tuple[dict, dict]:
    """Validate and run one step; returns the reply and the encoded output (also what a push carries)."""
    handler.steps_served += 1
    fail_after = handler.faults.error_after_steps
    if fail_after is not None and handler.steps_served > fail_after:
        raise RequestError(f"injected fault ({fail_after} steps served)")
    if get_field(message, "type", str) != "step":
        raise RequestError(f"expected a 'step', 'link' or 'close' message, got {message.get('type')!r}")
    if message.get("session_id") != session.session_id:
        raise RequestError(f"unknown session {message.get('session_id')!r}")
    position = get_field(message, "position", int, default=session.length)
    if not 0 <= position <= session.length:
        raise RequestError(f"step starts at position {position}, but {session.length} positions are cached")
    start, end = read_block_range(message, session.start, session.end)
    if (start, end) != (session.start, session.end):
        raise RequestError(f"this session runs blocks {session.start}:{session.end}, not {start}:{end}")
    span = session.span
    first, last, hidden, positions, mask = handler.read_span_inputs(message, span, past=position)
    batch, tokens, _ = hidden.shape
    if batch != session.batch_size:
        raise RequestError(f"batch of {batch} rows, but the session was opened for {session.batch_size}")
    if position + tokens > session.max_length:
        raise RequestError(f"length {position + tokens} exceeds the session's max_length {session.max_length}")
    hypo_ids = read_tensor(message, "hypo_ids", max_numel=batch, required=False)
    if hypo_ids is not None and (hypo_ids.dtype != torch.int64 or list(hypo_ids.shape) != [batch]
                                 or hypo_ids.min() < 0 or hypo_ids.max() >= batch):
        raise RequestError(f"hypo_ids must be int64 of shape [{batch}] with values in [0, {batch})")
    codec = handler.output_codec(message, default=session.output_codec)
    # "batch": false keeps this step out of cross-session batches (batching.py), e.g. to time it alone
    batchable = get_field(message, "batch", bool, default=True) and tokens == 1 and hypo_ids is None

    times = {"submitted": time.perf_counter()}

    def run():  # on the compute thread, in pieces (a layer each)
        times["started"] = time.perf_counter()
        compat.truncate_cache(session.cache, position)  # a client rewinding (or replaying) to `position`
        if hypo_ids is not None:
            compat.reorder_cache(session.cache, hypo_ids)
        try:
            return (yield from span.forward_pieces(hidden.to(span.dtype), positions, mask, session.cache, first,
                                                   last))
        except BaseException:  # an error, or the job dropped because its client went away
            compat.truncate_cache(session.cache, position)  # undo what the layers that ran have written
            raise

    try:
        if batchable:
            output = await handler.compute_decode(session.peer, DecodeStep(
                run, span, session.cache, first, last, position, hidden.to(span.dtype), positions, mask))
        else:
            output = await handler.compute(session.peer, run)
    except ValueError as e:  # e.g. rewinding a sliding window past what it kept
        raise RequestError(str(e)) from None
    computed = time.perf_counter()
    session.length = position + tokens
    session.tokens_processed += batch * tokens
    session.steps += 1
    output = handler.faults.corrupt(output)
    encoded = handler.encode(output.to(hidden.dtype), codec)
    reply = {"hidden": encoded, "position": session.length, "commitment": commit(output)}
    if message.get("trace") is True:  # the client's timeline (swarm/client/trace.py)
        started = times.get("started", times["submitted"])  # a batched step ran inside another step's call
        now = time.perf_counter()
        # durations (queue, compute, encode), then this host's clock when the step arrived and when it was done:
        # comparable with the client's own clock only when both run on one machine
        received = message.get("_received")
        reply["timing"] = [started - times["submitted"], computed - started, now - computed,
                           received if isinstance(received, float) else None, now]
    return reply, encoded
