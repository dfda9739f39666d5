"""Server-side inference sessions: each holds a KV cache for part of the span, under one shared token budget.

The budget is counted in token-blocks: a session of ``batch`` rows and ``max_length`` positions over ``n`` blocks
reserves ``batch * max_length * n``. Per-session usage (tokens processed) is kept for settlement.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from torch import nn
from transformers import DynamicCache

from swarm.rpc.protocol import RequestError


@dataclass
class ServerSession:
    session_id: str
    peer: str  # the caller's peer id
    start: int  # absolute block range this session runs
    end: int
    batch_size: int
    max_length: int
    cache: DynamicCache
    span: nn.Module  # the BlockSpan it runs on (a server moving its blocks keeps the old one until sessions end)
    length: int = 0  # positions currently cached
    tokens_processed: int = 0  # batch rows x new positions computed, replays included (usage)
    steps: int = 0
    upstream: str | None = None  # the peer allowed to push steps into this session
    downstream: dict | None = None  # where to push outputs: peer, session_id, start, end
    output_codec: str = "none"  # for steps that do not name one (pushed steps)
    inbox: object = None  # asyncio.Queue of steps from the client's stream and from pushes
    opened_at: float = field(default_factory=time.monotonic)

    @property
    def reserved(self) -> int:
        return self.batch_size * self.max_length * (self.end - self.start)


class SessionTable:
    def __init__(self, cache_tokens: int, span_length: int):
        self.capacity = cache_tokens * span_length  # token-blocks
        self.span_length = span_length
        self.sessions: dict[str, ServerSession] = {}
        self.finished_usage: dict[str, int] = {}  # peer -> tokens processed in closed sessions

    @property
    def used(self) -> int:
        return sum(s.reserved for s in self.sessions.values())

    @property
    def tokens_left(self) -> int:
        """Batch x positions a new full-span session could still reserve."""
        return max(0, self.capacity - self.used) // self.span_length

    def open(self, peer: str, start: int, end: int, batch_size: int, max_length: int,
             span: nn.Module, peer_share: float = 1.0) -> ServerSession:
        """Reserve cache for a new session of ``peer``, whose open sessions may hold at most ``peer_share`` of the
        budget together (so that one caller cannot take all of it)."""
        need = batch_size * max_length * (end - start)
        free = self.capacity - self.used
        if need > free:
            raise RequestError(
                f"not enough cache: the session needs {batch_size}x{max_length} tokens on {end - start} blocks, "
                f"but only {free // (end - start)} tokens are free here (of {self.capacity // (end - start)})"
            )
        held = sum(s.reserved for s in self.sessions.values() if s.peer == peer)
        if held + need > peer_share * self.capacity:
            raise RequestError(
                f"per-peer cache limit: the session needs {batch_size}x{max_length} tokens on {end - start} blocks, "
                f"peer {peer[-8:]} already holds {held // (end - start)}, and one peer may hold at most "
                f"{int(peer_share * self.capacity) // (end - start)} tokens ({peer_share:.0%} of this server's cache)"
            )
        session = ServerSession(uuid.uuid4().hex, peer, start, end, batch_size, max_length, span.new_cache(), span)
        self.sessions[session.session_id] = session
        return session

    def names_upstream(self, peer: str) -> bool:
        """Whether some open session accepts pushes from ``peer``."""
        return any(session.upstream == peer for session in self.sessions.values())

    def get(self, session_id: object) -> ServerSession:
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise RequestError(f"unknown session {session_id!r}")
        return session

    def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.finished_usage[session.peer] = self.finished_usage.get(session.peer, 0) + session.tokens_processed
