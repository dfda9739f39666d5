"""Routing and block choice on simulated swarms: the project's real code, synthetic servers, no processes.

1. Route cost of ``find_chain`` against the exhaustive optimum on small random swarms (and a random valid chain's);
   then the same for pushed decoding (servers hand outputs to each other; link costs from their ``next_pings``),
   and what routing that ignores the pings loses there.
2. Time of ``find_chain`` at 1,000 and 10,000 servers over 80 blocks (cost model build + search), relayed and
   pushed.
3. Predicted decode tokens/s through the cheapest chain vs a random valid chain on heterogeneous swarms.
4. Block coverage under churn: servers join with ``choose_span``, leave at random, rebalance with ``should_move``;
   then departures with no one joining, where only rebalancing can close holes.

Every figure is deterministic for the seeds below, except the timings of section 2.

Duration on a 2-core machine: 31 s (measured). Processes: none (simulated swarms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: `python benchmarks/routing.py`

import numpy as np  # noqa: E402

from swarm.client.routing import (  # noqa: E402
    CostModel,
    Hop,
    RouteRequest,
    RoutingPolicy,
    cheapest_chain,
    find_chain,
)
from swarm.simulation.swarm import (  # noqa: E402
    chain_cost,
    chain_problems,
    count_valid_chains,
    exhaustive_best_cost,
    random_swarm,
    random_valid_chain,
    simulate_coverage,
)


def optimality(num_swarms: int = 200) -> None:
    print(f"== 1. find_chain vs the exhaustive optimum ({num_swarms} swarms, 8-12 blocks, 6-15 servers) ==")
    excess, random_excess, chains, invalid = [], [], [], 0
    rng = np.random.default_rng(0)
    for seed in range(num_swarms):
        num_blocks, num_servers = int(rng.integers(8, 13)), int(rng.integers(6, 16))
        servers, stats = random_swarm(num_blocks, num_servers, seed)
        hops = find_chain(servers, 0, num_blocks, stats=stats)
        invalid += bool(chain_problems(hops, servers, 0, num_blocks))
        best = exhaustive_best_cost(servers, stats, None, None, 0, num_blocks)
        excess.append(chain_cost(hops) / best - 1)
        _, random_cost = random_valid_chain(servers, 0, num_blocks, rng, stats=stats)
        random_excess.append(random_cost / best - 1)
        chains.append(count_valid_chains(servers, 0, num_blocks))
    excess_arr = np.array(excess)
    print(f"valid chains per swarm: median {statistics.median(chains):.0f}, max {max(chains)}; "
          f"invalid chains returned by find_chain: {invalid}")
    print(f"find_chain excess over optimum: mean {excess_arr.mean():.2e}, max {excess_arr.max():.2e}; "
          f"within 5%: {np.mean(excess_arr <= 0.05):.1%}; equal within 1e-9: {np.mean(np.abs(excess_arr) <= 1e-9):.1%}")
    print(f"random valid chain excess over optimum: mean {np.mean(random_excess):.1%}, "
          f"median {np.median(random_excess):.1%}, max {np.max(random_excess):.1%}\n")
    push_optimality(num_swarms)


def recost(hops: list[Hop], model: CostModel) -> list[Hop]:
    """The same chain, costed under another cost model (e.g. one that knows the servers push)."""
    return model.chain([(model.peers.index(h.span.peer_id), h.span.start, h.span.end) for h in hops])


def push_optimality(num_swarms: int) -> None:
    print(f"== 1b. pushed decoding: find_chain(push=True) vs the exhaustive optimum with pairwise link costs "
          f"({num_swarms} swarms as above; each server announces RTTs to <= 5 servers after its span) ==")
    push, policy = RouteRequest(push=True), RoutingPolicy()
    excess, unaware, random_excess, links, pushed, gain, invalid = [], [], [], 0, 0, [], 0
    rng = np.random.default_rng(0)
    for seed in range(num_swarms):
        num_blocks, num_servers = int(rng.integers(8, 13)), int(rng.integers(6, 16))
        servers, stats = random_swarm(num_blocks, num_servers, seed)
        hops = find_chain(servers, 0, num_blocks, stats=stats, request=push)
        invalid += bool(chain_problems(hops, servers, 0, num_blocks))
        best = exhaustive_best_cost(servers, stats, None, push, 0, num_blocks)
        excess.append(chain_cost(hops) / best - 1)
        links, pushed = links + len(hops) - 1, pushed + sum(hop.pushed for hop in hops)
        # The chain chosen as if the client relayed, then run with push: routing that ignores the pings.
        model = CostModel.build(servers, stats, policy, push)
        unaware.append(chain_cost(recost(find_chain(servers, 0, num_blocks, stats=stats), model)) / best - 1)
        gain.append(1 - best / exhaustive_best_cost(servers, stats, None, None, 0, num_blocks))
        _, random_cost = random_valid_chain(servers, 0, num_blocks, rng, stats=stats, request=push)
        random_excess.append(random_cost / best - 1)
    excess_arr = np.array(excess)
    print(f"invalid chains returned: {invalid}; links between servers in the chosen chains: {links}, "
          f"{pushed} of them announced (pushed at the announced RTT), the rest relayed through the client")
    print(f"find_chain(push) excess over optimum: mean {excess_arr.mean():.2e}, max {excess_arr.max():.2e}; "
          f"within 5%: {np.mean(excess_arr <= 0.05):.1%}; equal within 1e-9: {np.mean(np.abs(excess_arr) <= 1e-9):.1%}")
    print(f"chain chosen ignoring the pings (relay costs), run with push: excess mean {np.mean(unaware):.1%}, "
          f"max {np.max(unaware):.1%}, worse than optimal in {np.mean(np.array(unaware) > 1e-9):.0%} of swarms")
    print(f"random valid chain with push: excess mean {np.mean(random_excess):.1%}, "
          f"median {np.median(random_excess):.1%}; optimal pushed step vs optimal relayed step: "
          f"{np.mean(gain):.1%} shorter on average\n")


def routing_time(num_blocks: int = 80, sizes: tuple[int, ...] = (1_000, 10_000), runs: int = 15) -> None:
    print(f"== 2. find_chain compute time, {num_blocks} blocks (median of {runs} runs after a warm-up) ==")
    policy = RoutingPolicy()
    for size in sizes:
        servers, stats = random_swarm(num_blocks, size, seed=size)
        for request in (RouteRequest(), RouteRequest(push=True)):
            find_chain(servers, 0, num_blocks, stats=stats, request=request)  # warm-up: first-call allocations
            total, build, search = [], [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                hops = find_chain(servers, 0, num_blocks, stats=stats, request=request)
                t1 = time.perf_counter()
                model = CostModel.build(servers, stats, policy, request)
                t2 = time.perf_counter()
                cheapest_chain(model, 0, num_blocks)
                t3 = time.perf_counter()
                total.append(t1 - t0), build.append(t2 - t1), search.append(t3 - t2)
            label = f"pushed ({len(model.link_from)} announced links)" if request.push else "relayed"
            print(f"{len(servers):>6} servers: find_chain median {1e3 * statistics.median(total):6.1f} ms "
                  f"(min {1e3 * min(total):.1f}, max {1e3 * max(total):.1f}); of which CostModel.build "
                  f"{1e3 * statistics.median(build):.1f} ms, search {1e3 * statistics.median(search):.1f} ms; "
                  f"{len(hops)} hops; {label}")
    print()


def decode_speed(num_swarms: int = 200, num_blocks: int = 32, num_servers: int = 40, draws: int = 10) -> None:
    print(f"== 3. predicted decode tokens/s, cheapest vs random valid chain ({num_swarms} swarms, {num_blocks} "
          f"blocks, {num_servers} servers, {draws} random chains each) ==")
    print("servers: 1-100 ms per block per step, RTT 5-200 ms, 30% with 1-4 queued requests; no failure history "
          "(so the cost is time only); tokens/s = 1 / predicted step time")
    rng = np.random.default_rng(1)
    best_tps, random_tps, ratios = [], [], []
    for seed in range(num_swarms):
        servers, stats = random_swarm(num_blocks, num_servers, 10_000 + seed, failure_prob=0.0)
        best = 1.0 / chain_cost(find_chain(servers, 0, num_blocks, stats=stats))
        rand = [1.0 / random_valid_chain(servers, 0, num_blocks, rng, stats=stats)[1] for _ in range(draws)]
        best_tps.append(best), random_tps.extend(rand), ratios.append(best / np.mean(rand))
    print(f"cheapest chain: mean {np.mean(best_tps):.2f} tokens/s; random chain: mean {np.mean(random_tps):.2f} "
          f"tokens/s; ratio of means {np.mean(best_tps) / np.mean(random_tps):.1f}x; per-swarm ratio median "
          f"{np.median(ratios):.1f}x (min {np.min(ratios):.1f}x)\n")


def coverage(num_blocks: int = 40, blocks_per_server: int = 8, steps: int = 200, every: int = 10) -> None:
    print(f"== 4. coverage under churn: {num_blocks} blocks, {blocks_per_server} per server, join 0.4/step, "
          f"each server leaves 0.03/step, seed 0 ==")
    history = simulate_coverage(num_blocks, blocks_per_server, steps, seed=0, join_prob=0.4, leave_prob=0.03)
    print(f"{'step':>5} {'servers':>7} {'uncovered':>9} {'min tput':>9} {'moves':>5}   (moves: since the last row)")
    moves = 0
    for record in history:
        moves += record["moves"]
        if record["step"] % every == every - 1:
            print(f"{record['step'] + 1:>5} {record['servers']:>7} {record['zero_blocks']:>9} "
                  f"{record['min_throughput']:>9.0f} {moves:>5}")
            moves = 0
    # Only steps where the servers could cover every block at all say anything about the choice of spans.
    able = [r for r in history if r["servers"] * blocks_per_server >= num_blocks]
    holes_before = sum(r["zero_before_moves"] > 0 for r in able)
    holes_after = sum(r["zero_blocks"] > 0 for r in able)
    repaired = sum(r["zero_before_moves"] > 0 and r["zero_blocks"] == 0 and not r["joined"] for r in able)
    print(f"of {len(able)} steps with servers x {blocks_per_server} >= {num_blocks}: {holes_before} had uncovered "
          f"blocks after churn, {holes_after} after rebalancing ({repaired} repaired by moves alone, no join); "
          f"total moves {sum(r['moves'] for r in history)}")

    seeds, stalled = 50, []
    for seed in range(seeds):
        runs = simulate_coverage(num_blocks, 4, 60, seed, join_prob=0.0, leave_prob=0.05, initial_servers=40,
                                 leave_until=20)
        last = runs[-1]
        if last["zero_blocks"] and last["servers"] * 4 >= num_blocks:
            stalled.append(f"seed {seed}: {last['servers']} servers, {last['zero_blocks']} uncovered")
    print(f"departures only (40 servers x 4 blocks, leaving 0.05/step for 20 steps, then 40 quiet steps, "
          f"{seeds} seeds): {len(stalled)} end with uncovered blocks although servers x 4 >= {num_blocks}"
          + (f" ({'; '.join(stalled[:3])}{'; ...' if len(stalled) > 3 else ''})" if stalled else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="1234", help="which sections to run, e.g. 12 (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer swarms and timing runs (rougher figures)")
    args = parser.parse_args()
    if "1" in args.sections:
        optimality(40 if args.quick else 200)
    if "2" in args.sections:
        routing_time(runs=5 if args.quick else 15)
    if "3" in args.sections:
        decode_speed(40 if args.quick else 200)
    if "4" in args.sections:
        coverage()
