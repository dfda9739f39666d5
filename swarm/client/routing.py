"""Choosing the chain of servers for a request: a cheapest path over the blocks, from measured costs.

A hop enters a server at some block and leaves at the end of its span (or of the request): its cost is its
network time, the span's compute time from the speed the server measured and announced, a queueing term from its
announced load, the per-hop overhead the client observed on past requests, and the expected cost of a failure
given how often it failed us recently. Every term is weighted by the client's ``RoutingPolicy``. Servers that
cannot take the request (offline, blocked, too little free cache, too low a precision) are left out.

Network time depends on who carries the activations:

- relayed by the client (forward/backward, and decoding without push): every hop costs the client's measured
  round trip to its server, whatever came before it;
- pushed (``RouteRequest.push``, decoding sessions by default): a step goes client -> S1 -> S2 ... -> Sn ->
  client, so only one-way trips lie on its critical path: half the client's RTT into S1 and out of Sn, and between
  servers half the RTT that S_i announced to S_i+1 in ``ServerInfo.next_pings``. A pair that was not measured
  counts as relayed through the client (half of each one's client RTT), which is what the session falls back to
  when a server cannot reach the next. With no pings at all, a pushed chain costs exactly its relayed cost.

The cheapest chain is found by dynamic programming over block positions, vectorized with numpy so that 10,000
servers route in milliseconds. With push the link cost depends on the pair, so the state is the server a chain
ends with; the unmeasured-pair cost is separable (a term of each side), so the best predecessor for every server
entering at a block is one minimum over the servers ending there, and the few announced pairs are applied on top
(see ``_cheapest_pushed_chain``).

Pure functions of their inputs: the ``SequenceManager`` (sequence_manager.py) feeds them what it fetched and
measured, and the simulator feeds them synthetic swarms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Literal

import numpy as np

from swarm.blocks.quantization import meets_precision
from swarm.dht.schema import ServerInfo, ServerState
from swarm.trust.weights import ReferenceWeights

# Estimates used only until a measurement exists; each is replaced by measured values as soon as there are some.
DEFAULT_RTT = 0.05  # s: until the client has pinged any server
DEFAULT_INFERENCE_RPS = 10.0  # decode steps/s over a span: for servers that announce no speed
DEFAULT_FORWARD_TPS = 500.0  # tokens/s over a span: likewise
DEFAULT_FAILURE_COST = 2.0  # s: what a failover costs, until the client has timed one
STRIKE_WEIGHT = 5.0  # a caught wrong output counts as this many failures in the reliability cost
SPLIT_GAIN = 0.8  # split a batch over one more chain only if that finishes at least 20% sooner


class MissingBlocksError(RuntimeError):
    """No usable server holds a block the request needs."""


@dataclass(frozen=True)
class RemoteSpan:
    peer_id: str  # base58
    start: int  # blocks [start, end) of the model this hop runs
    end: int
    info: ServerInfo

    def __str__(self) -> str:
        return f"{self.peer_id[-8:]}[{self.start}:{self.end}]"


@dataclass
class RoutingPolicy:
    """The client's preferences. Costs are in seconds, each term multiplied by its weight."""

    latency_weight: float = 1.0  # network round trips
    compute_weight: float = 1.0  # servers' compute time (throughput)
    load_weight: float = 1.0  # waiting behind other requests on a busy server
    reliability_weight: float = 1.0  # expected cost of failures, from each server's recent failures with us
    allowed_servers: list[str] | None = None  # if set, only these peer ids
    blocked_servers: list[str] = field(default_factory=list)  # never these peer ids
    min_precision: str = "nf4"  # weakest weight quantization accepted: "nf4" (any), "int8", "float" (none)
    quantization: str | None = None  # only servers whose weights are quantized exactly so ("none", "int8", "nf4")
    max_strikes: float = 2.0  # servers caught this often giving wrong outputs (decayed count) are not used at all
    # Only servers announcing these weights commitments (ClientConfig.require_weights builds it); None: any weights.
    reference_weights: ReferenceWeights | None = None


@dataclass
class PeerStats:
    """What this client measured about one server."""

    rtt: float | None = None  # s, EMA of round trips to it
    overhead: float | None = None  # s, EMA of observed hop time beyond RTT and predicted compute
    failures: float = 0.0  # recent failures, decaying
    strikes: float = 0.0  # outputs the majority of a redundant check disagreed with, decaying slowly


@dataclass(frozen=True)
class RouteRequest:
    mode: Literal["latency", "throughput"] = "latency"  # decoding, or batch forward/backward
    batch_size: int = 1
    max_length: int = 0  # inference: positions each server must be able to cache
    tokens: int = 1  # throughput mode: batch x sequence tokens per request
    push: bool = False  # latency mode: servers push each step's output to the next one (network costs pairwise)
    adapter: str | None = None  # the LoRA adapter the request runs with: only servers holding it can take it
    adapters: tuple[str, ...] = ()  # a U-Net session's adapters (it may combine several): likewise


@dataclass(frozen=True)
class Hop:
    """One hop of a chain with its expected costs (seconds, weighted by the policy); a chain's cost is their sum.

    Network time is split at the server: ``link_in`` brings its input (from the client, or pushed by the previous
    server when ``pushed``), ``link_out`` takes its output to the client (when relayed, or from the last hop).
    """

    span: RemoteSpan
    link_in: float
    link_out: float
    compute: float
    queue: float
    reliability: float
    overhead: float
    pushed: bool = False  # its input is pushed by the previous server, at the RTT that one announced

    @property
    def network(self) -> float:
        return self.link_in + self.link_out

    @property
    def cost(self) -> float:
        return self.network + self.compute + self.queue + self.reliability + self.overhead

    def explain(self) -> dict:
        return {"peer_id": self.span.peer_id, "blocks": [self.span.start, self.span.end],
                "network_s": self.network, "compute_s": self.compute, "queue_s": self.queue,
                "overhead_s": self.overhead, "reliability_s": self.reliability, "total_s": self.cost,
                "link_in_s": self.link_in, "link_out_s": self.link_out,
                "input_from": "previous server" if self.pushed else "client"}


@dataclass
class CostModel:
    """Per-server fixed and per-block costs of a hop, for every usable server (arrays aligned with ``peers``)."""

    peers: list[str]
    infos: list[ServerInfo]
    excluded: dict[str, tuple[ServerInfo, str]]  # servers left out, with why
    starts: np.ndarray
    ends: np.ndarray
    network: np.ndarray
    per_block: np.ndarray  # compute seconds per block used
    queue: np.ndarray
    reliability: np.ndarray
    overhead: np.ndarray
    # Pushed decoding only (else empty): announced server-to-server links, sorted by sender, and what each costs
    # (weighted half RTT); only pairs where the receiver holds the block right after the sender's span.
    push: bool = False
    link_from: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    link_to: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    link_cost: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def build(cls, servers: dict[str, ServerInfo], stats: dict[str, PeerStats], policy: RoutingPolicy,
              request: RouteRequest, failure_cost: float = DEFAULT_FAILURE_COST) -> CostModel:
        usable, excluded = [], {}
        for peer, info in servers.items():
            reason = _exclusion(peer, info, policy, request, stats.get(peer))
            if reason is None:
                usable.append((peer, info))
            else:
                excluded[peer] = (info, reason)
        peers = [peer for peer, _ in usable]
        infos = [info for _, info in usable]
        rtts = [stats[p].rtt for p in peers if p in stats and stats[p].rtt is not None]
        typical_rtt = float(np.median(rtts)) if rtts else DEFAULT_RTT
        starts = np.array([i.start for i in infos], dtype=np.int64)
        ends = np.array([i.end for i in infos], dtype=np.int64)
        lengths = np.maximum(ends - starts, 1)
        if request.mode == "latency":
            speed = _known_or_median([i.inference_rps for i in infos], DEFAULT_INFERENCE_RPS)
            span_time = 1.0 / speed  # one decode step through the whole span
        else:
            speed = _known_or_median([i.forward_tps for i in infos], DEFAULT_FORWARD_TPS)
            span_time = request.tokens / speed
        peer_stats = [stats.get(p, PeerStats()) for p in peers]
        network = np.array([s.rtt if s.rtt is not None else typical_rtt for s in peer_stats])
        overhead = np.array([s.overhead or 0.0 for s in peer_stats])
        load = np.array([i.load for i in infos])
        # a strike (a wrong output) weighs like several failures: the server is avoided, then excluded below
        failures = np.array([s.failures + STRIKE_WEIGHT * s.strikes for s in peer_stats])
        model = cls(peers, infos, excluded, starts, ends, network=policy.latency_weight * network,
                    per_block=policy.compute_weight * span_time / lengths,
                    queue=policy.load_weight * load * span_time, reliability=policy.reliability_weight * failures
                    * failure_cost, overhead=policy.latency_weight * overhead)
        if request.mode == "latency" and request.push:
            model.push = True
            model.link_from, model.link_to, model.link_cost = _announced_links(peers, infos, starts, ends,
                                                                               policy.latency_weight)
        return model

    def ping(self, sender: int, receiver: int) -> float | None:
        """What pushing from server ``sender`` to ``receiver`` costs (indices here), None if not announced."""
        lo, hi = np.searchsorted(self.link_from, [sender, sender + 1])
        match = np.nonzero(self.link_to[lo:hi] == receiver)[0]
        return float(self.link_cost[lo + match[0]]) if len(match) else None

    def link(self, sender: int | None, receiver: int | None) -> float:
        """Network seconds between ``sender``'s output and ``receiver``'s input (None: the client) in a chain."""
        if self.push and sender is not None and receiver is not None:
            pushed = self.ping(sender, receiver)
            if pushed is not None:
                return pushed
        # through the client: the way out of the sender plus the way into the receiver, half an RTT each
        return float((0.0 if sender is None else self.network[sender] / 2)
                     + (0.0 if receiver is None else self.network[receiver] / 2))

    def hop(self, index: int, start: int, end: int, previous: int | None = None,
            following: int | None = None) -> Hop:
        """Server ``index`` running blocks [start, end) after server ``previous`` and before ``following`` (None:
        the client; they matter only with push)."""
        span = RemoteSpan(self.peers[index], start, end, self.infos[index])
        half = float(self.network[index] / 2)  # relayed: the client's round trip, half each way
        link_in, link_out, pushed = half, half, False
        if self.push and previous is not None and (cost := self.ping(previous, index)) is not None:
            link_in, pushed = cost, True
        if self.push and following is not None and self.ping(index, following) is not None:
            link_out = 0.0  # its output goes straight to the next server, whose link_in counts the trip
        return Hop(span, link_in=link_in, link_out=link_out, compute=float(self.per_block[index] * (end - start)),
                   queue=float(self.queue[index]), reliability=float(self.reliability[index]),
                   overhead=float(self.overhead[index]), pushed=pushed)

    def chain(self, steps: list[tuple[int, int, int]]) -> list[Hop]:
        """The hops of a chain given as (server index, start, end) in order, each costed next to its neighbours."""
        servers = [None] + [step[0] for step in steps] + [None]
        return [self.hop(index, start, end, servers[i], servers[i + 2])
                for i, (index, start, end) in enumerate(steps)]


def _announced_links(peers: list[str], infos: list[ServerInfo], starts: np.ndarray, ends: np.ndarray,
                     weight: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sender, receiver, weighted half RTT) of every usable announced link, sorted by sender.

    A server pings servers holding the block right after its span; an announcement that went stale (the receiver
    moved, left or is unusable) is dropped, so a pushed link is always one a chain can take.
    """
    # One pass of C-level iteration over the announcements: this runs on every route, over up to 5 per server.
    position = {peer: i for i, peer in enumerate(peers)}
    pings = [info.next_pings for info in infos]
    senders = np.repeat(np.arange(len(infos)), np.array(list(map(len, pings)), dtype=np.int64))
    receivers = np.array(list(map(position.get, chain.from_iterable(pings), repeat(-1))), dtype=np.int64)
    rtts = np.array(list(chain.from_iterable(p.values() for p in pings)), dtype=float)
    keep = (receivers >= 0) & np.isfinite(rtts) & (rtts >= 0)
    senders, receivers, rtts = senders[keep], receivers[keep], rtts[keep]
    adjacent = (starts[receivers] <= ends[senders]) & (ends[senders] < ends[receivers])
    return senders[adjacent], receivers[adjacent], weight * rtts[adjacent] / 2


def _exclusion(peer: str, info: ServerInfo, policy: RoutingPolicy, request: RouteRequest,
               stats: PeerStats | None = None) -> str | None:
    """Why a server cannot take this request, or None if it can."""
    if stats is not None and stats.strikes >= policy.max_strikes:
        return "caught returning wrong outputs"
    if info.state != ServerState.ONLINE:
        return info.state.name.lower()
    if peer in policy.blocked_servers or (policy.allowed_servers is not None and peer not in policy.allowed_servers):
        return "blocked by the routing policy or recent failures"
    if not meets_precision(info.quantization, policy.min_precision):
        return f"{info.quantization} weights, below the precision {policy.min_precision}"
    if policy.quantization is not None and info.quantization != policy.quantization:
        return f"{info.quantization} weights, not the {policy.quantization} the routing policy asks for"
    if policy.reference_weights is not None:
        wrong = policy.reference_weights.mismatch(info.start, info.end, info.dtype, info.quantization, info.weights)
        if wrong is not None:
            return wrong
    missing = next((name for name in (request.adapter, *request.adapters)
                    if name is not None and name not in info.adapters), None)
    if missing is not None:
        return f"does not serve adapter {missing!r}"
    if request.mode == "latency" and request.max_length:
        # announced free cache is for the whole span; a session reserves batch x max_length of it
        if info.cache_tokens_left < request.batch_size * request.max_length:
            return f"{info.cache_tokens_left} free cache tokens < {request.batch_size}x{request.max_length} needed"
        if info.max_session_length and info.max_session_length < request.max_length:
            return f"sessions limited to {info.max_session_length} positions"
    return None


def _known_or_median(values: list[float | None], default: float) -> np.ndarray:
    known = [v for v in values if v is not None and v > 0]
    fill = float(np.median(known)) if known else default
    return np.array([v if v is not None and v > 0 else fill for v in values])


def find_chain(servers: dict[str, ServerInfo], start: int, end: int, *, stats: dict[str, PeerStats] | None = None,
               policy: RoutingPolicy | None = None, request: RouteRequest | None = None, model_id: str = "the model",
               failure_cost: float = DEFAULT_FAILURE_COST) -> list[Hop]:
    """The cheapest chain of hops covering blocks [start, end). Raises ``MissingBlocksError`` if there is none."""
    model = CostModel.build(servers, stats or {}, policy or RoutingPolicy(), request or RouteRequest(), failure_cost)
    return cheapest_chain(model, start, end, model_id)


def parallel_chains(model: CostModel, start: int, end: int, max_chains: int,
                    model_id: str = "the model") -> list[list[Hop]]:
    """Chains to split one large throughput-mode request over, when that finishes sooner than one chain.

    Each chain is the cheapest once the servers of the previous ones count as busy with their share; the batch is
    then split evenly over the first k chains, k growing while that clearly shortens the slowest chain's time (its
    fixed costs plus its compute for 1/k of the batch). Raises ``MissingBlocksError`` if no chain exists at all.
    """
    chains: list[list[Hop]] = []
    position = {peer: i for i, peer in enumerate(model.peers)}
    while len(chains) < max_chains:
        try:
            chain = cheapest_chain(model, start, end, model_id)
        except MissingBlocksError:
            if not chains:
                raise
            break
        chains.append(chain)
        for hop in chain:  # busy with this chain's part from now on
            model.queue[position[hop.span.peer_id]] += hop.compute

    def makespan(k: int) -> float:
        return max(sum(h.cost - h.compute + h.compute / k for h in chain) for chain in chains[:k])

    best = 1
    for k in range(2, len(chains) + 1):  # another chain must pay for its extra requests and client work
        if makespan(k) < SPLIT_GAIN * makespan(best):
            best = k
    return chains[:best]


def cheapest_chain(model: CostModel, start: int, end: int, model_id: str = "the model") -> list[Hop]:
    """The cheapest chain covering blocks [start, end) under ``model``; ``MissingBlocksError`` if there is none."""
    if model.push:
        return _cheapest_pushed_chain(model, start, end, model_id)
    # A hop enters a server at any block of its span and runs to the end of that span (or of the request).
    inside = (model.starts < end) & (model.ends > start)
    index = np.nonzero(inside)[0]
    stops = np.minimum(model.ends[index], end)
    entry_first = np.maximum(model.starts[index], start)
    fixed = (model.network + model.queue + model.reliability + model.overhead)[index]
    per_block = model.per_block[index]

    # Every (server, entry block) pair, grouped by entry block.
    counts = stops - entry_first
    pair_server = np.repeat(np.arange(len(index)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    pair_entry = np.repeat(entry_first, counts) + offsets
    pair_stop = stops[pair_server]
    pair_cost = fixed[pair_server] + per_block[pair_server] * (pair_stop - pair_entry)
    order = np.argsort(pair_entry, kind="stable")
    pair_server, pair_entry, pair_stop, pair_cost = (a[order] for a in (pair_server, pair_entry, pair_stop, pair_cost))
    bounds = np.searchsorted(pair_entry, np.arange(start, end + 1))

    best = np.full(end + 1, np.inf)  # cheapest cost of having run blocks [start, b)
    best[start] = 0.0
    for block in range(start, end):
        lo, hi = bounds[block - start], bounds[block - start + 1]
        if lo < hi and np.isfinite(best[block]):
            np.minimum.at(best, pair_stop[lo:hi], best[block] + pair_cost[lo:hi])

    if not np.isfinite(best[end]):
        covered = np.zeros(end - start, dtype=bool)
        covered[pair_entry - start] = True
        raise _missing_blocks(model, start, covered, model_id)
    # Walk back: the pair that produced best[block] is one whose entry cost plus hop cost equals it exactly
    # (the same float additions as above).
    hops, block = [], end
    while block > start:
        candidates = np.nonzero(pair_stop == block)[0]
        totals = best[pair_entry[candidates]] + pair_cost[candidates]
        pair = candidates[int(np.argmin(totals))]
        server, entry = int(index[pair_server[pair]]), int(pair_entry[pair])
        hops.append(model.hop(server, entry, block))
        block = entry
    return hops[::-1]


def _missing_blocks(model: CostModel, start: int, covered: np.ndarray, model_id: str) -> MissingBlocksError:
    # Every block that some usable server covers is reachable, so the first uncovered one is the culprit.
    missing = start + int(np.argmin(covered))
    holders = [reason for info, reason in model.excluded.values() if info.start <= missing < info.end]
    detail = f" usable by this request ({len(holders)} excluded: {'; '.join(sorted(set(holders)))})" \
        if holders else ""
    return MissingBlocksError(f"no server holds block {missing} of {model_id}{detail}")


def _cheapest_pushed_chain(model: CostModel, start: int, end: int, model_id: str) -> list[Hop]:
    """``cheapest_chain`` when servers push to each other, so that a link's cost depends on both its ends.

    ``done[s]``: the cheapest cost of a chain whose last hop is server s (up to s's stop, before its output leaves).
    Blocks are visited in order; at block b every server s stopping there is final, and a server t entering at b
    takes the cheapest of: the best s that did not announce t, at done[s] + half s's RTT + half t's RTT (the
    relayed fallback, separable: one sort of the senders serves every t), and each s that announced t, at
    done[s] + their link cost. Announcers are skipped in the first case (their link costs what they announced,
    more or less than the fallback), so every total is the exact cost of a real chain and the result is optimal.
    """
    # Local servers: those holding a block of the request, numbered by the first block a hop may enter them at,
    # so that the servers a hop may enter at block b are those numbered below can_enter[b] that stop after b.
    inside = np.nonzero((model.starts < end) & (model.ends > start))[0]
    index = inside[np.argsort(np.maximum(model.starts[inside], start), kind="stable")]
    n = len(index)
    stops = np.minimum(model.ends[index], end)  # a hop runs to the end of its span (or of the request)
    entry_first = np.maximum(model.starts[index], start)
    can_enter = np.searchsorted(entry_first, np.arange(start, end), side="right")
    half = model.network[index] / 2  # one way between the client and each server
    fixed = (model.queue + model.reliability + model.overhead)[index]
    per_block = model.per_block[index]

    # Servers grouped by the block they stop at: they hand over to the servers entering there.
    by_stop = np.argsort(stops, kind="stable")
    stop_bounds = np.searchsorted(stops[by_stop], np.arange(start, end + 2))
    slot = np.empty(n, dtype=np.int64)  # each server's position within its group
    slot[by_stop] = np.arange(n) - stop_bounds[stops[by_stop] - start]

    # Announced links that a chain of this request can take, grouped by the block they hand over at.
    local = np.full(len(model.peers), -1, dtype=np.int64)
    local[index] = np.arange(n)
    senders, receivers = local[model.link_from], local[model.link_to]
    usable = (senders >= 0) & (receivers >= 0)
    senders, receivers, link_cost = senders[usable], receivers[usable], model.link_cost[usable]
    handover = stops[senders]
    usable = (handover < end) & (entry_first[receivers] <= handover) & (handover < stops[receivers])
    by_block = np.argsort(handover[usable], kind="stable")
    senders, receivers, link_cost, handover = (a[usable][by_block] for a in (senders, receivers, link_cost, handover))
    link_bounds = np.searchsorted(handover, np.arange(start, end + 1))

    done = np.full(n, np.inf)
    came_from = np.full(n, -1, dtype=np.int64)  # the server before it, -1: the client
    entered = np.zeros(n, dtype=np.int64)
    place = np.zeros(n, dtype=np.int64)  # scratch: a server's position among those entering at the current block
    for block in range(start, end):
        entering = np.flatnonzero(stops[: can_enter[block - start]] > block)
        if len(entering) == 0:
            continue
        if block == start:
            into, source = half[entering], np.full(len(entering), -1, dtype=np.int64)
        else:
            group = by_stop[stop_bounds[block - start] : stop_bounds[block - start + 1]]
            if len(group) == 0:
                continue  # no hop stops here, so none can start here
            leaving = done[group] + half[group]
            ranked = np.argsort(leaving)
            skip = np.zeros(len(entering), dtype=np.int64)  # per entering server: leading ranks that announced it
            lo, hi = link_bounds[block - start], link_bounds[block - start + 1]
            if lo < hi:
                place[entering] = np.arange(len(entering))
                receiver, sender = place[receivers[lo:hi]], senders[lo:hi]
                rank = np.empty(len(group), dtype=np.int64)
                rank[ranked] = np.arange(len(group))
                sender_rank = rank[slot[sender]]
                # Walk each receiver past the senders, best first, that announced it (a sender announces a
                # receiver at most once, so each round moves a receiver by at most one): a few rounds at most.
                while True:
                    passed = receiver[sender_rank == skip[receiver]]
                    if len(passed) == 0:
                        break
                    skip[passed] += 1
            best = ranked[np.minimum(skip, len(group) - 1)]
            into = np.where(skip < len(group), leaving[best] + half[entering], np.inf)
            source = group[best]
            if lo < hi:
                pushed = done[sender] + link_cost[lo:hi]
                np.minimum.at(into, receiver, pushed)
                won = pushed == into[receiver]  # exact: the very value minimum.at kept
                source[receiver[won]] = sender[won]
        total = into + (fixed[entering] + per_block[entering] * (stops[entering] - block))
        improved = total < done[entering]
        entering = entering[improved]
        done[entering], came_from[entering], entered[entering] = total[improved], source[improved], block

    last = by_stop[stop_bounds[end - start] : stop_bounds[end - start + 1]]
    finished = done[last] + half[last]
    if len(last) == 0 or not np.isfinite(finished.min()):
        covered = np.zeros(end - start + 1, dtype=np.int64)  # servers that can be entered at each block
        np.add.at(covered, entry_first - start, 1)
        np.add.at(covered, stops - start, -1)
        raise _missing_blocks(model, start, np.cumsum(covered)[:-1] > 0, model_id)
    steps, server = [], int(last[int(np.argmin(finished))])
    while server >= 0:
        steps.append((int(index[server]), int(entered[server]), int(stops[server])))
        server = int(came_from[server])
    return model.chain(steps[::-1])
