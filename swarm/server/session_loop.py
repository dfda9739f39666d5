"""One session loop for every kind of blocks: a transformer inference session, a U-Net generation.

A session lives as long as its client's stream. ``open`` (read within ``open_timeout``) is checked by the blocks,
which say how much memory it reserves; admission checks the caller's session count and share of that memory. Then
messages are answered one by one: steps (``step`` for a span; ``down``/``up`` for levels), ``link`` and ``close``.
Every message is paced by the caller's token bucket. Steps carry ids: a step that arrives twice (pushed, then
relayed) runs once. If the client goes away while its step computes, the step is dropped.

Steps reach a session from two sources: its client's stream, and ``push`` calls from the server before it in the
chain (its ``upstream``, named by the client). After a step, a session ``link``ed to a ``downstream`` session sends
its output there directly, so a decode step costs one pass along the chain instead of a client round trip per server.
It still answers its client at once (who keeps every hop's inputs for replays), then tells it whether the push went
through, so that the client relays the step itself otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from swarm.rpc import messages, protocol
from swarm.rpc.client import RemoteError, Stream
from swarm.rpc.framing import write_message
from swarm.rpc.messages import read_kind
from swarm.rpc.protocol import RequestError, get_field
from swarm.server.handler import error_reply
from swarm.server.sessions import Busy, ServerSession

if TYPE_CHECKING:
    from swarm.server.handler import Handler

logger = logging.getLogger(__name__)

REMEMBERED_STEPS = 64  # step ids kept per session to drop duplicates
INBOX_SIZE = 8  # messages queued per session: past that its client's stream is not read (backpressure)


async def serve_session(handler: Handler, peer: str, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    handler.admission.check_session_count(peer)  # before reading the open message; checked again at open
    message = await handler.read_request(reader, handler.limits.open_timeout)
    if message is None:
        return
    kind = get_field(message, "type", str)
    if kind != "open":  # sessions live and die with their stream, so a step on a new stream is always stale
        raise RequestError(f"unknown session {message.get('session_id')!r}: open a session first" if kind in
                           ("step", "down", "up", "up_backward", "down_backward")
                           else f"expected an 'open' message, got {kind!r}")
    session = open_session(handler, peer, message)
    # Bounded: a client sending steps faster than they run (or a flood of pushes) must not pile up in memory.
    inbox: asyncio.Queue = asyncio.Queue(INBOX_SIZE)
    session.inbox = inbox
    gone = asyncio.Event()  # set when the client's stream ends: its step in progress is dropped
    pump = asyncio.create_task(_pump_client(handler, reader, inbox, gone))
    timeout = handler.limits.session_timeout

    async def reply(message: dict) -> None:
        # A client that stops reading its replies would otherwise hold the session and its memory forever.
        try:
            await asyncio.wait_for(write_message(writer, message), timeout)
        except TimeoutError:
            raise RequestError(f"replies not read for {timeout:.0f} s; session closed") from None

    try:
        await reply(opened_reply(handler, session))
        done_steps: deque = deque(maxlen=REMEMBERED_STEPS)
        while True:
            try:
                item = await asyncio.wait_for(inbox.get(), timeout)
            except TimeoutError:
                raise RequestError(f"session idle for {timeout:.0f} s; closed") from None
            if isinstance(item, BaseException):
                raise item  # the client's stream broke or sent something unreadable, or the session was reclaimed
            if session.reclaimed:
                raise Busy(session.reclaimed)
            session.last_active = time.monotonic()
            if item is not None and "receipt" in item and handler.settlement is not None:
                handler.settlement.accept(session, item["receipt"])  # countersigned, with a step or the close
            if item is None or item.get("type") == "close":
                return
            if item.get("type") == "link":
                try:
                    await handler.admission.throttle(session.peer)
                    answer = _link(session, item)
                except RequestError as e:  # this link is refused; the session stays as it was
                    answer = error_reply(e)
                await reply(answer)
                continue
            step_id = item.get("step_id")
            done_key = (item.get("type"), step_id)  # a U-Net evaluation's down and up passes share their id
            if step_id is not None and session.upstream is not None and done_key in done_steps:
                continue  # pushed and then relayed too: already answered
            output = None
            try:
                # Pushed steps too are paced by the session's client: they are its steps, and push or relay
                # should cost it the same.
                await handler.admission.throttle(session.peer)
                if handler.settlement is not None:
                    handler.settlement.check_paid(session)
                answer, output = await run_step(handler, session, item, gone)
                if handler.settlement is not None:  # the session's usage so far, signed
                    answer["receipt"] = handler.settlement.issue(session)
                if step_id is not None:
                    done_steps.append(done_key)
                # Only steps with an id are pushed on: the id is what stops a step that a cycle of links (a session
                # linked to itself, or two to each other) brings back, which would otherwise run forever.
                answer["pushing"] = bool(item.get("push") and step_id is not None and session.downstream is not None)
            except RequestError as e:  # this step is refused; the session and its state stay as they were
                logger.info(f"Refused a step of session {session.session_id[:8]} from {peer[-8:]}: {e}")
                answer = error_reply(e)
            answer["step_id"] = step_id
            # The push goes out first (the next server starts as early as possible), on its own task, so that a
            # slow next server never delays our answer; its outcome follows the answer.
            pushing = asyncio.create_task(_push(handler, session, item, output)) if answer.get("pushing") else None
            await reply(answer)
            if pushing is not None:
                await reply({"step_id": step_id, "pushed": await pushing})
    finally:
        pump.cancel()
        if session.push_stream is not None:
            session.push_stream.close()
        handler.sessions.close(session.session_id)
        if handler.settlement is not None:
            handler.settlement.finish(session)
        logger.debug(f"Closed session {session.session_id[:8]}: {session.tokens_processed} used")


def open_session(handler: Handler, peer: str, message: dict) -> ServerSession:
    if handler.settlement is not None:
        handler.settlement.check_open(message)
    blocks = handler.blocks
    state = blocks.open_session(message, handler.bounds)
    handler.admission.check_open(peer, getattr(state, "batch_size", None) or _sample_batch(state))
    peers = handler.limits.peers
    share = handler.sessions.share_of(peer, peers.new_peer_cache_share, peers.max_peer_cache_share)
    session = handler.sessions.open(peer, state, peer_share=share, reclaim_idle_after=peers.reclaim_idle_after)
    session.upstream = get_field(message, "upstream", str, default=None)
    return session


def _sample_batch(state) -> int:
    shape = getattr(state, "sample_shape", None)
    return shape[0] if shape else 1


def opened_reply(handler: Handler, session: ServerSession) -> dict:
    reply = {"session_id": session.session_id, "cache_tokens_left": handler.sessions.tokens_left}
    if handler.blocks.kind == "span":
        reply["max_length"] = session.state.max_length
    else:
        reply.update(opened=True, levels=[session.start, session.end])
    return reply


async def run_step(handler: Handler, session: ServerSession, message: dict,
                   gone: asyncio.Event | None = None) -> tuple[dict, list | dict]:
    """Check and run one step of ``session``; returns the reply and the encoded output (what a push carries)."""
    fail_after = handler.faults.error_after_steps
    if fail_after is not None and handler.steps_served >= fail_after:
        handler.steps_served += 1
        raise RequestError(f"injected fault ({fail_after} steps served)")
    kind = read_kind(message, (*session.state.blocks.session_steps, "link", "close"))
    if kind in ("link", "close"):
        raise RequestError(f"a {kind!r} message cannot be pushed")
    if "session_id" in message and message["session_id"] != session.session_id:
        raise RequestError(f"unknown session {message.get('session_id')!r}")
    return await handler.run(session.peer, kind, message, session, gone)


async def _pump_client(handler: Handler, reader: asyncio.StreamReader, inbox: asyncio.Queue,
                       gone: asyncio.Event) -> None:
    try:
        while True:
            message = await handler.read_request(reader)
            if message is not None and message.get("trace") is True:
                message["_received"] = time.perf_counter()  # for the client's timeline (never read from the wire)
            if message is None:
                gone.set()
            await inbox.put(message)
            if message is None:
                return
    except Exception as e:
        gone.set()
        await inbox.put(e)


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


async def rpc_push(handler: Handler, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Steps pushed by the server before us in sessions' chains, on a stream it keeps open: one reply per step.

    Each pushed step is paced by its session's client (in serve_session), not by the pusher's own bucket, which
    would throttle a busy server for all of its clients at once. A peer that no session named as its upstream pays
    like any caller, for every message."""
    while True:
        if not handler.sessions.names_upstream(peer):
            await handler.admission.throttle(peer)
        message = await handler.read_request(reader, handler.limits.session_timeout)
        if message is None:
            return
        try:
            answer = accept_push(handler, peer, message)
        except RequestError as e:  # this push is refused; the stream goes on
            await handler.admission.throttle(peer)  # a refused push costs its sender
            answer = error_reply(e)
        await write_message(writer, answer)


def accept_push(handler: Handler, peer: str, message: dict) -> dict:
    """A step pushed by the server before us in the chain: queued into that session like a client's step."""
    session = handler.sessions.get(message.get("session_id"))
    if session.upstream != peer:
        raise RequestError("pushes to this session are accepted only from the server its client named")
    step = message.get("step")
    # Only steps: the upstream may feed the session, but not relink or close it (that is its client's say).
    if not isinstance(step, dict) or step.get("type") not in session.state.blocks.session_steps:
        raise RequestError("a push must carry a step")
    if step.get("trace") is True:
        step["_received"] = time.perf_counter()
    try:
        session.inbox.put_nowait(step)
    except asyncio.QueueFull:  # the session is behind: its client relays this step itself
        raise Busy("session busy: too many queued steps") from None
    handler.pushes["received"] += 1
    return {"queued": True}


async def _push(handler: Handler, session: ServerSession, step: dict, output: list | dict) -> bool:
    """Hand this step's output to the next server of the chain, on a stream kept open for the session."""
    downstream = session.downstream
    pushed = {key: step[key] for key in ("type", "position", "position_ids", "attention_mask", "hypo_ids", "step_id",
                                         "trace") if key in step}
    pushed.update(push=True, session_id=downstream["session_id"], start=downstream["start"],
                  end=downstream["end"], hidden=output)
    try:
        stream = session.push_stream
        if stream is None or session.push_target != downstream:
            if stream is not None:
                stream.close()
            session.push_stream, session.push_target = None, downstream
            stream = await Stream.open(handler.p2p, downstream["peer"], protocol.PUSH, protocol.PUSH_TIMEOUT)
            session.push_stream = stream
        await stream.request(messages.push(downstream["session_id"], pushed), timeout=protocol.PUSH_TIMEOUT)
        handler.pushes["sent"] += 1
        return True
    except Exception as e:  # unreachable, refused, slow: the client relays this step itself
        logger.info(f"Push to {downstream['peer'][-8:]} failed ({e}); the client will relay")
        handler.pushes["failed"] += 1
        if session.push_stream is not None and not isinstance(e, RemoteError):
            session.push_stream.close()  # broken or out of step: the next push opens a new one
            session.push_stream = None
        return False
