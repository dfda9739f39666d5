"""The real routing and block choice on simulated swarms (swarm/simulation): pure computation, no processes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from swarm.client.routing import CostModel, MissingBlocksError, RouteRequest, RoutingPolicy, find_chain
from swarm.dht.schema import ServerInfo, ServerState
from swarm.server.block_selection import block_throughputs, should_move
from swarm.simulation.swarm import (
    chain_cost,
    chain_problems,
    count_valid_chains,
    exhaustive_best_cost,
    random_swarm,
    random_valid_chain,
    simulate_coverage,
)


def swarm_args(seed: int) -> tuple[int, int, int]:
    """(num_blocks, num_servers, seed) of a small random swarm: 8-12 blocks, 6-15 servers."""
    rng = np.random.default_rng(seed)
    return int(rng.integers(8, 13)), int(rng.integers(6, 16)), seed


def small_swarm(seed: int):
    num_blocks, num_servers, _ = swarm_args(seed)
    servers, stats = random_swarm(num_blocks, num_servers, seed)
    return num_blocks, servers, stats


def test_random_swarm_is_deterministic_and_covers_every_block():
    for seed in range(10):
        num_blocks, servers, stats = small_swarm(seed)
        assert random_swarm(*swarm_args(seed)) == (servers, stats)
        covered = np.zeros(num_blocks, dtype=bool)
        for info in servers.values():
            if info.state == ServerState.ONLINE:
                covered[info.start : info.end] = True
        assert covered.all()
    assert random_swarm(10, 8, 1) != random_swarm(10, 8, 2)
    # Holes are filled even when the drawn servers leave many: 2 one-block servers over 30 blocks.
    servers, _ = random_swarm(30, 2, 0, max_span=1)
    assert sorted(b for i in servers.values() if i.state == ServerState.ONLINE for b in range(i.start, i.end)) \
        == list(range(30))


def all_chain_costs(model: CostModel, block: int, end: int):
    """The cost of every valid chain from ``block`` to ``end``, listed one by one (no memoization, no pruning)."""
    if block == end:
        yield 0.0
        return
    for i in range(len(model.peers)):
        if model.starts[i] <= block < model.ends[i]:
            stop = min(int(model.ends[i]), end)
            hop = model.hop(i, block, stop).cost
            for rest in all_chain_costs(model, stop, end):
                yield hop + rest


def test_exhaustive_search_matches_brute_force_enumeration():
    # The reference itself, against listing every chain explicitly on swarms small enough for that.
    for seed in range(20):
        servers, stats = random_swarm(6, 6, seed)
        model = CostModel.build(servers, stats, RoutingPolicy(), RouteRequest())
        for start, end in ((0, 6), (1, 5)):
            costs = list(all_chain_costs(model, start, end))
            assert len(costs) == count_valid_chains(servers, start, end)
            best = exhaustive_best_cost(servers, stats, None, None, start, end)
            assert math.isclose(min(costs), best, rel_tol=1e-12)


@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_find_chain_is_optimal_on_small_swarms(mode):
    request = RouteRequest(mode=mode, tokens=256, max_length=512)
    rng = np.random.default_rng(7)
    for seed in range(50):
        num_blocks, servers, stats = small_swarm(seed)
        # The whole model and a random sub-range (a client running only part of the blocks).
        for start, end in ((0, num_blocks), sorted(rng.choice(num_blocks + 1, 2, replace=False).tolist())):
            hops = find_chain(servers, start, end, stats=stats, request=request)
            assert chain_problems(hops, servers, start, end) == []
            best = exhaustive_best_cost(servers, stats, None, request, start, end)
            assert abs(chain_cost(hops) - best) <= 1e-9, (seed, start, end)


def test_find_chain_is_optimal_under_other_policies():
    rng = np.random.default_rng(3)
    for seed in range(50):
        num_blocks, servers, stats = small_swarm(seed)
        peers = sorted(servers)
        policy = RoutingPolicy(latency_weight=float(rng.uniform(0, 3)), compute_weight=float(rng.uniform(0, 3)),
                               load_weight=float(rng.uniform(0, 3)), reliability_weight=float(rng.uniform(0, 3)),
                               blocked_servers=[peers[int(rng.integers(len(peers)))]])
        best = exhaustive_best_cost(servers, stats, policy, None, 0, num_blocks)
        if math.isinf(best):  # blocking a sole holder leaves a block uncovered
            with pytest.raises(MissingBlocksError):
                find_chain(servers, 0, num_blocks, stats=stats, policy=policy)
            continue
        hops = find_chain(servers, 0, num_blocks, stats=stats, policy=policy)
        assert chain_problems(hops, servers, 0, num_blocks) == []
        assert all(hop.span.peer_id not in policy.blocked_servers for hop in hops)
        assert abs(chain_cost(hops) - best) <= 1e-9, seed


def test_random_chain_is_valid_and_never_cheaper_than_the_optimum():
    rng = np.random.default_rng(0)
    dearer = 0
    for seed in range(50):
        num_blocks, servers, stats = small_swarm(seed)
        best = exhaustive_best_cost(servers, stats, None, None, 0, num_blocks)
        for _ in range(5):
            hops, cost = random_valid_chain(servers, 0, num_blocks, rng, stats=stats)
            assert chain_problems(hops, servers, 0, num_blocks) == []
            assert cost >= best - 1e-12
            dearer += cost > best * 1.05
    assert dearer > 0  # the baseline is not secretly the optimum


def test_uncovered_block_is_reported_by_both_searches():
    servers = {"a": ServerInfo(ServerState.ONLINE, 0, 3), "b": ServerInfo(ServerState.ONLINE, 4, 6),
               "c": ServerInfo(ServerState.OFFLINE, 3, 4)}
    assert math.isinf(exhaustive_best_cost(servers, {}, None, None, 0, 6))
    with pytest.raises(MissingBlocksError, match="block 3"):
        find_chain(servers, 0, 6)
    with pytest.raises(MissingBlocksError):
        random_valid_chain(servers, 0, 6, np.random.default_rng(0))


def test_routing_at_1000_servers_returns_a_valid_chain():
    servers, stats = random_swarm(80, 1000, seed=11)
    hops = find_chain(servers, 0, 80, stats=stats)
    assert chain_problems(hops, servers, 0, 80) == []
    assert hops[0].span.start == 0 and hops[-1].span.end == 80
    assert all(a.span.end == b.span.start for a, b in zip(hops, hops[1:], strict=False))
    # Not merely valid: much cheaper than choosing at random.
    rng = np.random.default_rng(0)
    assert chain_cost(hops) < min(random_valid_chain(servers, 0, 80, rng, stats=stats)[1] for _ in range(5))


def test_coverage_recovers_under_churn():
    repaired_by_moves = 0
    for seed in range(5):
        history = simulate_coverage(24, 6, 120, seed, join_prob=0.3, leave_prob=0.04, initial_servers=8,
                                    leave_until=100)
        last = history[-1]
        assert last["servers"] * 6 >= 24
        assert last["zero_blocks"] == 0 and last["min_throughput"] > 0
        assert set(last["spans"].values()) <= {(s, s + 6) for s in range(19)}
        repaired_by_moves += sum(r["zero_before_moves"] > 0 and r["zero_blocks"] == 0 and not r["joined"]
                                 for r in history)
    assert repaired_by_moves > 0  # rebalancing alone closed some holes that departures opened


def test_coverage_is_deterministic_and_counts_moves():
    a = simulate_coverage(24, 6, 60, 4, join_prob=0.3, leave_prob=0.04, initial_servers=8)
    assert a == simulate_coverage(24, 6, 60, 4, join_prob=0.3, leave_prob=0.04, initial_servers=8)
    assert sum(r["moves"] for r in a) > 0
    for before, after in zip(a, a[1:], strict=False):
        assert after["servers"] == before["servers"] + after["joined"] - after["left"]


def test_rebalancing_closes_two_separate_holes():
    spans = {"s0": (0, 2), "s1": (0, 2), "s2": (0, 2), "s3": (4, 6), "s4": (6, 8), "s5": (10, 12), "s6": (4, 6)}
    servers = {p: ServerInfo(ServerState.ONLINE, a, b, throughput=100.0) for p, (a, b) in spans.items()}
    for _ in range(2):  # two rounds of sequential offers, as in simulate_coverage
        for peer in sorted(servers):
            info = servers[peer]
            target = should_move(servers, 12, peer, (info.start, info.end), 100.0)
            if target is not None:
                servers[peer] = ServerInfo(ServerState.ONLINE, *target, throughput=100.0)
    assert (block_throughputs(servers, 12) > 0).all()


# ---- pushed decoding: link costs between servers from their announced RTTs


def test_random_swarm_announces_rtts_to_the_servers_after_each_span():
    announced = 0
    for seed in range(10):
        num_blocks, servers, _ = small_swarm(seed)
        for info in servers.values():
            assert len(info.next_pings) <= 5
            if info.state != ServerState.ONLINE or info.end == num_blocks:
                assert info.next_pings == {}
            for peer, rtt in info.next_pings.items():
                after = servers[peer]
                assert after.state == ServerState.ONLINE and after.start <= info.end < after.end and rtt > 0
            announced += len(info.next_pings)
    assert announced > 0
    assert all(not info.next_pings for info in random_swarm(10, 8, 1, next_pings=0)[0].values())


def all_pushed_chain_costs(model: CostModel, block: int, end: int, steps: tuple = ()):
    """The cost of every valid chain from ``block`` to ``end`` with push, each costed as a whole."""
    if block == end:
        yield chain_cost(model.chain(list(steps)))
        return
    for i in range(len(model.peers)):
        if model.starts[i] <= block < model.ends[i]:
            stop = min(int(model.ends[i]), end)
            yield from all_pushed_chain_costs(model, stop, end, (*steps, (i, block, stop)))


def test_exhaustive_pushed_search_matches_brute_force_enumeration():
    push = RouteRequest(push=True)
    for seed in range(20):
        servers, stats = random_swarm(6, 6, seed)
        model = CostModel.build(servers, stats, RoutingPolicy(), push)
        for start, end in ((0, 6), (1, 5)):
            best = exhaustive_best_cost(servers, stats, None, push, start, end)
            assert math.isclose(min(all_pushed_chain_costs(model, start, end)), best, rel_tol=1e-12)


def test_pushed_find_chain_is_optimal_on_small_swarms():
    rng = np.random.default_rng(9)
    fewer_than_relayed = 0
    for seed in range(50):
        num_blocks, servers, stats = small_swarm(seed)
        policy = RoutingPolicy(latency_weight=float(rng.uniform(0.2, 3)), compute_weight=float(rng.uniform(0, 3)))
        request = RouteRequest(push=True, max_length=512)
        for start, end in ((0, num_blocks), sorted(rng.choice(num_blocks + 1, 2, replace=False).tolist())):
            hops = find_chain(servers, start, end, stats=stats, policy=policy, request=request)
            assert chain_problems(hops, servers, start, end) == []
            best = exhaustive_best_cost(servers, stats, policy, request, start, end)
            assert abs(chain_cost(hops) - best) <= 1e-9, (seed, start, end)
            relayed = exhaustive_best_cost(servers, stats, policy, None, start, end)
            fewer_than_relayed += best < relayed - 1e-9
            _, random_cost = random_valid_chain(servers, start, end, rng, stats=stats, policy=policy,
                                                request=request)
            assert random_cost >= best - 1e-12
    assert fewer_than_relayed > 0  # the announced links do shorten some steps


def test_push_without_announcements_costs_what_relaying_costs():
    for seed in range(20):
        num_blocks, _, _ = small_swarm(seed)
        servers, stats = random_swarm(*swarm_args(seed), next_pings=0)
        relayed = chain_cost(find_chain(servers, 0, num_blocks, stats=stats))
        assert math.isclose(chain_cost(find_chain(servers, 0, num_blocks, stats=stats,
                                                  request=RouteRequest(push=True))), relayed, rel_tol=1e-12)
        assert math.isclose(exhaustive_best_cost(servers, stats, None, RouteRequest(push=True), 0, num_blocks),
                            relayed, rel_tol=1e-12)


def test_pushed_routing_at_1000_servers_returns_a_valid_chain():
    servers, stats = random_swarm(80, 1000, seed=11)
    hops = find_chain(servers, 0, 80, stats=stats, request=RouteRequest(push=True))
    assert chain_problems(hops, servers, 0, 80) == []
    rng = np.random.default_rng(0)
    assert chain_cost(hops) < min(random_valid_chain(servers, 0, 80, rng, stats=stats,
                                                     request=RouteRequest(push=True))[1] for _ in range(5))
