"""Server-side sessions of every kind of blocks under one memory budget, in bytes, with a per-peer share.

A transformer session reserves its KV cache (batch x max_length positions over its blocks); a U-Net generation
reserves the skips its levels keep between the passes of one evaluation and its conditioning. Both come out of the
same budget, and one peer's open sessions may hold at most a share of it together, so that one caller cannot take
all of it. Per-session usage (what it computed) is kept for settlement.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from swarm.blocks.served import BlockSession
from swarm.rpc.protocol import RequestError


class Busy(RequestError):
    """Refused for lack of room right now (memory, sessions): not the request's fault, and not the server's."""


@dataclass(eq=False)
class ServerSession:
    session_id: str
    peer: str  # the caller's peer id
    state: BlockSession  # the blocks' own state: a KV cache, a generation's conditioning and skips
    tokens_processed: int = 0  # usage: batch rows x new positions (spans) or samples x passes (levels), replays too
    steps: int = 0
    upstream: str | None = None  # the peer allowed to push steps into this session
    downstream: dict | None = None  # where to push outputs: peer, session_id, start, end
    inbox: object = None  # asyncio.Queue of steps from the client's stream and from pushes
    push_stream: object = None  # rpc.client.Stream to the downstream server, kept open while it stays the same
    push_target: dict | None = None  # the downstream that stream goes to
    opened_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)  # its last step (or opening)
    reclaimed: str | None = None  # why its memory was taken back, if it was

    @property
    def start(self) -> int:
        return self.state.start

    @property
    def end(self) -> int:
        return self.state.end

    @property
    def reserved(self) -> int:
        return self.state.reserved

    @property
    def output_codec(self) -> str:
        return self.state.output_codec


class SessionTable:
    def __init__(self, capacity_bytes: int, unit_bytes: int = 1, unit: str = "bytes"):
        """``capacity_bytes`` for all sessions; ``unit_bytes``: what one announced unit of free room is (a cache
        token over the whole span, for a transformer server), so that ``tokens_left`` speaks the client's unit."""
        self.capacity, self.unit_bytes, self.unit = capacity_bytes, max(1, unit_bytes), unit
        self.sessions: dict[str, ServerSession] = {}
        self.finished_usage: dict[str, int] = {}  # peer -> usage of its closed sessions

    @property
    def used(self) -> int:
        return sum(s.reserved for s in self.sessions.values())

    @property
    def tokens_left(self) -> int:
        """Free room in the announced unit (batch x positions a new full-span session could still reserve)."""
        return max(0, self.capacity - self.used) // self.unit_bytes

    MAX_USAGE_PEERS = 10_000  # peers whose finished usage is remembered (the biggest users beyond)

    def usage(self, peer: str) -> int:
        """What this server has computed for ``peer`` (its closed sessions and open ones), in usage units."""
        live = sum(s.tokens_processed for s in self.sessions.values() if s.peer == peer)
        return self.finished_usage.get(peer, 0) + live

    def share_of(self, peer: str, new_share: float, max_share: float) -> float:
        """The fraction of the budget ``peer``'s sessions may hold together: ``max_share`` while nobody else holds
        any (taking free room then costs nobody anything); otherwise ``new_share`` for a peer new here, growing by
        the work done for it (usage x unit, as a fraction of the budget) up to ``max_share``, and at most 1/(k+1)
        while k other peers hold sessions (but never below ``new_share``)."""
        holders = {s.peer for s in self.sessions.values()} - {peer}
        if not holders:
            return max_share
        earned = min(max_share, new_share + self.usage(peer) * self.unit_bytes / max(1, self.capacity))
        return max(min(new_share, max_share), min(earned, 1.0 / (1 + len(holders))))

    def open(self, peer: str, state: BlockSession, peer_share: float = 1.0,
             reclaim_idle_after: float | None = None) -> ServerSession:
        """Reserve ``state.reserved`` bytes for a new session of ``peer``, whose open sessions may hold at most
        ``peer_share`` of the budget together. If they do not fit, sessions of other peers idle for
        ``reclaim_idle_after`` seconds give theirs back (see ``reclaim``)."""
        need, free = state.reserved, self.capacity - self.used
        if need > self.capacity:
            raise RequestError(f"not enough cache: the session needs {self.amount(need)}, more than this server's "
                               f"whole budget of {self.amount(self.capacity)}; ask for less (a shorter max_length, a "
                               f"smaller batch or image)")
        if need > free and reclaim_idle_after is not None:
            self.reclaim(need - free, peer, reclaim_idle_after)
            free = self.capacity - self.used
        if need > free:
            raise Busy(f"not enough cache free now: the session needs {self.amount(need)}, only "
                       f"{self.amount(free)} are free here (of {self.amount(self.capacity)})")
        held = sum(s.reserved for s in self.sessions.values() if s.peer == peer)
        if held + need > peer_share * self.capacity:
            raise Busy(f"per-peer cache limit: the session needs {self.amount(need)}, peer {peer[-8:]} already holds "
                       f"{self.amount(held, bare=True)}, and it may hold at most "
                       f"{self.amount(int(peer_share * self.capacity))} ({peer_share:.0%} of this server's cache; a "
                       f"peer's share starts small and grows with the work done for it here)")
        session = ServerSession(uuid.uuid4().hex, peer, state)
        self.sessions[session.session_id] = session
        return session

    def reclaim(self, amount: int, requester: str, idle_after: float) -> None:
        """Take back at least ``amount`` bytes from sessions of other peers idle for ``idle_after`` seconds, the
        biggest holder's first (a peer hoarding idle sessions loses them before anyone else), or take back none.
        A reclaimed session ends: its client's next step is refused and it fails over (replays its history)."""
        now = time.monotonic()
        held: dict[str, int] = {}
        for session in self.sessions.values():
            held[session.peer] = held.get(session.peer, 0) + session.reserved
        idle = sorted((s for s in self.sessions.values() if s.peer != requester and now - s.last_active >= idle_after),
                      key=lambda s: (-held[s.peer], s.last_active))
        chosen, freed = [], 0
        for session in idle:
            if freed >= amount:
                break
            chosen.append(session)
            freed += session.reserved
        if freed < amount:
            return
        for session in chosen:
            session.reclaimed = (f"session reclaimed: idle for {now - session.last_active:.0f} s while another "
                                 f"client needed its memory")
            self.close(session.session_id)  # its loop's own close later finds it gone
            inbox = session.inbox
            if inbox is not None:
                try:
                    inbox.put_nowait(Busy(session.reclaimed))  # ends its session loop now
                except Exception:  # full: the loop sees ``reclaimed`` at its next message
                    pass

    def amount(self, nbytes: int, bare: bool = False) -> str:
        """``nbytes`` in the table's unit (e.g. "200 tokens": batch x positions over the whole span)."""
        if self.unit == "bytes":
            return _size(nbytes)
        units = nbytes / self.unit_bytes
        # whole units as such; a fraction of a few shows, or "needs 8 generations, may hold at most 8" reads wrong
        text = f"{units:.0f}" if units == int(units) or units >= 100 else f"{units:.1f}"
        return text + ("" if bare else f" {self.unit}")

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
            if len(self.finished_usage) > self.MAX_USAGE_PEERS:  # many identities: keep the biggest users' half
                keep = sorted(self.finished_usage.items(), key=lambda item: -item[1])[: self.MAX_USAGE_PEERS // 2]
                self.finished_usage = dict(keep)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 1024:.1f} KiB"
