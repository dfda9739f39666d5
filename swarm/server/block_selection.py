"""Which blocks a server started with ``--num-blocks N`` should hold: the span that most raises the swarm's
weakest block throughput, and whether moving there later is worth it.

A block's throughput is the sum of the announced throughputs of the online (or joining) servers holding it; the
swarm is as fast as its weakest block. Pure functions of the announcements, shared with the simulator.
"""

from __future__ import annotations

import numpy as np

from swarm.dht.schema import ServerInfo, ServerState

MOVE_MARGIN = 1.2  # move only if the weakest block gets this much faster (stay put on near ties)


def block_throughputs(servers: dict[str, ServerInfo], num_blocks: int, exclude: str | None = None) -> np.ndarray:
    """Per block, the total throughput of the servers (other than ``exclude``) that hold it. A server that has not
    announced a throughput yet (a U-Net server before its first evaluation) counts as the median of those that did:
    counted as zero, servers joining together all saw the same empty swarm and piled onto the same blocks."""
    known = [info.throughput for info in servers.values() if info.throughput]
    unknown = float(np.median(known)) if known else 1.0
    totals = np.zeros(num_blocks)
    for peer, info in sorted(servers.items()):  # sorted: float sums independent of dict order
        if peer != exclude and info.state in (ServerState.ONLINE, ServerState.JOINING):
            totals[info.start : min(info.end, num_blocks)] += info.throughput or unknown
    return totals


def choose_best_start(throughputs: np.ndarray, length: int, own_throughput: float) -> int:
    """The start of the window whose weakest blocks gain most from our throughput.

    Compares the sorted per-block throughputs after adding ours, lexicographically: the weakest block first, then
    the next weakest, ...; on a full tie the lowest start wins.
    """
    best_start, best_key = 0, None
    for start in range(len(throughputs) - length + 1):
        after = throughputs.copy()
        after[start : start + length] += own_throughput
        key = tuple(np.sort(after))
        if best_key is None or key > best_key:
            best_start, best_key = start, key
    return best_start


def choose_span(servers: dict[str, ServerInfo], num_blocks: int, length: int, own_throughput: float,
                me: str | None = None) -> tuple[int, int]:
    """(start, end) for a server of ``own_throughput`` joining (or re-joining) with ``length`` blocks."""
    length = min(length, num_blocks)
    start = choose_best_start(block_throughputs(servers, num_blocks, exclude=me), length, own_throughput)
    return start, start + length


def should_move(servers: dict[str, ServerInfo], num_blocks: int, me: str, current: tuple[int, int],
                own_throughput: float, margin: float = MOVE_MARGIN) -> tuple[int, int] | None:
    """The span to move to, if leaving ``current`` for it clearly helps the swarm's weakest blocks.

    Compares the sorted per-block throughputs with and without the move, weakest first: at the first block where
    they differ, the move must be ``margin`` times better (any coverage beats none). Comparing only the very weakest
    block would never fill one of two separate gaps, since no single move covers both.
    """
    others = block_throughputs(servers, num_blocks, exclude=me)
    length = current[1] - current[0]
    staying = others.copy()
    staying[current[0] : current[1]] += own_throughput
    start = choose_best_start(others, length, own_throughput)
    if start == current[0]:
        return None
    moved = others.copy()
    moved[start : start + length] += own_throughput
    before, after = np.sort(staying), np.sort(moved)
    differs = np.nonzero(before != after)[0]
    if len(differs) and after[differs[0]] > before[differs[0]] * margin:
        return start, start + length
    return None
