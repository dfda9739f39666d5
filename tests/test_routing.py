"""Routing and block choice on hand-made swarms: the cheapest chain wins, unusable servers are avoided, policy
weights move the choice as documented."""

from __future__ import annotations

import pytest

from swarm.client.routing import MissingBlocksError, PeerStats, RouteRequest, RoutingPolicy, find_chain
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
