"""The client's live view of the swarm for one model: announcements, its own measurements, bans.

It reads the servers' records from the DHT, pings candidate servers to learn round-trip times, keeps per-server
statistics (RTT, observed overhead, recent failures), bans a failing server with a growing backoff, and asks
``routing.find_chain`` for the cheapest chain under the client's ``RoutingPolicy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import replace

from swarm.client import node as client_node
from swarm.client.config import ClientConfig
from swarm.client.routing import (
    DEFAULT_FAILURE_COST,
    CostModel,
    Hop,
    MissingBlocksError,
    PeerStats,
    RemoteSpan,
    RouteRequest,
    RoutingPolicy,
    cheapest_chain,
    parallel_chains,
)
from swarm.dht.identity import Identity
from swarm.dht.records import fetch_block_infos, merge_records
from swarm.dht.schema import ServerInfo
from swarm.rpc.client import RemoteError, measure_rtt
from swarm.settlement import load_backend

logger = logging.getLogger(__name__)

EMA = 0.3  # weight of a new measurement in running averages
FAILURE_MEMORY = 300.0  # s: a failure's weight in the reliability score decays with this time constant
STRIKE_MEMORY = 6 * 3600.0  # s: a strike (a wrong output caught by a redundant check) decays this slowly
MAX_BAN = 300.0  # s: longest ban after repeated failures
BUSY_TIME = 5.0  # s: a server that said it is full is left out of new chains this long (no fault of its own)
PING_TIMEOUT = 2.0  # s


class SequenceManager:
    def __init__(self, config: ClientConfig, model_id: str, num_blocks: int, first_block: int = 0):
        self.config, self.model_id, self.num_blocks = config, model_id, num_blocks
        self.first_block = first_block  # blocks before it run on the client (``local_blocks``)
        # With settlement, receipts are countersigned with the key of the client's peer id, which servers know it by.
        self.identity = Identity.load_or_create(None) if config.settlement else None
        self.settlement = load_backend(config.settlement, config.settlement_options) if config.settlement else None
        # the process's daemon and loop for this swarm, shared with its other models (node.py)
        self.node = client_node.acquire(config.initial_peers, config.host, self.identity)
        self.loop, self.p2p, self.dht = self.node.loop, self.node.p2p, self.node.dht
        self._released = False
        self.servers: dict[str, ServerInfo] = {}
        self.last_update = -math.inf
        self.stats: dict[str, PeerStats] = {}
        self.banned_until: dict[str, float] = {}
        self.busy_until: dict[str, float] = {}
        self.consecutive_failures: dict[str, int] = {}
        # peer -> (started, announced) of its record when it was banned: a new ``started`` is a restart (the ban is
        # lifted); a later ``announced`` shows it alive, so it may be tried when nobody else holds its blocks
        self.ban_marks: dict[str, tuple[float, float]] = {}
        self.failure_cost = DEFAULT_FAILURE_COST  # replaced by measured failover times
        self.strikes_given = 0
        self.proofs = None  # with zk_probability > 0: checks challenged hops' proofs (proofs.py)
        self.arbiter = None  # the client's own opinion for a redundant check between two servers (verification.py)
        self._failures_decayed_at = time.monotonic()

    # ---- the swarm's announcements

    async def update(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last_update > self.config.update_period:
            per_block = await fetch_block_infos(self.dht, self.model_id, list(range(self.num_blocks)))
            self.servers = merge_records(per_block)
            self.last_update = time.monotonic()
            self._heal_restarted()

    def _heal_restarted(self) -> None:
        """Lift the bans of servers that restarted since (a new run announces a new ``started``): what failed
        was the run before, and its failures say nothing of this one."""
        for peer, (started, _) in list(self.ban_marks.items()):
            info = self.servers.get(peer)
            if info is not None and info.started and info.started != started:
                logger.info(f"Server {peer[-8:]} restarted since it failed; it may be chosen again")
                self._lift_ban(peer)

    # ---- measurements

    def stats_for(self, peer: str) -> PeerStats:
        return self.stats.setdefault(peer, PeerStats())

    def record_rtt(self, peer: str, seconds: float) -> None:
        stats = self.stats_for(peer)
        stats.rtt = seconds if stats.rtt is None else (1 - EMA) * stats.rtt + EMA * seconds

    def record_hop_time(self, hop: Hop, seconds: float) -> None:
        """An observed step on ``hop``: what it took beyond the predicted network and compute time."""
        stats = self.stats_for(hop.span.peer_id)
        extra = max(0.0, seconds - hop.network - hop.compute)
        stats.overhead = extra if stats.overhead is None else (1 - EMA) * stats.overhead + EMA * extra
        self.consecutive_failures.pop(hop.span.peer_id, None)

    def succeeded(self, peer: str) -> None:
        """``peer`` answered a request: its next failure starts the backoff from the shortest ban again."""
        if peer in self.consecutive_failures:
            del self.consecutive_failures[peer]

    def record_failover_time(self, seconds: float) -> None:
        self.failure_cost = (1 - EMA) * self.failure_cost + EMA * seconds

    async def ping(self, peers: list[str]) -> None:
        """Measure round trips to ``peers`` concurrently. One that does not answer in time is recorded as that slow
        (a busy server is not a dead one: opening a session on it decides)."""

        async def ping_one(peer: str) -> None:
            rtt = await measure_rtt(self.p2p, peer, PING_TIMEOUT)
            self.record_rtt(peer, PING_TIMEOUT if rtt is None else rtt)

        await asyncio.gather(*(ping_one(peer) for peer in peers))

    # ---- failures

    def ban(self, peer: str) -> None:
        """Avoid a server that failed us: for ban_time, doubled at each consecutive failure (up to MAX_BAN)."""
        failures = self.consecutive_failures.get(peer, 0) + 1
        self.consecutive_failures[peer] = failures
        self.banned_until[peer] = time.monotonic() + min(MAX_BAN, self.config.ban_time * 2 ** (failures - 1))
        info = self.servers.get(peer)
        self.ban_marks[peer] = (info.started, info.announced) if info is not None else (0.0, 0.0)
        self._decay_failures()
        self.stats_for(peer).failures += 1.0
        # The view is not refreshed here: failing over to a replica the client already knows must not wait on a
        # DHT lookup, which a frozen peer can hold for the DHT's timeout (3 s measured). Routing refreshes it when
        # nobody it knows can take the blocks.

    def failed(self, peer: str, error: BaseException) -> None:
        """``peer`` could not take a request: a server that said it is full is left out for a few seconds; any
        other failure bans it."""
        if isinstance(error, RemoteError) and error.busy:
            self.busy_until[peer] = time.monotonic() + BUSY_TIME
            self.last_update = -math.inf
        else:
            self.ban(peer)

    def forgive(self, peer: str) -> None:
        """Undo the ban of a server whose error turned out to be the request's fault (another server refused it
        too, or no other server could be tried): it should keep serving this client's other requests."""
        self._lift_ban(peer)
        stats = self.stats_for(peer)
        stats.failures = max(0.0, stats.failures - 1.0)

    def _lift_ban(self, peer: str) -> None:
        self.consecutive_failures.pop(peer, None)
        self.banned_until.pop(peer, None)
        self.ban_marks.pop(peer, None)

    def request_at_fault(self, error: Exception, last_error: Exception | None) -> bool:
        """Whether a server's refusal repeats the refusal of the server it replaced on the same request: then the
        request is at fault, and the first server is not held responsible. Being busy is nobody's fault."""
        if isinstance(error, RemoteError) and isinstance(last_error, RemoteError) and not (error.busy or
                                                                                          last_error.busy):
            self.forgive(last_error.peer or "")
            return True
        return False

    @contextlib.contextmanager
    def rerouting_after(self, error: Exception, peer: str) -> Iterator[None]:
        """Around routing a replacement for ``peer`` after ``error``: if there is nobody else to ask, a server's own
        refusal (not a routing error) is what the caller gets, and it is not held against the server."""
        try:
            yield
        except MissingBlocksError as missing:
            if isinstance(error, RemoteError):
                self.forgive(peer)
                raise error from missing
            raise

    def strike(self, peer: str) -> None:
        """A redundant check found this server's output wrong: its reputation drops (see routing's max_strikes)."""
        self._decay_failures()
        self.stats_for(peer).strikes += 1.0
        self.strikes_given += 1
        # Nor is the view refreshed here (see ban): the next chain leaves the struck server out using replicas the
        # client knows, and a full DHT lookup per caught lie cost more than the checks (15 finds, each record's
        # signature verified).

    def _decay_failures(self) -> None:
        now = time.monotonic()
        elapsed = now - self._failures_decayed_at
        factor, strike_factor = math.exp(-elapsed / FAILURE_MEMORY), math.exp(-elapsed / STRIKE_MEMORY)
        for stats in self.stats.values():
            stats.failures *= factor
            stats.strikes *= strike_factor  # slowly: an honest server that was unlucky recovers in hours
        self._failures_decayed_at = now

    def banned(self, spare: frozenset[str] = frozenset()) -> set[str]:
        """Servers left out of new chains now: banned after failures, or full when last asked (but ``spare``)."""
        now = time.monotonic()
        return {peer for until_by_peer in (self.banned_until, self.busy_until)
                for peer, until in until_by_peer.items() if until > now and peer not in spare}

    def alive_since_ban(self) -> frozenset[str]:
        """Banned servers that announced themselves again after their ban: alive, so worth a try when nobody else
        holds their blocks."""
        alive = set()
        for peer, (_, announced) in self.ban_marks.items():
            info = self.servers.get(peer)
            if info is not None and info.announced > announced and self.banned_until.get(peer, 0) > time.monotonic():
                alive.add(peer)
        return frozenset(alive)

    # ---- routing

    async def cost_model(self, request: RouteRequest, policy: RoutingPolicy | None = None,
                         spare: frozenset[str] = frozenset()) -> CostModel:
        """``policy``: this request's (its session's settings), by default the client's. ``spare``: banned
        servers to consider anyway."""
        await self.update()
        self._decay_failures()
        base = policy or self.config.routing_policy
        policy = replace(base, blocked_servers=list(base.blocked_servers) + sorted(self.banned(spare)))
        model = CostModel.build(self.servers, self.stats, policy, request, self.failure_cost)
        unmeasured = [peer for peer in model.peers if self.stats_for(peer).rtt is None]
        if unmeasured:
            await self.ping(unmeasured[: self.config.max_pings_per_route])
            policy = replace(base, blocked_servers=list(base.blocked_servers) + sorted(self.banned(spare)))
            model = CostModel.build(self.servers, self.stats, policy, request, self.failure_cost)
        return model

    async def route(self, start: int | None = None, end: int | None = None,
                    request: RouteRequest | None = None, policy: RoutingPolicy | None = None) -> list[Hop]:
        """The cheapest chain of hops over blocks [start, end) (default: every remote block); ``MissingBlocksError``
        if there is none."""
        start = self.first_block if start is None else start
        end = self.num_blocks if end is None else end
        request = request or RouteRequest()
        try:
            return cheapest_chain(await self.cost_model(request, policy), start, end, self.model_id)
        except MissingBlocksError:  # our view may be stale: look again before giving up
            await self.update(force=True)
            try:
                return cheapest_chain(await self.cost_model(request, policy), start, end, self.model_id)
            except MissingBlocksError:
                alive = self.alive_since_ban()
                if not alive:
                    raise
                # Nobody else holds these blocks: a banned server that has announced itself since is worth a try
                # (a request to it costs little next to failing; it is banned again if it fails again).
                logger.info(f"Trying {len(alive)} banned server(s) that announced themselves since: nobody else "
                            f"holds blocks {start}:{end}")
                return cheapest_chain(await self.cost_model(request, policy, alive), start, end, self.model_id)

    async def parallel_routes(self, request: RouteRequest, max_chains: int) -> list[list[RemoteSpan]]:
        """Chains to split a large forward/backward batch over (just one when splitting would not be faster)."""
        model = await self.cost_model(request)
        return [[hop.span for hop in chain] for chain in parallel_chains(model, self.first_block, self.num_blocks,
                                                                          max_chains,
                                                                          self.model_id)]

    async def make_sequence(self, start: int | None = None, end: int | None = None,
                            request: RouteRequest | None = None) -> list[RemoteSpan]:
        return [hop.span for hop in await self.route(start, end, request)]

    def shutdown(self) -> None:
        """Let go of the libp2p daemon and loop (stopped once no other model of this process uses them); calling it
        again does nothing."""
        if self.proofs is not None:
            self.proofs.shutdown()
        if self._released:
            return
        self._released = True
        client_node.release(self.node)

