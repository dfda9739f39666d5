"""Per-peer admission: what one caller may ask of a server, checked before anything is read, computed or reserved.

The global limits (``Limits`` in handler.py) bound each request; these bound each caller, so that one peer cannot
starve the others: a token bucket paces its requests (every stream it opens, every step and link in its sessions),
and its inference sessions are capped in number, batch rows and share of the cache. Session counts and reservations
are read from the ``SessionTable`` itself, so the only per-peer state kept here is the buckets, which stay bounded:
an idle peer's bucket is full, the same as a fresh one, so it is forgotten; and past ``max_peers`` the least
recently seen are dropped. Limits keyed by peer id slow one identity down; new identities are free in libp2p, so the
server-wide limits (sessions, cache, one compute thread) remain the backstop against many.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from swarm.rpc.protocol import RequestError

if TYPE_CHECKING:  # sessions.py imports torch: the command line reads PeerLimits' defaults before loading it
    from swarm.server.sessions import SessionTable


class Refused(RequestError):
    """A request refused before it was read (its caller may still be writing it)."""


class RateLimited(Refused):
    """A request over its peer's rate (logged quietly: a flood must not flood the log too)."""


@dataclass
class PeerLimits:
    max_sessions_per_peer: int = 8  # inference sessions one peer may hold open on this server at once
    max_sessions: int = 64  # inference sessions open on this server at once, all peers together
    max_session_batch: int = 64  # batch rows of one inference session
    # Fraction of the cache budget one peer's open sessions may reserve together: max_peer_cache_share while no other
    # peer holds a session; otherwise a peer new here starts at new_peer_cache_share, which grows by the positions the
    # server has computed for it (as a fraction of the budget) up to max_peer_cache_share, and no more than 1/(k+1)
    # while k other peers hold sessions (but new_peer_cache_share at least). So free identities start small, and each
    # new holder shrinks the others' room for more.
    max_peer_cache_share: float = 0.5
    new_peer_cache_share: float = 0.25
    # s without a step after which a session's memory may be taken back for a new session that does not fit
    # (the biggest holder's idle sessions first); None: never
    reclaim_idle_after: float | None = 10.0
    rate: float = 50.0  # requests per second one peer may sustain (stream opens, steps, links)
    burst: int = 100  # requests one peer may send at once after being idle
    max_wait: float = 1.0  # s a request may be held back to keep its peer at `rate`; beyond that it is refused
    max_peers: int = 10_000  # peers whose request rate is tracked; the least recently seen are forgotten beyond
    # s of predicted compute one peer's requests may have waiting or running at once: beyond, its next request is
    # refused as busy before it is queued (requests are charged by cost, not counted); its first always queues
    max_queued_seconds: float = 20.0

    def __post_init__(self):
        if min(self.max_sessions_per_peer, self.max_sessions, self.max_session_batch, self.burst,
               self.max_peers) < 1 or not (self.rate > 0 and 0 < self.max_peer_cache_share <= 1 and self.max_wait >= 0
                                           and self.max_queued_seconds > 0 and self.new_peer_cache_share > 0):
            raise ValueError(f"invalid per-peer limits: {self}")


@dataclass
class _Bucket:
    tokens: float  # requests the peer may still send at once; negative: requests already waiting for their turn
    updated: float  # clock reading when `tokens` was last brought up to date


class Admission:
    """Per-peer request pacing and session limits of one server handler."""

    PRUNE_PERIOD = 60.0  # s between sweeps forgetting peers whose buckets have refilled

    def __init__(self, limits: PeerLimits, sessions: SessionTable, clock: Callable[[], float] = time.monotonic):
        self.limits, self.sessions, self.clock = limits, sessions, clock
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently seen first
        self.next_prune = clock() + self.PRUNE_PERIOD
        self.refused = 0  # requests refused for going over the rate, for logs and tests

    # ---- request rate

    def reserve(self, peer: str) -> float:
        """Take one request from ``peer``'s bucket: seconds it must wait for its turn (0: now). Raises
        ``RateLimited`` if that wait would exceed ``max_wait``: a flood is refused, not queued."""
        limits, now = self.limits, self.clock()
        bucket = self.buckets.get(peer)
        if bucket is None:  # only a new peer can grow the table: make room first
            self._prune(now)
            bucket = self.buckets[peer] = _Bucket(float(limits.burst), now)
        else:
            self.buckets.move_to_end(peer)
            bucket.tokens = min(float(limits.burst), bucket.tokens + (now - bucket.updated) * limits.rate)
            bucket.updated = now
        wait = max(0.0, (1.0 - bucket.tokens) / limits.rate)
        if wait > limits.max_wait:
            self.refused += 1
            raise RateLimited(f"rate limit: more than {limits.rate:g} requests/s (burst {limits.burst}) from "
                               f"peer {peer[-8:]}; retry in {wait - limits.max_wait:.2f} s")
        bucket.tokens -= 1.0
        return wait

    async def throttle(self, peer: str) -> None:
        """Wait for ``peer``'s turn (briefly, so an honest fast client is slowed down rather than failed)."""
        wait = self.reserve(peer)
        if wait > 0:
            await asyncio.sleep(wait)

    def _prune(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket: forgetting it loses nothing.
        limits = self.limits
        if now >= self.next_prune:
            self.next_prune = now + self.PRUNE_PERIOD
            idle = [peer for peer, b in self.buckets.items()
                    if b.tokens + (now - b.updated) * limits.rate >= limits.burst]
            for peer in idle:
                del self.buckets[peer]
        while len(self.buckets) >= limits.max_peers:  # many identities at once: drop the least recently seen
            self.buckets.popitem(last=False)

    # ---- inference sessions

    def check_session_count(self, peer: str) -> None:
        """Refuse a new session if ``peer`` or the server already holds as many as allowed."""
        limits, sessions = self.limits, self.sessions.sessions
        if len(sessions) >= limits.max_sessions:
            raise Refused(f"this server already serves {len(sessions)} inference sessions (its limit); "
                               "try another server")
        held = sum(1 for session in sessions.values() if session.peer == peer)
        if held >= limits.max_sessions_per_peer:
            raise Refused(f"peer {peer[-8:]} already holds {held} inference sessions here, the limit per peer "
                               f"is {limits.max_sessions_per_peer}; close one first")

    def check_open(self, peer: str, batch_size: int) -> None:
        """Everything about a new session that does not depend on the cache (which ``SessionTable.open`` checks)."""
        self.check_session_count(peer)
        if batch_size > self.limits.max_session_batch:
            raise RequestError(f"batch_size {batch_size} exceeds this server's limit of "
                               f"{self.limits.max_session_batch} rows per session")
