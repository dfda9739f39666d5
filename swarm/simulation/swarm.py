"""Synthetic swarms run through the project's real routing (``swarm.client.routing``) and block choice
(``swarm.server.block_selection``), with no processes and no network.

- ``random_swarm``: heterogeneous servers (fast GPUs to slow CPUs, near and far) covering every block, with the
  RTTs they announce to the servers after their span (``next_pings``, for routing pushed decoding).
- ``exhaustive_best_cost``: the true cheapest chain's cost, by searching every valid chain (small swarms only).
- ``random_valid_chain``: a chain picked at random among valid ones, the "no routing" baseline.
- ``chain_problems``: why a chain is not a valid answer to a request (empty if it is).
- ``simulate_coverage``: servers joining, leaving and rebalancing; how well the blocks stay covered.

Costs always come from ``CostModel.build``, so the simulator judges routing by the very numbers routing uses:
a gap between ``find_chain`` and ``exhaustive_best_cost`` can only be the search's fault, never the cost model's.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from swarm.client.routing import (
    DEFAULT_FAILURE_COST,
    CostModel,
    Hop,
    MissingBlocksError,
    PeerStats,
    RouteRequest,
    RoutingPolicy,
)
from swarm.dht.schema import ServerInfo, ServerState
from swarm.server.block_selection import MOVE_MARGIN, block_throughputs, choose_span, should_move

# ---- synthetic swarms


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    # Speeds and RTTs span orders of magnitude; a log-uniform draw gives each decade equal weight.
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _random_server(rng: np.random.Generator, start: int, length: int, block_seconds: tuple[float, float],
                   offline_prob: float) -> ServerInfo:
    # One decode step through one block: ~1 ms on a fast GPU, ~100 ms on a slow CPU (the default range).
    step = _log_uniform(rng, *block_seconds)
    prefill_speedup = _log_uniform(rng, 20.0, 200.0)  # a prefill batches tokens: GPUs gain more than CPUs
    forward_tps = prefill_speedup / (step * length)
    state = ServerState.OFFLINE if rng.random() < offline_prob else ServerState.ONLINE
    # Most servers are idle; a few have requests queued, which routing should steer around.
    load = float(rng.integers(1, 5)) if rng.random() < 0.3 else 0.0
    return ServerInfo(state=state, start=start, end=start + length, cache_tokens_left=1 << 20,
                      max_session_length=8192, throughput=forward_tps, inference_rps=1.0 / (step * length),
                      forward_tps=forward_tps, load=load)


def random_swarm(num_blocks: int, num_servers: int, seed: int, *, max_span: int | None = None,
                 block_seconds: tuple[float, float] = (0.001, 0.1), rtt_seconds: tuple[float, float] = (0.005, 0.2),
                 offline_prob: float = 0.05, unpinged_prob: float = 0.1, failure_prob: float = 0.1,
                 next_pings: int = 5,
                 detour: tuple[float, float] = (0.8, 1.5)) -> tuple[dict[str, ServerInfo], dict[str, PeerStats]]:
    """``num_servers`` random servers (plus, if needed, a few more so that every block has an online holder) and
    the client's measurements of them. The same seed gives the same swarm.

    Span lengths are uniform in [1, ``max_span``] (default: half the model); a server's decode time per block is
    log-uniform in ``block_seconds`` and its RTT log-uniform in ``rtt_seconds``. Some servers are offline (routing
    must skip them), some were never pinged (routing falls back to the typical RTT), some failed us recently.
    Each online server announces its RTT to up to ``next_pings`` online servers holding the block after its span,
    taken from ``server_rtts`` (``detour``: see there).
    """
    rng = np.random.default_rng(seed)
    max_span = max(1, min(num_blocks, max_span or num_blocks // 2))
    servers: dict[str, ServerInfo] = {}
    for _ in range(num_servers):
        length = int(rng.integers(1, max_span + 1))
        start = int(rng.integers(0, num_blocks - length + 1))
        servers[f"peer{len(servers):05d}"] = _random_server(rng, start, length, block_seconds, offline_prob)

    # A block nobody online holds makes every route fail; the experiments are about choosing, so fill the holes.
    covered = np.zeros(num_blocks, dtype=bool)
    for info in servers.values():
        if info.state == ServerState.ONLINE:
            covered[info.start : info.end] = True
    while not covered.all():
        start = int(np.argmin(covered))
        length = int(rng.integers(1, min(max_span, num_blocks - start) + 1))
        servers[f"peer{len(servers):05d}"] = _random_server(rng, start, length, block_seconds, offline_prob=0.0)
        covered[start : start + length] = True

    stats: dict[str, PeerStats] = {}
    for peer in servers:
        rtt = None if rng.random() < unpinged_prob else _log_uniform(rng, *rtt_seconds)
        overhead = float(rng.uniform(0.0, 0.005))  # serialization and scheduling beyond RTT + compute
        failures = float(rng.uniform(0.1, 1.0)) if rng.random() < failure_prob else 0.0
        stats[peer] = PeerStats(rtt=rtt, overhead=overhead, failures=failures)
    if next_pings:
        _announce_next_pings(servers, stats, num_blocks, seed, next_pings, rtt_seconds, detour)
    return servers, stats


def server_rtts(client_rtts: np.ndarray, angles: np.ndarray, detour: tuple[float, float], rng: np.random.Generator,
                senders: np.ndarray, receivers: np.ndarray) -> np.ndarray:
    """RTTs between servers ``senders[k]`` and ``receivers[k]``, from a latency model around the client.

    Server i sits on a plane at distance ``client_rtts[i]`` from the client, at angle ``angles[i]``; two servers'
    RTT is their distance times a random detour factor, log-uniform in ``detour``. Near each other is fast and on
    opposite sides of the client is slow; a factor above 1 makes some direct links slower than going through the
    client (real networks break the triangle inequality too), so routing cannot assume that pushing always wins.
    """
    x, y = client_rtts * np.cos(angles), client_rtts * np.sin(angles)
    distance = np.hypot(x[senders] - x[receivers], y[senders] - y[receivers])
    factor = np.exp(rng.uniform(np.log(detour[0]), np.log(detour[1]), len(senders)))
    return np.maximum(distance * factor, 1e-4)  # two servers in one room still take a little


def _announce_next_pings(servers: dict[str, ServerInfo], stats: dict[str, PeerStats], num_blocks: int, seed: int,
                         per_server: int, rtt_seconds: tuple[float, float], detour: tuple[float, float]) -> None:
    # A generator of its own, so that the draws above (and every figure computed from them) stay as they were.
    rng = np.random.default_rng([seed, 1])
    peers = list(servers)
    infos = [servers[p] for p in peers]
    # The servers' true distances: what the client measured, or, for those it never pinged, what it would measure.
    truth = np.array([stats[p].rtt if stats[p].rtt is not None else _log_uniform(rng, *rtt_seconds) for p in peers])
    angles = rng.uniform(0.0, 2 * np.pi, len(peers))
    online = np.array([info.state == ServerState.ONLINE for info in infos])
    starts = np.array([info.start for info in infos])
    ends = np.array([info.end for info in infos])
    holders = [np.nonzero(online & (starts <= block) & (ends > block))[0] for block in range(num_blocks)]
    senders, receivers = [], []
    for i, info in enumerate(infos):  # as a server does: a few random online holders of the block after its span
        if online[i] and info.end < num_blocks and len(holders[info.end]):
            chosen = rng.choice(holders[info.end], min(per_server, len(holders[info.end])), replace=False)
            senders.extend([i] * len(chosen)), receivers.extend(chosen.tolist())
    rtts = server_rtts(truth, angles, detour, rng, np.array(senders, dtype=np.int64),
                       np.array(receivers, dtype=np.int64))
    for i, j, rtt in zip(senders, receivers, rtts.tolist(), strict=True):
        infos[i].next_pings[peers[j]] = rtt


# ---- judging routes


def _cost_model(servers: dict[str, ServerInfo], stats: dict[str, PeerStats] | None, policy: RoutingPolicy | None,
                request: RouteRequest | None, failure_cost: float) -> CostModel:
    # The same defaults as find_chain, so that all three are judged on the same costs.
    return CostModel.build(servers, stats or {}, policy or RoutingPolicy(), request or RouteRequest(), failure_cost)


def exhaustive_best_cost(servers: dict[str, ServerInfo], stats: dict[str, PeerStats] | None,
                         policy: RoutingPolicy | None, request: RouteRequest | None, start: int, end: int, *,
                         failure_cost: float = DEFAULT_FAILURE_COST) -> float:
    """The cost of the cheapest valid chain over blocks [start, end), searching all of them (inf if none).

    A chain is a sequence of hops; a hop enters a usable server at any block of its span and runs to
    min(span end, ``end``). Depth-first over the next block to reach, with memoization: the cheapest way on from
    a block does not depend on how the chain got there (with push: on which server it got there with, since a link
    costs what its two ends make it), so this is exact while visiting each state once. Plain Python over
    ``CostModel`` arrays and its pairwise ``link`` costs, independent of the vectorized search it checks.
    """
    model = _cost_model(servers, stats, policy, request, failure_cost)
    holders = _holders(model, start, end)
    if model.push:
        rest = model.queue + model.reliability + model.overhead

        @functools.cache
        def cheapest_after(block: int, previous: int | None) -> float:
            if block == end:
                return model.link(previous, None)
            best = float("inf")
            for i in holders[block - start]:
                stop = min(int(model.ends[i]), end)
                hop = model.link(previous, i) + float(rest[i]) + float(model.per_block[i]) * (stop - block)
                best = min(best, hop + cheapest_after(stop, i))
            return best

        return cheapest_after(start, None)

    fixed = model.network + model.queue + model.reliability + model.overhead

    @functools.cache
    def cheapest_from(block: int) -> float:
        if block == end:
            return 0.0
        best = float("inf")
        for i in holders[block - start]:
            stop = min(int(model.ends[i]), end)
            hop = float(fixed[i]) + float(model.per_block[i]) * (stop - block)
            best = min(best, hop + cheapest_from(stop))
        return best

    return cheapest_from(start)


def count_valid_chains(servers: dict[str, ServerInfo], start: int, end: int, *,
                       request: RouteRequest | None = None, policy: RoutingPolicy | None = None) -> int:
    """How many distinct valid chains cover [start, end): the size of the space the exhaustive search covers."""
    model = _cost_model(servers, {}, policy, request, DEFAULT_FAILURE_COST)
    holders = _holders(model, start, end)

    @functools.cache
    def count_from(block: int) -> int:
        if block == end:
            return 1
        return sum(count_from(min(int(model.ends[i]), end)) for i in holders[block - start])

    return count_from(start)


def _holders(model: CostModel, start: int, end: int) -> list[list[int]]:
    """Per block of [start, end): the indices (in ``model``) of the usable servers a hop can enter there."""
    return [np.nonzero((model.starts <= block) & (model.ends > block))[0].tolist() for block in range(start, end)]


def random_valid_chain(servers: dict[str, ServerInfo], start: int, end: int, rng: np.random.Generator, *,
                       stats: dict[str, PeerStats] | None = None, policy: RoutingPolicy | None = None,
                       request: RouteRequest | None = None,
                       failure_cost: float = DEFAULT_FAILURE_COST) -> tuple[list[Hop], float]:
    """A valid chain chosen without looking at costs, and its total cost under the routing cost model.

    At each block still to run, one of the usable servers holding it is picked uniformly and runs to the end of
    its span: what a client that only knows who holds what would do.
    """
    model = _cost_model(servers, stats, policy, request, failure_cost)
    holders = _holders(model, start, end)
    steps: list[tuple[int, int, int]] = []
    block = start
    while block < end:
        if not holders[block - start]:
            raise MissingBlocksError(f"no usable server holds block {block}")
        i = holders[block - start][int(rng.integers(len(holders[block - start])))]
        stop = min(int(model.ends[i]), end)
        steps.append((i, block, stop))
        block = stop
    hops = model.chain(steps)  # costed as a whole: with push, a hop's network time depends on its neighbours
    return hops, chain_cost(hops)


def chain_cost(hops: list[Hop]) -> float:
    """Seconds one step takes through the chain, as routing predicts it (hops as ``CostModel.chain`` costs them)."""
    return float(sum(hop.cost for hop in hops))


def chain_problems(hops: list[Hop], servers: dict[str, ServerInfo], start: int, end: int) -> list[str]:
    """What makes ``hops`` an invalid answer for blocks [start, end) (empty: valid).

    Valid: hops are contiguous from ``start`` to ``end``; each runs on an online server that holds its blocks, and
    ends where the hop semantics say (the server's span end, or ``end``).
    """
    problems: list[str] = []
    block = start
    for hop in hops:
        span = hop.span
        info = servers.get(span.peer_id)
        if span.start != block:
            problems.append(f"{span} starts at {span.start}, expected {block}")
        if info is None:
            problems.append(f"{span}: unknown server")
        else:
            if info.state != ServerState.ONLINE:
                problems.append(f"{span}: server is {info.state.name}")
            if not info.start <= span.start < span.end == min(info.end, end):
                problems.append(f"{span} does not fit the server's span [{info.start}, {info.end})")
        block = span.end
    if block != end:
        problems.append(f"chain ends at {block}, expected {end}")
    return problems


# ---- coverage under churn


def simulate_coverage(num_blocks: int, blocks_per_server: int, steps: int, seed: int, join_prob: float,
                      leave_prob: float, *, initial_servers: int = 0,
                      throughput_range: tuple[float, float] = (50.0, 500.0), margin: float = MOVE_MARGIN,
                      leave_until: int | None = None) -> list[dict]:
    """Servers with ``--num-blocks blocks_per_server`` joining and leaving; one record per step.

    ``initial_servers`` join one after another before step 0. At each step, every server leaves with probability
    ``leave_prob`` (only before step ``leave_until``, if set), then one server joins with probability ``join_prob``,
    choosing its span with ``choose_span``; then every server, in peer-id order, is offered ``should_move`` and
    moves at once, so later servers see earlier moves (as servers that rebalance at different times would).
    Each record: step, servers, joined, left, zero_before_moves (uncovered blocks after churn), moves,
    zero_blocks and min_throughput (after the moves), spans (peer -> (start, end) after the moves).
    """
    rng = np.random.default_rng(seed)
    servers: dict[str, ServerInfo] = {}
    next_id = 0

    def join() -> None:
        nonlocal next_id
        peer, next_id = f"s{next_id:05d}", next_id + 1
        own = float(rng.uniform(*throughput_range))
        start, end = choose_span(servers, num_blocks, blocks_per_server, own, me=peer)
        servers[peer] = ServerInfo(state=ServerState.ONLINE, start=start, end=end, throughput=own)

    for _ in range(initial_servers):
        join()

    history = []
    for step in range(steps):
        left = 0
        if leave_until is None or step < leave_until:
            for peer in sorted(servers):
                if rng.random() < leave_prob:
                    del servers[peer]
                    left += 1
        joined = rng.random() < join_prob
        if joined:
            join()
        zero_before = int((block_throughputs(servers, num_blocks) == 0).sum())

        moves = 0
        for peer in sorted(servers):
            info = servers[peer]
            target = should_move(servers, num_blocks, peer, (info.start, info.end), info.throughput or 0.0, margin)
            if target is not None:
                servers[peer] = dataclasses.replace(info, start=target[0], end=target[1])
                moves += 1

        totals = block_throughputs(servers, num_blocks)
        history.append({"step": step, "servers": len(servers), "joined": int(joined), "left": left,
                        "zero_before_moves": zero_before, "moves": moves, "zero_blocks": int((totals == 0).sum()),
                        "min_throughput": float(totals.min()),
                        "spans": {peer: (info.start, info.end) for peer, info in servers.items()}})
    return history
