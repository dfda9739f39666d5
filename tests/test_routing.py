"""Routing and block choice on hand-made swarms: the cheapest chain wins, unusable servers are avoided, policy
weights move the choice as documented."""

from __future__ import annotations

import numpy as np
import pytest

from swarm.client.routing import CostModel, MissingBlocksError, PeerStats, RouteRequest, RoutingPolicy, find_chain
from swarm.dht.schema import ServerInfo, ServerState
from swarm.server.block_selection import block_throughputs, choose_span, should_move


def server(start: int, end: int, rps: float = 10.0, state: ServerState = ServerState.ONLINE, **fields) -> ServerInfo:
    fields = {"cache_tokens_left": 10_000, "inference_rps": rps, "forward_tps": rps * 100, "throughput": rps * 100,
              **fields}
    return ServerInfo(state, start, end, **fields)


def route(servers: dict, stats: dict | None = None, **kwargs) -> list[tuple[str, int, int]]:
    hops = find_chain(servers, 0, 6, stats=stats or {}, **kwargs)
    return [(hop.span.peer_id, hop.span.start, hop.span.end) for hop in hops]


def rtts(**values: float) -> dict[str, PeerStats]:
    return {peer: PeerStats(rtt=rtt) for peer, rtt in values.items()}


def test_cheapest_chain_wins():
    servers = {"whole-slow": server(0, 6, rps=2.0), "a": server(0, 3, rps=50.0), "b": server(3, 6, rps=50.0)}
    # one slow hop: 0.01 + 1/2 = 0.51 s; two fast hops: 2 x (0.01 + 1/50) = 0.06 s
    assert route(servers, rtts(**{"whole-slow": 0.01, "a": 0.01, "b": 0.01})) == [("a", 0, 3), ("b", 3, 6)]
    # far away fast servers lose to one nearby slow server: 2 x (0.5 + 0.02) > 0.01 + 0.5
    assert route(servers, rtts(**{"whole-slow": 0.01, "a": 0.5, "b": 0.5})) == [("whole-slow", 0, 6)]


def test_hop_runs_to_the_end_of_its_span_and_partial_spans_are_used():
    servers = {"a": server(0, 4), "b": server(2, 6)}
    assert route(servers, rtts(a=0.01, b=0.01)) == [("a", 0, 4), ("b", 4, 6)]


@pytest.mark.parametrize("unusable, why", [
    (dict(state=ServerState.OFFLINE), "offline"),
    (dict(state=ServerState.JOINING), "joining"),
    (dict(cache_tokens_left=10), "free cache tokens"),
    (dict(quantization="nf4"), "below the precision int8"),
])
def test_unusable_servers_are_avoided(unusable, why):
    state = unusable.pop("state", ServerState.ONLINE)
    servers = {"best": server(0, 6, rps=100.0, state=state, **unusable), "other": server(0, 6, rps=5.0)}
    request = RouteRequest(mode="latency", batch_size=2, max_length=100)
    assert route(servers, rtts(best=0.001, other=0.001), request=request,
                 policy=RoutingPolicy(min_precision="int8")) == [("other", 0, 6)]
    del servers["other"]
    with pytest.raises(MissingBlocksError, match=f"no server holds block 0 of the model usable by this request.*{why}"):
        route(servers, request=request, policy=RoutingPolicy(min_precision="int8"))


def test_blocked_allowed_and_failing_servers():
    servers = {"a": server(0, 6, rps=20.0), "b": server(0, 6, rps=10.0)}
    stats = rtts(a=0.01, b=0.01)
    assert route(servers, stats) == [("a", 0, 6)]
    assert route(servers, stats, policy=RoutingPolicy(blocked_servers=["a"])) == [("b", 0, 6)]
    assert route(servers, stats, policy=RoutingPolicy(allowed_servers=["b"])) == [("b", 0, 6)]
    stats["a"].failures = 1.0  # one recent failure costs an expected failover (2 s by default)
    assert route(servers, stats) == [("b", 0, 6)]
    assert route(servers, stats, policy=RoutingPolicy(reliability_weight=0.0)) == [("a", 0, 6)]


def test_policy_weights_trade_latency_for_throughput():
    servers = {"near-slow": server(0, 6, rps=4.0), "far-fast": server(0, 6, rps=100.0)}
    stats = rtts(**{"near-slow": 0.005, "far-fast": 0.2})
    # default: 0.005 + 0.25 > 0.2 + 0.01: the fast server wins
    assert route(servers, stats) == [("far-fast", 0, 6)]
    # a client that weighs latency 3x: 3 x 0.005 + 0.25 = 0.265 < 3 x 0.2 + 0.01 = 0.61
    assert route(servers, stats, policy=RoutingPolicy(latency_weight=3.0)) == [("near-slow", 0, 6)]
    # and one that ignores compute speed takes the nearest
    assert route(servers, stats, policy=RoutingPolicy(compute_weight=0.0)) == [("near-slow", 0, 6)]


def test_load_and_throughput_mode():
    servers = {"busy": server(0, 6, rps=20.0, load=5.0), "idle": server(0, 6, rps=10.0)}
    stats = rtts(busy=0.01, idle=0.01)
    assert route(servers, stats) == [("idle", 0, 6)]  # 5 queued steps of 50 ms outweigh the speed
    assert route(servers, stats, policy=RoutingPolicy(load_weight=0.0)) == [("busy", 0, 6)]
    forward = RouteRequest(mode="throughput", tokens=4096)
    fast_forward = {"a": server(0, 6, rps=10.0), "b": server(0, 6, rps=10.0, forward_tps=50_000.0)}
    assert route(fast_forward, rtts(a=0.01, b=0.01), request=forward) == [("b", 0, 6)]


def test_explain_lists_every_cost_term():
    hop = find_chain({"a": server(0, 6, rps=10.0, load=1.0)}, 0, 6, stats=rtts(a=0.02))[0]
    explained = hop.explain()
    assert explained["blocks"] == [0, 6] and explained["network_s"] == pytest.approx(0.02)
    assert explained["compute_s"] == pytest.approx(0.1) and explained["queue_s"] == pytest.approx(0.1)
    assert explained["total_s"] == pytest.approx(0.22)


def test_block_choice_fills_the_weakest_blocks():
    servers = {"a": server(0, 2), "b": server(2, 4)}  # throughput 1000 each
    assert choose_span(servers, 6, 2, own_throughput=1000.0) == (4, 6)
    servers["c"] = server(4, 6)
    assert choose_span(servers, 6, 3, own_throughput=1000.0) == (0, 3)  # ties: the lowest start
    assert list(block_throughputs(servers, 6)) == [1000.0] * 6


def test_servers_not_measured_yet_count_as_the_median():
    """U-Net servers announce no throughput before their first evaluation: a server joining next to them must
    still see their blocks as covered, not pile onto the same span."""
    unmeasured = {"a": server(0, 2, throughput=None)}
    assert choose_span(unmeasured, 3, 2, own_throughput=1.0) == (1, 3)
    assert list(block_throughputs(unmeasured, 3)) == [1.0, 1.0, 0.0]
    mixed = {"a": server(0, 2, throughput=None), "b": server(2, 4), "c": server(4, 6, throughput=3000.0)}
    assert list(block_throughputs(mixed, 6)) == [2000.0] * 2 + [1000.0] * 2 + [3000.0] * 2  # a: the median


def test_should_move_only_for_a_clear_gain():
    servers = {"a": server(0, 3), "b": server(0, 3), "d": server(0, 3), "c": server(3, 6)}
    # three servers on 0:3, one on 3:6: moving "b" doubles the weakest block (1000 -> 2000 tokens/s)
    assert should_move(servers, 6, "b", (0, 3), 1000.0) == (3, 6)
    # "c" alone on 3:6 would leave a gap: stay
    assert should_move(servers, 6, "c", (3, 6), 1000.0) is None
    # two on 0:3, one on 3:6: a move would only shift the weakest block elsewhere
    del servers["d"]
    assert should_move(servers, 6, "b", (0, 3), 1000.0) is None
    # a near-balanced swarm: gains under the margin are not worth a move
    balanced = {"a": server(0, 3, rps=10.0), "b": server(3, 6, rps=9.0), "c": server(3, 6, rps=9.0),
                "d": server(0, 3, rps=9.5)}
    assert should_move(balanced, 6, "d", (0, 3), 950.0) is None
    # a gap appears when "c" leaves: the duplicate moves to fill it
    del servers["c"]
    assert should_move(servers, 6, "b", (0, 3), 1000.0) == (3, 6)


def test_large_batches_split_over_parallel_chains_only_when_faster():
    from swarm.client.routing import CostModel, parallel_chains

    def plan(forward_tps: float) -> list[list[str]]:
        servers = {"a": server(0, 6, forward_tps=forward_tps), "b": server(0, 6, forward_tps=forward_tps)}
        model = CostModel.build(servers, rtts(a=0.01, b=0.01), RoutingPolicy(),
                                RouteRequest(mode="throughput", tokens=4096))
        return [[hop.span.peer_id for hop in chain] for chain in parallel_chains(model, 0, 6, max_chains=4)]

    assert sorted(plan(forward_tps=1000.0)) == [["a"], ["b"]]  # 4 s of compute: halve it on two servers
    assert len(plan(forward_tps=1e7)) == 1  # compute is negligible next to a second round trip: one chain


# ---- pushed decoding: servers hand each step's output to the next one


def pushed(servers: dict, stats: dict, **kwargs) -> list:
    return find_chain(servers, 0, 6, stats=stats, request=RouteRequest(push=True), **kwargs)


def test_push_prefers_servers_that_reach_each_other_quickly():
    # near: 10 ms from the client each, but 200 ms from each other; far: 50 ms from the client, 2 ms apart
    servers = {"near-a": server(0, 3, next_pings={"near-b": 0.2}), "near-b": server(3, 6),
               "far-a": server(0, 3, next_pings={"far-b": 0.002}), "far-b": server(3, 6)}
    stats = rtts(**{"near-a": 0.01, "near-b": 0.01, "far-a": 0.05, "far-b": 0.05})
    # relayed (today's model, and push=False): 0.01 + 0.01 < 0.05 + 0.05, whatever the servers announce
    assert route(servers, stats) == [("near-a", 0, 3), ("near-b", 3, 6)]
    assert route(servers, stats, request=RouteRequest(push=False)) == [("near-a", 0, 3), ("near-b", 3, 6)]
    # pushed: far 0.025 + 0.001 + 0.025 = 0.051 s of network; near 0.005 + 0.1 + 0.005 = 0.11 s; mixed chains
    # fall back to the client in between: 0.005 + (0.01 + 0.05) / 2 + 0.025 = 0.06 s
    hops = pushed(servers, stats)
    assert [(h.span.peer_id, h.span.start, h.span.end) for h in hops] == [("far-a", 0, 3), ("far-b", 3, 6)]
    assert [h.network for h in hops] == pytest.approx([0.025, 0.001 + 0.025])
    assert [h.pushed for h in hops] == [False, True]
    # throughput mode relays whatever the request says
    forward = RouteRequest(mode="throughput", tokens=16, push=True)
    assert route(servers, stats, request=forward) == [("near-a", 0, 3), ("near-b", 3, 6)]


def test_push_falls_back_to_the_relayed_cost_for_unknown_links():
    # "y" does not hold block 3 (and no hop can reach it), "z" is offline, "ghost" is not in the swarm
    servers = {"a": server(0, 3), "b": server(3, 6), "c": server(0, 6, rps=4.0), "y": server(4, 6),
               "z": server(3, 6, state=ServerState.OFFLINE)}
    stats = rtts(a=0.01, b=0.03, c=0.02, y=0.001, z=0.001)
    relayed = find_chain(servers, 0, 6, stats=stats)
    assert [h.span.peer_id for h in relayed] == ["a", "b"]  # 0.01 + 0.1 + 0.03 + 0.1 < 0.02 + 0.25

    def links(hops: list) -> list:
        return [(round(h.link_in, 12), round(h.link_out, 12), h.pushed) for h in hops]

    # nothing announced, or only links no chain can take: exactly the relayed costs
    for pings in ({}, {"ghost": 0.001, "y": 0.001, "z": 0.001}):
        servers["a"] = server(0, 3, next_pings=pings)
        hops = pushed(servers, stats)
        assert [str(h.span) for h in hops] == [str(h.span) for h in relayed]
        assert sum(h.cost for h in hops) == pytest.approx(sum(h.cost for h in relayed))
        assert links(hops) == [(0.005, 0.005, False), (0.015, 0.015, False)]
    # announced: "a" pushes straight to "b" (half the RTT it measured), and its output no longer goes to the client
    servers["a"] = server(0, 3, next_pings={"b": 0.012})
    assert links(pushed(servers, stats)) == [(0.005, 0.0, False), (0.006, 0.015, True)]
    # a link slower than going through the client still costs what it costs: the session pushes over it
    servers["a"] = server(0, 3, next_pings={"b": 0.2})
    # so the chain avoids it: a -> c through the client, 0.005 + 0.1 + 0.005 + 0.01 + 0.125 + 0.01 = 0.255 s,
    # beats c alone (0.27 s) and a -> b (0.005 + 0.1 + 0.1 + 0.1 + 0.015 = 0.32 s)
    assert links(pushed(servers, stats)) == [(0.005, 0.005, False), (0.01, 0.01, False)]
    assert [h.span.peer_id for h in pushed(servers, stats)] == ["a", "c"]
    assert links(pushed(servers, stats, policy=RoutingPolicy(blocked_servers=["c"]))) == [
        (0.005, 0.0, False), (0.1, 0.015, True)]


def test_push_keeps_single_hops_and_explains_every_term():
    servers = {"a": server(0, 6, rps=10.0, load=1.0, next_pings={"x": 0.001})}
    (hop,) = pushed(servers, rtts(a=0.02))
    explained = hop.explain()
    assert explained["network_s"] == pytest.approx(0.02) and explained["total_s"] == pytest.approx(0.22)
    assert explained["link_in_s"] == pytest.approx(0.01) and explained["link_out_s"] == pytest.approx(0.01)
    assert explained["input_from"] == "client"


def random_pushed_swarm(rng: np.random.Generator) -> tuple[dict, dict, int, int]:
    """A small swarm where servers announce RTTs, some to stale peers, some slower than relaying."""
    num_blocks = int(rng.integers(3, 8))
    servers = {f"s{k}": server(int(a), int(a) + int(rng.integers(1, num_blocks - a + 1)),
                               rps=float(rng.uniform(2, 100)), load=float(rng.integers(0, 2)))
               for k, a in enumerate(rng.integers(0, num_blocks, int(rng.integers(2, 8))))}
    servers.update({f"f{b}": server(b, b + 1, rps=float(rng.uniform(2, 100))) for b in range(num_blocks)})
    for info in servers.values():
        after = [peer for peer, other in servers.items() if other.start <= info.end < other.end]
        info.next_pings.update({peer: float(rng.uniform(0.001, 0.4)) for peer in after if rng.random() < 0.6})
        if rng.random() < 0.2:
            info.next_pings[f"s{int(rng.integers(0, 8))}"] = float(rng.uniform(0.001, 0.4))  # maybe not adjacent
    stats = {peer: PeerStats(rtt=float(rng.uniform(0.005, 0.2)), overhead=float(rng.uniform(0, 0.01)))
             for peer in servers}
    start = int(rng.integers(0, num_blocks))
    return servers, stats, start, int(rng.integers(start + 1, num_blocks + 1))


def brute_force_pushed(servers: dict, stats: dict, start: int, end: int, latency_weight: float) -> float:
    """The cheapest chain's cost, listing every chain and pricing its links straight from the announcements."""
    model = CostModel.build(servers, stats, RoutingPolicy(latency_weight=latency_weight), RouteRequest(push=True))

    def rtt(peer: str) -> float:
        return latency_weight * stats[peer].rtt

    def link(sender: str | None, receiver: str | None) -> float:
        if sender is None or receiver is None:
            return rtt(sender or receiver) / 2
        announced = servers[sender].next_pings.get(receiver)
        adjacent = servers[receiver].start <= servers[sender].end < servers[receiver].end
        return latency_weight * announced / 2 if announced is not None and adjacent else (
            rtt(sender) + rtt(receiver)) / 2

    def chains(block: int, previous: str | None):
        if block == end:
            yield link(previous, None)
            return
        for i, peer in enumerate(model.peers):
            if servers[peer].start <= block < servers[peer].end:
                stop = min(servers[peer].end, end)
                hop = model.hop(i, block, stop)
                local = hop.compute + hop.queue + hop.reliability + hop.overhead
                for rest in chains(stop, peer):
                    yield link(previous, peer) + local + rest

    return min(chains(start, None))


def test_pushed_route_is_the_cheapest_of_all_chains():
    rng = np.random.default_rng(5)
    for trial in range(150):
        servers, stats, start, end = random_pushed_swarm(rng)
        weight = float(rng.choice([1.0, rng.uniform(0.2, 3.0)]))
        policy = RoutingPolicy(latency_weight=weight)
        hops = find_chain(servers, start, end, stats=stats, policy=policy, request=RouteRequest(push=True))
        assert hops[0].span.start == start and hops[-1].span.end == end
        assert all(a.span.end == b.span.start for a, b in zip(hops, hops[1:], strict=False))
        best = brute_force_pushed(servers, stats, start, end, weight)
        # what explain_route shows adds up to the optimum
        assert sum(hop.explain()["total_s"] for hop in hops) == pytest.approx(best, rel=1e-12, abs=1e-12), trial
        for hop in hops:
            e = hop.explain()
            assert e["network_s"] == pytest.approx(e["link_in_s"] + e["link_out_s"])
            assert e["total_s"] == pytest.approx(e["network_s"] + e["compute_s"] + e["queue_s"] + e["overhead_s"]
                                                 + e["reliability_s"])
