"""Choosing the chain of servers for a request: a cheapest path over the blocks, from measured costs.

A hop enters a server at some block and leaves at the end of its span (or of the request): its cost is the
client's measured round trip to it (the client relays activations), the span's compute time from the speed the
server measured and announced, a queueing term from its announced load, the per-hop overhead the client observed
on past requests, and the expected cost of a failure given how often it failed us recently. Every term is weighted
by the client's ``RoutingPolicy``. Servers that cannot take the request (offline, blocked, too little free cache,
too low a precision) are left out. The cheapest chain is found by dynamic programming over block positions,
vectorized with numpy so that 10,000 servers route in milliseconds.

Pure functions of their inputs: the ``SequenceManager`` (sequence_manager.py) feeds them what it fetched and
measured, and the simulator feeds them synthetic swarms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from swarm.blocks.quantization import meets_precision
from swarm.dht.schema import ServerInfo, ServerState

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


@dataclass(frozen=True)
class Hop:
    span: RemoteSpan
    network: float
    compute: float
    queue: float
    reliability: float
    overhead: float

    @property
    def cost(self) -> float:
        return self.network + self.compute + self.queue + self.reliability + self.overhead

    def explain(self) -> dict:
        return {"peer_id": self.span.peer_id, "blocks": [self.span.start, self.span.end],
                "network_s": self.network, "compute_s": self.compute, "queue_s": self.queue,
                "overhead_s": self.overhead, "reliability_s": self.reliability, "total_s": self.cost}


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
        return cls(peers, infos, excluded, starts, ends, network=policy.latency_weight * network,
                   per_block=policy.compute_weight * span_time / lengths,
                   queue=policy.load_weight * load * span_time, reliability=policy.reliability_weight * failures
                   * failure_cost, overhead=policy.latency_weight * overhead)

    def hop(self, index: int, start: int, end: int) -> Hop:
        span = RemoteSpan(self.peers[index], start, end, self.infos[index])
        return Hop(span, network=float(self.network[index]), compute=float(self.per_block[index] * (end - start)),
                   queue=float(self.queue[index]), reliability=float(self.reliability[index]),
                   overhead=float(self.overhead[index]))


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
        # Every block that some usable server covers is reachable, so the first uncovered one is the culprit.
        covered = np.zeros(end - start, dtype=bool)
        covered[pair_entry - start] = True
        missing = start + int(np.argmin(covered))
        holders = [reason for info, reason in model.excluded.values() if info.start <= missing < info.end]
        detail = f" usable by this request ({len(holders)} excluded: {'; '.join(sorted(set(holders)))})" \
            if holders else ""
        raise MissingBlocksError(f"no server holds block {missing} of {model_id}{detail}")
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
